"""mltoolkit.pruning: unstructured masks (exact, held through optimizer steps, state dicts and torch.compile), global
vs per-layer amounts, 2:4 masks, the cubic schedule, structured channel pruning (shapes, exact equivalence with
zeroed channels, coupled residual groups, refusals), and accuracy on scikit-learn's digits."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mltoolkit import pruning as P
from mltoolkit.pruning import PruningError


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 10))


class SmallCNN(nn.Module):
    """conv-bn-relu-conv-bn-relu-pool-linear."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a, self.b = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.down, self.fc = nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(x + self.b(F.relu(self.a(x))))
        return self.fc(F.relu(self.down(x)).mean((2, 3)))


class Separable(nn.Module):
    """Depthwise conv with channel multiplier 2, then a flatten of 4x4 maps into a Linear (x.view(n, -1))."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 32, 3, padding=1, groups=16, bias=False)
        self.pw, self.fc = nn.Conv2d(32, 24, 1), nn.Linear(24 * 4 * 4, 10)

    def forward(self, x):
        x = F.relu(self.dw(F.relu(self.conv(x))))
        x = F.max_pool2d(F.relu(self.pw(x)), 2)
        return self.fc(x.view(x.size(0), -1))


class Concat(nn.Module):
    """Two branches and the (unprunable) input concatenated along channels, then a transposed Conv1d path."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 12, 1)
        self.c, self.fc = nn.Conv2d(23, 16, 3, padding=1), nn.Linear(16, 10)

    def forward(self, x):
        x = torch.cat([F.relu(self.a(x)), x, F.relu(self.b(x))], dim=1)
        return self.fc(F.relu(self.c(x)).amax((-1, -2)))


class UpConv(nn.Module):
    """A transposed convolution (weight laid out (in, out, k, k)) between two convolutions."""

    def __init__(self):
        super().__init__()
        self.down, self.up = nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(F.relu(self.up(F.relu(self.down(x)))))


class LayerNorm2d(nn.LayerNorm):
    """ConvNeXt-style: a LayerNorm subclass calling F.layer_norm over channels-last data (traced through by fx)."""

    def forward(self, x):
        x = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class LayerScaleBlock(nn.Module):
    """A residual block with a layer-scale parameter gamma (16, 1, 1) multiplying the branch."""

    def __init__(self):
        super().__init__()
        self.stem, self.norm = nn.Conv2d(3, 16, 3, padding=1), LayerNorm2d(16)
        self.expand, self.project = nn.Conv2d(16, 32, 1), nn.Conv2d(32, 16, 1)
        self.gamma = nn.Parameter(torch.rand(16, 1, 1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.norm(self.stem(x))
        x = x + self.gamma * self.project(F.gelu(self.expand(x)))
        return self.fc(x.mean((2, 3)))


class Chunky(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 16, 3), nn.Conv2d(8, 4, 1)

    def forward(self, x):
        a, b = self.conv(x).chunk(2, dim=1)
        return self.head(a * b)


def kept_channels(original, pruned):
    """Which output channels each biased layer kept (biases are distinct random numbers)."""
    out = {}
    for name, m in original.named_modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)) and m.bias is not None:
            out[name] = [int((m.bias == b).nonzero()[0]) for b in pruned.get_submodule(name).bias]
    return out


def zero_dropped(original, pruned):
    """The original model with the pruned channels' weights and biases zeroed: for models without normalization
    layers (ReLU(0) = 0), it must compute what the pruned model computes."""
    ref = copy.deepcopy(original)
    with torch.no_grad():
        for name, keep in kept_channels(original, pruned).items():
            m = ref.get_submodule(name)
            drop = [i for i in range(m.bias.numel()) if i not in keep]
            if isinstance(m, nn.ConvTranspose2d):
                m.weight[:, drop] = 0
            else:
                m.weight[drop] = 0
            m.bias[drop] = 0
    return ref


# ------------------------------------------------------------------------------------------------------ unstructured

