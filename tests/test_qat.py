"""Quantization-aware training: prepare_qat / convert round trip, the QAT model's forward against the converted
model's, learned (LSQ) scales written into the quantized modules, saving and loading after convert, and int4 accuracy
recovered by QAT on scikit-learn's digits."""
import copy

import pytest
import torch
from torch import nn

from mltoolkit import ops
from mltoolkit.quantization import (
    Int4Linear,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8Linear,
    QATLinear,
    QuantConfig,
    convert,
    load_quantized,
    prepare_qat,
    quantization_report,
    quantize_,
    save_quantized,
)
from mltoolkit.testing import assert_close

INT8 = Int8DynamicActivationInt8WeightConfig()
INT4 = Int4WeightOnlyConfig(group_size=32)
CONFIGS = [(INT8, Int8Linear), (INT4, Int4Linear)]
MODULE_OF = {type(INT8): Int8Linear, type(INT4): Int4Linear}


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 10))


def dequantized(module):
    if isinstance(module, Int4Linear):
        return ops.dequantize_int4(module.weight_packed, module.weight_scales, module.weight_zeros, module.group_size)
    return module.weight_int8.float() * module.weight_scale[:, None]


@pytest.mark.parametrize("learn", [False, True], ids=["minmax", "lsq"])
@pytest.mark.parametrize("config,module", CONFIGS, ids=["int8", "int4"])
def test_prepare_convert_matches_ptq(config, module, learn):
    model, ptq = mlp(), mlp()
    x = torch.randn(16, 64)
    prepare_qat(model, config, learn_scales=learn)
    assert all(isinstance(model[i], QATLinear) for i in (0, 2, 4))
    assert model[0].weight is not None and (hasattr(model[0], "weight_scale") == learn)
    y_qat = model(x)
    for i in (0, 2, 4):  # the weight QAT trains against is bit-identical to PTQ's
        assert torch.equal(model[i].fake_quantized_weight(), dequantized(MODULE_OF[type(config)].from_float(
            ptq[i], config)))
    convert(model)
    quantize_(ptq, config, verbose=False)
    for i in (0, 2, 4):
        assert type(model[i]) is module
        for (k, a), (k2, b) in zip(model[i].state_dict().items(), ptq[i].state_dict().items()):
            assert k == k2 and torch.equal(a, b), k
    assert_close(y_qat, model(x), atol=1e-5, rtol=1e-5, name="QAT forward vs converted")
    assert torch.equal(model(x), ptq(x))
    assert model._mltk_quantization == ptq._mltk_quantization


