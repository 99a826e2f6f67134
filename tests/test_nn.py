"""Drop-in modules and optimize(model): same state_dict, same outputs, same training behaviour as torch."""
import copy

import pytest
import torch

import mltoolkit
from mltoolkit.testing import assert_close


class Block(torch.nn.Module):
    def __init__(self, d=32):
        super().__init__()
        self.fc1 = torch.nn.Linear(d, 4 * d)
        self.norm1 = torch.nn.LayerNorm(4 * d)
        self.fc2 = torch.nn.Linear(4 * d, d)
        self.norm2 = torch.nn.RMSNorm(d, eps=1e-6)
        self.head = torch.nn.Linear(d, 3)

    def forward(self, x):
        return self.head(self.norm2(x + self.fc2(torch.relu(self.norm1(self.fc1(x))))))


def test_modules_keep_torch_constructor_and_state_dict():
    ln = mltoolkit.nn.LayerNorm([4, 8], eps=1e-6, elementwise_affine=True, bias=False)
    ref = torch.nn.LayerNorm([4, 8], eps=1e-6, elementwise_affine=True, bias=False)
    assert ln.state_dict().keys() == ref.state_dict().keys()
    ref.weight.data.normal_()
    ln.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, 8)
    assert_close(ln(x), ref(x))
    rms = mltoolkit.nn.RMSNorm(8)
    assert rms.state_dict().keys() == torch.nn.RMSNorm(8).state_dict().keys()
    assert isinstance(rms, torch.nn.RMSNorm) and isinstance(ln, torch.nn.LayerNorm)


def test_optimize_swaps_in_place_and_shares_parameters():
    model = Block()
    eager = copy.deepcopy(model)
    w = model.norm1.weight
    out = mltoolkit.optimize(model)
    assert out is model
    assert type(model.norm1) is mltoolkit.nn.LayerNorm and type(model.norm2) is mltoolkit.nn.RMSNorm
    assert model.norm1.weight is w  # optimizers holding the parameter keep working
    assert model.state_dict().keys() == eager.state_dict().keys()
    x = torch.randn(16, 32)
    assert_close(model(x), eager(x))


def test_optimize_leaves_user_subclasses_alone():
    class MyNorm(torch.nn.LayerNorm):
        def forward(self, x):
            return super().forward(x) * 2

    model = torch.nn.Sequential(MyNorm(8))
    mltoolkit.optimize(model)
    assert type(model[0]) is MyNorm


def test_optimize_a_bare_norm_module():
    norm = torch.nn.LayerNorm(8)
    assert type(mltoolkit.optimize(norm)) is mltoolkit.nn.LayerNorm


def test_optimize_rejects_non_modules():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        mltoolkit.optimize("resnet")


def test_training_converges_like_eager():
    """A short training run: op-level allclose can miss drift, so compare whole loss curves."""
    torch.manual_seed(0)
    x = torch.randn(256, 32)
    y = (x[:, :3] * 2 + x[:, 3:6]).argmax(dim=1)
    eager = Block()
    fused = mltoolkit.optimize(copy.deepcopy(eager))
    losses = {}
    for name, model in (("eager", eager), ("fused", fused)):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        curve = []
        for _ in range(60):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            curve.append(loss.item())
        losses[name] = curve
    assert losses["fused"][-1] < 0.5 * losses["fused"][0]
    for a, b in zip(losses["eager"], losses["fused"]):
        assert abs(a - b) <= 1e-3 * max(1.0, abs(a))