def test_magnitude_prune_exact_and_monotone():
    layer = nn.Linear(64, 32)
    w = layer.weight.detach().clone()
    P.magnitude_prune(layer, 0.3)
    mask = P.get_mask(layer)
    k = round(0.3 * w.numel())
    assert int((~mask).sum()) == k and int((layer.weight == 0).sum()) == k
    assert w.abs()[~mask].max() <= w.abs()[mask].min()  # exactly the k smallest magnitudes
    assert torch.equal(layer.weight, torch.where(mask, w, 0))
    before = mask.clone()
    P.magnitude_prune(layer, 0.1)  # lower amount: masks only grow, nothing revives
    assert torch.equal(P.get_mask(layer), before)
    P.magnitude_prune(layer, 0.6)
    assert int((~P.get_mask(layer)).sum()) == round(0.6 * w.numel()) and not (P.get_mask(layer) & ~before).any()
    conv = nn.Conv2d(4, 8, 3)
    P.magnitude_prune(conv, 1.0)
    assert not conv.weight.any() and conv(torch.randn(1, 4, 5, 5)).shape == (1, 8, 3, 3)


def test_global_vs_per_layer_amount():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    with torch.no_grad():
        model[2].weight.mul_(10)  # the second layer's weights are larger: global pruning spares it
    per_layer = P.magnitude_prune(copy.deepcopy(model), 0.5)
    report = P.sparsity_report(per_layer)
    assert report["0"] == 0.5 and report["2"] == 0.5 and report.global_sparsity == 0.5
    glob = P.global_magnitude_prune(copy.deepcopy(model), 0.5)
    report = P.sparsity_report(glob)
    assert report.zeros == round(0.5 * (64 * 32 + 32 * 16)) and report.global_sparsity == 0.5
    assert report["0"] > 0.6 and report["2"] < 0.1
    assert "global" in str(report) and report.layers["0"].masked
    only = P.global_magnitude_prune(copy.deepcopy(model), 0.25, names=["2"])
    assert P.get_mask(only[0]) is None and P.sparsity_report(only)["2"] == 0.25
    filt = P.global_magnitude_prune(copy.deepcopy(model), 0.25, filter_fn=lambda m, name: name == "0")
    assert P.get_mask(filt[2]) is None and P.sparsity_report(filt)["0"] == 0.25


def test_masks_hold_through_optimizer_steps(one_thread):
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # built before pruning: still valid
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    for _ in range(2):  # some optimizer state (Adam moments) for the soon-pruned weights
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    P.global_magnitude_prune(model, 0.7)
    masks = {n: P.get_mask(model.get_submodule(n)).clone() for n in ("0", "2", "4")}
    originals = [model.get_submodule(n).parametrizations.weight.original for n in masks]
    assert all(any(o is p for group in opt.param_groups for p in group["params"]) for o in originals)
    sgd = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    for step in range(6):
        o = opt if step % 2 else sgd
        o.zero_grad()
        F.cross_entropy(model(x), y).backward()
        for n, mask in masks.items():
            assert not model.get_submodule(n).parametrizations.weight.original.grad[~mask].any()
        o.step()
    for n, mask in masks.items():
        w = model.get_submodule(n).weight
        assert not w[~mask].any() and w[mask].count_nonzero() > 0.99 * mask.sum()
    assert P.sparsity_report(model).global_sparsity >= 0.7


