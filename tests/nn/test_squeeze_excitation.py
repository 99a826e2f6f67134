"""mltoolkit.nn.SqueezeExcitation against torchvision.ops.SqueezeExcitation (same weights): outputs and gradients in
both layouts, the activations MobileNetV3 and EfficientNet use, a block whose pooling is not the plain mean (runs its
modules), and optimize() swapping torchvision's blocks in a traced model."""
import copy

import pytest
import torch
from torch import nn

import mltoolkit
from mltoolkit import nn as mnn
from mltoolkit.testing import assert_close

torchvision = pytest.importorskip("torchvision")


def _pair(activation, scale_activation, c=24, s=6):
    torch.manual_seed(0)
    ref = torchvision.ops.SqueezeExcitation(c, s, activation, scale_activation)
    return ref, mnn.SqueezeExcitation.from_torchvision(copy.deepcopy(ref))


@pytest.mark.parametrize("acts", [(nn.ReLU, nn.Sigmoid), (nn.SiLU, nn.Sigmoid), (nn.ReLU, nn.Hardsigmoid)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_matches_torchvision_with_gradients(acts, channels_last):
    ref, ours = _pair(*acts)
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(3, 24, 7, 9)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yo = ref(xr), ours(xo)
    assert_close(yo, yr)
    if channels_last:
        assert yo.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(yr)
    yr.backward(g)
    yo.backward(g)
    assert_close(xo.grad, xr.grad)
    for (name, pr), po in zip(ref.named_parameters(), ours.parameters()):
        assert_close(po.grad, pr.grad, name=name)


def test_shares_the_torchvision_modules():
    ref = torchvision.ops.SqueezeExcitation(8, 2)
    ours = mnn.SqueezeExcitation.from_torchvision(ref)
    assert ours.fc1 is ref.fc1 and ours.fc2.weight is ref.fc2.weight and ours.activation is ref.activation


def test_other_pooling_runs_the_modules():
    ref, ours = _pair(nn.ReLU, nn.Sigmoid)
    ref.avgpool = ours.avgpool = nn.AdaptiveMaxPool2d(1)  # not a mean: the F.linear path does not apply
    x = torch.randn(2, 24, 5, 5)
    assert_close(ours(x), ref(x))


def test_default_constructor_matches_torchvision_layout():
    ours = mnn.SqueezeExcitation(16, 4)
    ref = torchvision.ops.SqueezeExcitation(16, 4)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert type(ours.activation) is nn.ReLU and type(ours.scale_activation) is nn.Sigmoid


def test_optimize_swaps_torchvision_blocks_in_a_traced_model():
    torch.manual_seed(0)
    model = torchvision.models.efficientnet_b0().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
    opt = mltoolkit.optimize(copy.deepcopy(model))
    assert isinstance(opt, torch.fx.GraphModule)  # the swapped blocks still trace, so conv + BN fuse
    # The trace inlines the blocks: their 1x1 convolutions became F.linear on the pooled rows, none runs as a module.
    nodes = list(opt.graph.nodes)
    assert sum(n.op == "call_function" and n.target is torch.nn.functional.linear for n in nodes) == 2 * 16
    assert not any(n.op == "call_module" and n.target.endswith((".fc1", ".fc2")) for n in nodes)
    with torch.no_grad():
        assert_close(opt(x), want, atol=1e-4, rtol=1e-4)


def test_inplace_scales_the_input_only_without_autograd():
    ref, ours = _pair(nn.SiLU, nn.Sigmoid)
    ours.inplace = True
    x = torch.randn(2, 24, 5, 6).to(memory_format=torch.channels_last)
    want = ref(x)
    with torch.no_grad():
        xi = x.clone()
        out = ours(xi)
    assert out.data_ptr() == xi.data_ptr()  # written into the input
    assert_close(out, want)
    # With autograd recording, the input is left alone and the gradients are torchvision's.
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yo = ref(xr), ours(xo)
    assert torch.equal(xo.detach(), x)
    yr.sum().backward()
    yo.sum().backward()
    assert_close(xo.grad, xr.grad)
    with pytest.raises(TypeError, match="inplace"):
        mnn.SqueezeExcitation(8, 2, inplace=1)


def _excite_flags(gm):
    from mltoolkit.nn.squeeze_excitation import _excite
    return [n.args[2] for n in gm.graph.nodes if n.op == "call_function" and n.target is _excite]


def test_optimize_scales_in_place_after_convolution_blocks_and_asks_grad_mode_when_run():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small().eval()  # Hardsigmoid blocks after depthwise conv blocks
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        opt = mltoolkit.optimize(copy.deepcopy(model))  # traced without autograd ...
        want = model(x)
        assert_close(opt(x), want, atol=1e-4, rtol=1e-4)
    flags = _excite_flags(opt)
    assert flags and all(flags)
    # ... and run with it (eval mode still: the classifier's dropout would draw): the traced graph takes the
    # out-of-place product, so gradients flow.
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    model(xr).sum().backward()
    opt(xo).sum().backward()
    assert_close(xo.grad, xr.grad, atol=1e-4, rtol=1e-3)


def test_optimize_keeps_out_of_place_where_the_input_may_be_read_again():
    torch.manual_seed(0)
    se = torchvision.ops.SqueezeExcitation(8, 2)
    model = nn.Sequential(nn.Identity(), se)  # the block's input is the caller's tensor
    opt = mltoolkit.optimize(model, channels_last=False)
    assert opt[1].inplace is False
    x = torch.randn(2, 8, 4, 4)
    before = x.clone()
    with torch.no_grad():
        opt(x)
    assert torch.equal(x, before)