@pytest.fixture(autouse=True)
def one_thread():
    """These networks are far too small to gain from a second thread, and on a loaded 2-core machine every OpenMP
    region with 2 threads waits for a descheduled one (a float MLP step took 300 ms instead of 1.5 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("config", [INT8, INT4], ids=["int8", "int4"])
def test_training_reduces_loss_and_learned_scales_reach_the_quantized_module(config, tmp_path):
    torch.manual_seed(1)
    x = torch.randn(256, 64)
    target = mlp(seed=5)(x).detach().argmax(1)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)  # built before prepare_qat: keeps training the weights
    prepare_qat(model, config, learn_scales=True)
    opt.add_param_group({"params": [p for n, p in model.named_parameters() if "weight_scale" in n or
                                    "weight_offset" in n], "lr": 3e-3})
    start = model[0].weight_scale.detach().clone()
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    assert not torch.equal(model[0].weight_scale, start), "the scales learned"
    qat_fq = [model[i].fake_quantized_weight().detach() for i in (0, 2, 4)]
    y_qat = model(x).detach()
    convert(model)
    for i, w in zip((0, 2, 4), qat_fq):
        assert torch.equal(dequantized(model[i]), w), "convert writes the learned quantizer exactly"
    assert_close(model(x), y_qat, atol=1e-4, rtol=1e-4, name="trained QAT forward vs converted")
    path = tmp_path / "qat.safetensors"
    save_quantized(model, path)
    restored = load_quantized(mlp(seed=3), path)
    assert torch.equal(restored(x), model(x))
    report = quantization_report(mlp(), model, (x,))
    assert set(report.layers) == {"0", "2", "4"}


def test_filter_overrides_unsupported_and_errors():
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 48), nn.Linear(48, 8))
    prepare_qat(model, INT4, overrides={"2": INT8})
    assert isinstance(model[0], QATLinear) and model[2].config == INT8
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 48), nn.Linear(48, 8))
    prepare_qat(model, INT4, filter_fn=lambda m, name: name != "0")
    assert type(model[0]) is nn.Linear and isinstance(model[1], QATLinear)
    assert type(model[2]) is nn.Linear  # 48 is not a multiple of 32
    convert(model)
    assert type(model[0]) is nn.Linear and isinstance(model[1], Int4Linear) and type(model[2]) is nn.Linear
    assert set(model._mltk_quantization) == {"1"}
    with pytest.raises(ValueError, match="no QATLinear"):
        convert(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(ValueError, match="not nn.Linear layers"):
        prepare_qat(nn.Sequential(nn.Linear(64, 8)), INT8, overrides={"missing": INT8})
    with pytest.raises(TypeError, match="must be a QuantConfig"):
        prepare_qat(nn.Sequential(nn.Linear(64, 8)), object())

    class Unknown(QuantConfig):
        pass

    with pytest.raises(TypeError, match="Unknown has no QAT recipe"):
        prepare_qat(nn.Sequential(nn.Linear(64, 8)), Unknown())


def test_qat_model_under_compile():
    model = prepare_qat(mlp(), INT4, learn_scales=True)
    x = torch.randn(8, 64)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)(x)
    assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


DEAD_PIXELS = [0, 32, 39]  # blank in every one of the 1797 digits images


def test_digits_int4_qat_recovers_ptq_loss():
    """int4 weight-only PTQ, then QAT recovering to within 1.5 points of float, on scikit-learn's 8x8 digits.

    At group 32 int4 PTQ is lossless on the plain MLP (tests/test_quantization.py), so this network is made to
    carry what hurts min-max int4 in real models: large weights that do not matter. Its first layer has weights of
    6 on the three pixels that are blank in every image; they never receive a gradient, so the float model is
    unaffected, but with group_size 64 (a whole row per group) they stretch every row's min-max range and PTQ loses
    accuracy. QAT (10 epochs from the float model, min-max quantizers recomputed at every step) teaches the other
    weights to live on that coarse grid."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = perm[:1400], perm[1400:]
    assert bool((x[:, DEAD_PIXELS] == 0).all())

    def fit(model, epochs, lr, seed):
        torch.manual_seed(seed)
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        for _ in range(epochs):
            for idx in train.split(128):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                opt.step()
        return model.eval()

    def accuracy(model):
        with torch.no_grad():
            return (model(x[test]).argmax(1) == y[test]).float().mean().item() * 100

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        model[0].weight[:, DEAD_PIXELS] = 6.0 * torch.randn(64, len(DEAD_PIXELS)).sign()
    fit(model, 60, 3e-3, 0)
    config = Int4WeightOnlyConfig(group_size=64)
    ptq = copy.deepcopy(model)
    quantize_(ptq, config, verbose=False)
    qat = prepare_qat(copy.deepcopy(model), config)
    fit(qat, 10, 1e-3, 1)
    convert(qat)
    assert isinstance(qat[0], Int4Linear) and isinstance(qat[2], Int4Linear)
    base, ptq_acc, qat_acc = accuracy(model), accuracy(ptq), accuracy(qat)
    msg = f"float {base:.2f}%, int4 g64 PTQ {ptq_acc:.2f}%, int4 g64 QAT {qat_acc:.2f}%"
    print(msg)
    assert base > 94, msg
    assert ptq_acc < base - 1.5, "the setting must make PTQ lose accuracy: " + msg
    assert qat_acc >= base - 1.5 and qat_acc > ptq_acc, msg