def test_state_dict_round_trip_and_make_permanent(tmp_path):
    model = mlp()
    P.magnitude_prune(model, 0.4)
    x = torch.randn(8, 64)
    expected = model(x)
    state = model.state_dict()
    assert "0.parametrizations.weight.0.mask" in state and state["0.parametrizations.weight.0.mask"].dtype == torch.bool
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    fresh = mlp(seed=1)  # never pruned
    P.load_pruned_state_dict(fresh, torch.load(buf))
    assert torch.equal(fresh(x), expected)
    assert torch.equal(P.get_mask(fresh[2]), P.get_mask(model[2]))
    again = P.magnitude_prune(mlp(seed=2), 0.9)
    again.load_state_dict(state)  # an already-pruned model takes the state dict as it is
    assert torch.equal(again(x), expected)
    weight = fresh[0].parametrizations.weight.original
    P.make_permanent(fresh)
    assert fresh[0].weight is weight and type(fresh[0]) is nn.Linear
    assert set(fresh.state_dict()) == set(mlp().state_dict())
    assert torch.equal(fresh(x), expected)
    assert P.sparsity_report(fresh)["0"] == pytest.approx(0.4, abs=1e-3)
    torch.save(fresh, tmp_path / "model.pt")  # an ordinary module again: pickles whole
    assert P.remove is P.make_permanent


def test_torch_compile_follows_masks(one_thread):
    model = mlp()
    P.global_magnitude_prune(model, 0.5)
    compiled = torch.compile(model, fullgraph=True)  # inductor, inference
    x = torch.randn(8, 64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))
        P.global_magnitude_prune(model, 0.8)  # masks updated in place: the compiled model follows
        torch.testing.assert_close(compiled(x), model(x))
    # training through the parametrization (aot_eager: the same graph capture and autograd, no C++ code generation,
    # which takes a minute on a cold cache)
    trained = torch.compile(model, fullgraph=True, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    trained(x).square().sum().backward()
    opt.step()
    assert P.sparsity_report(model).global_sparsity >= 0.8
    torch.testing.assert_close(trained(x), model(x))


# ----------------------------------------------------------------------------------------------------- 2:4 sparsity

def test_2_4_masks():
    torch.manual_seed(0)
    w = torch.randn(16, 64)
    mask = P.nm_mask(w)
    groups, gmask = w.abs().reshape(16, 16, 4), mask.reshape(16, 16, 4)
    assert (gmask.sum(-1) == 2).all()
    kept_min = groups.masked_fill(~gmask, float("inf")).amin(-1)
    dropped_max = groups.masked_fill(gmask, -1.0).amax(-1)
    assert (kept_min >= dropped_max).all()  # the 2 largest of every 4
    ties = torch.ones(2, 8)
    assert P.nm_mask(ties).tolist() == [[True, True, False, False] * 2] * 2  # ties: the earlier entries
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 30), nn.ReLU(), nn.Linear(30, 4))
    P.magnitude_prune(model[0], 0.7)  # an existing mask is respected: groups may keep fewer than 2
    old = P.get_mask(model[0]).clone()
    skipped = P.semi_structured_prune(model)
    assert set(skipped) == {"4"} and "multiple of 4" in skipped["4"]
    assert P.is_nm_sparse(model[0].weight) and P.is_nm_sparse(model[2].weight)
    assert not (P.get_mask(model[0]) & ~old).any()
    assert (P.get_mask(model[2]).reshape(30, 8, 4).sum(-1) == 2).all()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)  # fine-tuning keeps the pattern
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 64)).sum().backward()
        opt.step()
    assert P.is_nm_sparse(model[2].weight)
    conv = nn.Conv2d(4, 8, 3)  # flattened in_channels * kernel = 36
    P.nm_prune(conv, 1, 4, layer_types=(nn.Conv2d,))
    assert P.is_nm_sparse(conv.weight, 1, 4) and P.sparsity_report(conv).global_sparsity == 0.75
    with pytest.raises(ValueError, match="not a multiple of m=4"):
        P.nm_mask(torch.randn(4, 6))
    with pytest.raises(ValueError, match="n must be <= m"):
        P.nm_prune(model, 5, 4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without a GPU")
def test_to_semi_structured_refuses_without_gpu():
    model = nn.Sequential(nn.Linear(64, 64))
    P.semi_structured_prune(model)
    assert "CUDA" in P.semi_structured_unsupported()
    with pytest.raises(RuntimeError, match="to_semi_structured: .*needs an NVIDIA GPU"):
        P.to_semi_structured(model)


def test_to_semi_structured_skips_layers_it_cannot_convert(monkeypatch):
    """The per-layer checks, reached on any machine by pretending the GPU check passed."""
    monkeypatch.setattr(P.semi_structured, "semi_structured_unsupported", lambda device=None: None)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    summary = P.to_semi_structured(model)
    assert not summary.converted and "not on a CUDA device" in summary.skipped["1"]
    assert "0 of 2 Linear layers converted" in str(summary)
    with pytest.raises(ValueError, match="to_semi_structured: layer '0': weight is on cpu"):
        P.to_semi_structured(model, strict=True)


@pytest.mark.cuda
def test_to_semi_structured_on_gpu():
    why = P.semi_structured_unsupported()
    if why is not None:
        pytest.skip(why)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 10))
    model = model.half().cuda().eval()
    skipped = P.semi_structured_prune(model)
    assert not skipped
    x = torch.randn(64, 128, device="cuda", dtype=torch.half)
    with torch.no_grad():
        dense = model(x)
    summary = P.to_semi_structured(model)
    assert summary.converted == ["0", "2"] and "4" in summary.skipped  # (10, 64) is below the kernel tile
    assert isinstance(model[0].weight, torch.sparse.SparseSemiStructuredTensor)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense, atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="layer '4'"):
        P.to_semi_structured(model, strict=True, filter_fn=lambda m, name: name == "4")
    fp32 = nn.Sequential(nn.Linear(128, 128)).cuda()
    assert "float16 or bfloat16" in P.to_semi_structured(fp32, prune=True).skipped["0"]


# ---------------------------------------------------------------------------------------------------------- schedule

def test_gradual_pruner_follows_cubic_schedule_and_resumes(one_thread):
    s_i, s_f, t0, t1, dt = 0.1, 0.8, 4, 24, 5
    model = mlp()
    pruner = P.GradualPruner(model, s_f, t0, t1, dt, initial_sparsity=s_i)
    numel = sum(model[i].weight.numel() for i in (0, 2, 4))
    seen = {}
    for t in range(30):
        target = pruner.step()
        if target is not None:
            seen[t] = target
            assert P.sparsity_report(model).zeros == round(target * numel)
    n = (t1 - t0) // dt
    assert list(seen) == [t0 + i * dt for i in range(n + 1)]
    for t, s in seen.items():
        assert s == pytest.approx(s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** 3)
    assert pruner.sparsity_at(0) == 0.0 and pruner.sparsity_at(100) == s_f
    assert seen[t0] == pytest.approx(s_i) and seen[t1] == pytest.approx(s_f)
    # resume half way: a fresh model + pruner, the saved model and pruner states -> the same end state
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))

    def train(model, pruner, steps):
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            pruner.step()

    straight = mlp()
    sp = P.GradualPruner(straight, 0.6, 2, 12, 3, scope="layer")
    train(straight, sp, 7)
    model_state, pruner_state = copy.deepcopy(straight.state_dict()), sp.state_dict()
    train(straight, sp, 9)
    resumed = mlp(seed=5)
    rp = P.GradualPruner(resumed, 0.6, 2, 12, 3, scope="layer")
    resumed.load_state_dict(model_state)
    rp.load_state_dict(pruner_state)
    train(resumed, rp, 9)
    assert rp.step_count == sp.step_count == 16 and rp.current_sparsity == 0.6
    for i in (0, 2, 4):
        assert torch.equal(P.get_mask(resumed[i]), P.get_mask(straight[i]))
        assert P.sparsity_report(resumed)[str(i)] == pytest.approx(0.6, abs=1e-3)
    with pytest.warns(UserWarning, match="differs"):
        P.GradualPruner(mlp(), 0.5, 2, 12, 3).load_state_dict(pruner_state)


# -------------------------------------------------------------------------------------------------------- structured

def test_channel_prune_small_cnn():
    torch.manual_seed(0)
    model = SmallCNN()
    model.train()
    model(torch.randn(8, 3, 8, 8))  # some BatchNorm statistics
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    same = P.channel_prune(model, 0.0, x)
    assert torch.equal(same(x), model(x)) and P.count_parameters(same) == P.count_parameters(model)
    small = P.channel_prune(model, 0.5, x)
    assert (small.conv1.out_channels, small.bn1.num_features, small.conv2.in_channels) == (8, 8, 8)
    assert (small.conv2.out_channels, small.bn2.num_features, small.fc.in_features) == (16, 16, 16)
    assert small.fc.out_features == 10 and small(x).shape == (4, 10)
    assert P.count_parameters(small) < 0.35 * P.count_parameters(model)
    keep = kept_channels(model, small)["conv1"]  # BatchNorm statistics follow their channels
    assert torch.equal(small.bn1.running_var, model.bn1.running_var[keep])
    l1 = model.conv1.weight.abs().sum((1, 2, 3))  # the channels of largest L1 norm are the ones kept
    assert sorted(keep) == sorted(l1.topk(8).indices.tolist())
    small.train()
    F.cross_entropy(small(x), torch.tensor([0, 1, 2, 3])).backward()  # still trains
    assert model.conv1.out_channels == 16  # not inplace: the original is untouched
    groups = P.channel_groups(model, x)
    assert [g.layers for g in groups] == [["conv1"], ["conv2"], ["fc"]]
    assert groups[0].consumers == ["bn1", "conv2"] and "model output" in groups[2].blocked[0]


def test_channel_prune_mlp_and_layernorm():
    model = mlp()
    x = torch.randn(5, 64)
    assert torch.equal(P.channel_prune(model, 0.0, x)(x), model(x))
    small = P.channel_prune(model, 0.5, x, round_to=8)
    assert [small[i].out_features for i in (0, 2, 4)] == [64, 48, 10]
    torch.testing.assert_close(small(x), zero_dropped(model, small)(x))
    odd = P.channel_prune(model, 0.3, x, round_to=8)
    assert [odd[i].out_features for i in (0, 2)] == [96, 72]  # 128 - 38 = 90 -> 96, 96 - 29 = 67 -> 72
    tokens = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.GELU(), nn.Linear(32, 8))
    small = P.channel_prune(tokens, 0.5, torch.randn(2, 7, 16))
    assert small[1].normalized_shape == (16,) and small[1].weight.shape == (16,) and small[3].in_features == 16
    assert small(torch.randn(3, 5, 16)).shape == (3, 5, 8)


@pytest.mark.parametrize("cls", [Residual, Separable, Concat, UpConv])
def test_channel_prune_follows_channels_exactly(cls):
    """Residual add (coupled group), depthwise conv with multiplier 2 + flatten of 4x4 maps into a Linear, concat
    with the unprunable input, a transposed convolution: the pruned model computes exactly what the original does
    with the pruned channels zeroed."""
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(2, 3, 8, 8)
    types = (*P.structured.PRODUCER_TYPES, nn.ConvTranspose2d)
    assert torch.equal(P.channel_prune(model, 0.0, x, layer_types=types)(x), model(x))
    small = P.channel_prune(model, 0.5, x, layer_types=types)
    assert P.count_parameters(small) < 0.6 * P.count_parameters(model)
    torch.testing.assert_close(small(x), zero_dropped(model, small)(x), atol=1e-5, rtol=1e-5)
    if cls is Residual:
        groups = {tuple(g.layers): g for g in P.channel_groups(model, x)}
        assert ("stem", "b") in groups and groups[("stem", "b")].prunable
        assert kept_channels(model, small)["stem"] == kept_channels(model, small)["b"]
        assert small.stem.out_channels == small.b.out_channels == small.a.in_channels == 8
    if cls is Separable:
        assert (small.dw.in_channels, small.dw.groups, small.dw.out_channels, small.fc.in_features) == (8, 8, 16,
                                                                                                        12 * 16)
    if cls is UpConv:
        assert (small.down.out_channels, small.up.in_channels, small.up.out_channels, small.head.in_channels) == (
            8, 8, 4, 4)


def test_channel_prune_functional_layer_norm_and_layer_scale():
    torch.manual_seed(0)
    model = LayerScaleBlock().eval()
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(P.channel_prune(model, 0.0, x)(x), model(x))
    groups = {tuple(g.layers): g for g in P.channel_groups(model, x)}
    assert groups[("stem", "project")].prunable and "norm.weight" in groups[("stem", "project")].consumers
    small = P.channel_prune(model, 0.5, x)
    assert small.norm.normalized_shape == (8,) and small.norm.weight.shape == (8,) and small.gamma.shape == (8, 1, 1)
    assert (small.expand.in_channels, small.expand.out_channels, small.fc.in_features) == (8, 16, 8)
    keep = kept_channels(model, small)["stem"]
    assert torch.equal(small.gamma, model.gamma[keep]) and keep == kept_channels(model, small)["project"]
    assert small(x).shape == (2, 10)


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_channel_prune_torchvision(arch, one_thread):
    """Residual stages with downsampling shortcuts; depthwise convs, squeeze-excitation gating and Hardswish."""
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    model = getattr(models, arch)(num_classes=10).eval()
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(P.channel_prune(model, 0.0, x)(x), model(x))
    groups = P.channel_groups(model, x)
    assert [g.layers for g in groups if not g.prunable] == [["fc" if arch == "resnet18" else "classifier.3"]]
    small = P.channel_prune(model, 0.5, x)
    assert P.count_parameters(small) < 0.3 * P.count_parameters(model)
    assert small(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_channel_prune_refuses_what_it_cannot_follow():
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(PruningError, match=r"'conv' flow into Tensor.chunk\(\) \(fx node 'chunk'\)"):
        P.channel_prune(Chunky(), 0.5, x)
    kept = P.channel_prune(Chunky(), 0.5, x, strict=False)  # left whole, and listed
    assert kept.conv.out_channels == 16 and kept(x).shape == (1, 4, 6, 6)
    assert "chunk" in P.channel_groups(Chunky(), x)[0].blocked[0]
    assert P.channel_prune(Chunky(), 0.5, x, ignore=["conv"]).conv.out_channels == 16
    grouped = nn.Sequential(nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 3, groups=2))
    with pytest.raises(PruningError, match=r"'0' flow into Conv2d '1'.*grouped convolution"):
        P.channel_prune(grouped, 0.5, x)
    gn = nn.Sequential(nn.Conv2d(3, 8, 1), nn.GroupNorm(2, 8), nn.Conv2d(8, 4, 1))
    with pytest.raises(PruningError, match="GroupNorm '1'"):
        P.channel_prune(gn, 0.5, x)
    heads = nn.Sequential(nn.Linear(8, 16), nn.Unflatten(-1, (4, 4)), nn.Flatten(), nn.Linear(16, 2))
    with pytest.raises(PruningError, match="Unflatten"):
        P.channel_prune(heads, 0.5, torch.randn(2, 8))

    class AddInput(nn.Module):  # a residual add with the model input: that group can never be pruned
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 3, 1), nn.Conv2d(3, 2, 1)

        def forward(self, x):
            return self.head(self.conv(x) + x)

    small = P.channel_prune(AddInput(), 0.5, x)
    assert small.conv.out_channels == 3 and "cannot be pruned" in P.channel_groups(AddInput(), x)[0].blocked[0]
    masked = P.magnitude_prune(SmallCNN(), 0.5)
    with pytest.raises(PruningError, match="make_permanent"):
        P.channel_prune(masked, 0.5, x)


@pytest.mark.parametrize("fn", ["magnitude_prune", "global_magnitude_prune", "channel_prune"])
@pytest.mark.parametrize("amount", [-0.1, 1.5, float("nan")])
def test_bad_amount(fn, amount):
    args = (torch.randn(2, 64),) if fn == "channel_prune" else ()
    with pytest.raises(ValueError, match=f"{fn}: amount must be in"):
        getattr(P, fn)(mlp(), amount, *args)


def test_bad_input_names_the_argument():
    with pytest.raises(TypeError, match="amount must be a float"):
        P.magnitude_prune(mlp(), "half")
    with pytest.raises(ValueError, match="names lists layers .* \\['9'\\]"):
        P.global_magnitude_prune(mlp(), 0.5, names=["0", "9"])
    with pytest.raises(TypeError, match="module ReLU has no tensor named 'weight'"):
        P.magnitude_prune(nn.ReLU(), 0.5, layer_types=(nn.ReLU,))
    with pytest.raises(ValueError, match="has no Linear/Conv2d layer"):
        P.magnitude_prune(nn.Sequential(nn.ReLU()), 0.5)
    with pytest.raises(TypeError, match="layer_types must be"):
        P.global_magnitude_prune(mlp(), 0.5, layer_types=(int,))
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        P.sparsity_report(object())
    with pytest.raises(ValueError, match="ignore names modules the model does not have: \\['fc9'\\]"):
        P.channel_prune(mlp(), 0.5, torch.randn(2, 64), ignore=["fc9"])
    with pytest.raises(TypeError, match="example_inputs must be"):
        P.channel_prune(mlp(), 0.5, None)
    with pytest.raises(ValueError, match="round_to must be"):
        P.channel_prune(mlp(), 0.5, torch.randn(2, 64), round_to=0)
    with pytest.raises(ValueError, match="final_sparsity must be in"):
        P.GradualPruner(mlp(), 1.2, 0, 10)
    with pytest.raises(ValueError, match="initial_sparsity .* must be <= final_sparsity"):
        P.GradualPruner(mlp(), 0.5, 0, 10, initial_sparsity=0.6)
    with pytest.raises(ValueError, match="end_step \\(5\\) must be >= start_step \\(10\\)"):
        P.GradualPruner(mlp(), 0.5, 10, 5)
    with pytest.raises(ValueError, match="frequency must be"):
        P.GradualPruner(mlp(), 0.5, 0, 10, frequency=0)
    with pytest.raises(ValueError, match="scope must be"):
        P.GradualPruner(mlp(), 0.5, 0, 10, scope="row")


# ---------------------------------------------------------------------------------------------------------- accuracy

@pytest.fixture
def one_thread():
    """Tiny models: threads only add overhead (20x slower training on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_digits_accuracy_after_pruning(one_thread):
    """A small MLP trained on scikit-learn's 8x8 digits: 50% global unstructured pruning plus a short fine-tune stays
    within 2 points of float accuracy; 50% channel pruning plus a fine-tune gives a 2.8x smaller model that still
    works."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    train, test = perm[:1400], perm[1400:]

    def fit(model, epochs, lr=3e-3):
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        for _ in range(epochs):
            for idx in train.split(128):
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
        model.eval()
        return model

    def accuracy(m):
        with torch.no_grad():
            return (m(x[test]).argmax(1) == y[test]).float().mean().item() * 100

    model = fit(mlp(), 60)
    base = accuracy(model)
    assert base > 94
    sparse = P.global_magnitude_prune(copy.deepcopy(model), 0.5)
    one_shot = accuracy(sparse)
    fit(sparse, 10, lr=1e-3)
    tuned = accuracy(sparse)
    assert P.sparsity_report(sparse).global_sparsity == 0.5
    assert tuned >= base - 2.0, f"float {base:.2f}%, 50% sparse {one_shot:.2f}% -> fine-tuned {tuned:.2f}%"
    small = P.channel_prune(model, 0.5, x[:2])
    params = (P.count_parameters(model), P.count_parameters(small))
    fit(small, 20, lr=1e-3)
    pruned = accuracy(small)
    assert params[1] < params[0] / 2.5
    assert pruned >= base - 3.0, (f"float {base:.2f}% ({params[0]} parameters), channel-pruned 50% + fine-tune "
                                  f"{pruned:.2f}% ({params[1]} parameters)")
