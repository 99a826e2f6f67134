"""Quantization-aware training: prepare_qat / convert round trip, the QAT model's forward against the converted
model's, learned (LSQ) scales written into the quantized modules, saving and loading after convert, int4 accuracy
recovered by QAT on scikit-learn's digits; int8 weight-only and static int8 QAT (observed, frozen or learned input
scales; QATLinear and QATConv2d), their refusals, and static int8 QAT of a digits CNN."""
import copy

import pytest
import torch
from torch import nn

from mltoolkit import ops
from mltoolkit.quantization import (
    Int4Linear,
    Int4WeightOnlyConfig,
    Int8Conv2d,
    Int8DynamicActivationInt8WeightConfig,
    Int8Linear,
    Int8StaticActivationInt8WeightConfig,
    Int8StaticLinear,
    Int8WeightOnlyConfig,
    Int8WeightOnlyLinear,
    QATConv2d,
    QATLinear,
    QuantConfig,
    convert,
    freeze_observers,
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


def _digits(images: bool = False):
    """scikit-learn's 8x8 digits scaled to [0, 1] (as 1x8x8 images when asked): x, y, train and test indices."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    if images:
        x = x.reshape(-1, 1, 8, 8)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    return x, torch.tensor(digits.target), perm[:1400], perm[1400:]


def _fit(model, data, epochs, lr, seed=0):
    x, y, train, _ = data
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in train.split(128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def _accuracy(model, data):
    x, y, _, test = data
    with torch.no_grad():
        return (model(x[test]).argmax(1) == y[test]).float().mean().item() * 100


DEAD_PIXELS = [0, 32, 39]  # blank in every one of the 1797 digits images


def test_digits_int4_qat_recovers_ptq_loss():
    """int4 weight-only PTQ, then QAT recovering to within 1.5 points of float, on scikit-learn's 8x8 digits.

    At group 32 int4 PTQ is lossless on the plain MLP (tests/test_quantization.py), so this network is made to
    carry what hurts min-max int4 in real models: large weights that do not matter. Its first layer has weights of
    6 on the three pixels that are blank in every image; they never receive a gradient, so the float model is
    unaffected, but with group_size 64 (a whole row per group) they stretch every row's min-max range and PTQ loses
    accuracy. QAT (10 epochs from the float model, min-max quantizers recomputed at every step) teaches the other
    weights to live on that coarse grid."""
    data = _digits()
    x = data[0]
    assert bool((x[:, DEAD_PIXELS] == 0).all())

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        model[0].weight[:, DEAD_PIXELS] = 6.0 * torch.randn(64, len(DEAD_PIXELS)).sign()
    _fit(model, data, 60, 3e-3, 0)
    config = Int4WeightOnlyConfig(group_size=64)
    ptq = copy.deepcopy(model)
    quantize_(ptq, config, verbose=False)
    qat = prepare_qat(copy.deepcopy(model), config)
    _fit(qat, data, 10, 1e-3, 1)
    convert(qat)
    assert isinstance(qat[0], Int4Linear) and isinstance(qat[2], Int4Linear)
    base, ptq_acc, qat_acc = _accuracy(model, data), _accuracy(ptq, data), _accuracy(qat, data)
    msg = f"float {base:.2f}%, int4 g64 PTQ {ptq_acc:.2f}%, int4 g64 QAT {qat_acc:.2f}%"
    print(msg)
    assert base > 94, msg
    assert ptq_acc < base - 1.5, "the setting must make PTQ lose accuracy: " + msg
    assert qat_acc >= base - 1.5 and qat_acc > ptq_acc, msg


# ---- int8 weight-only and static int8 (Linear and Conv2d) ----------------------------------------------------------

WO = Int8WeightOnlyConfig()
STATIC = Int8StaticActivationInt8WeightConfig()
STATIC_MA = Int8StaticActivationInt8WeightConfig("moving_average", averaging_constant=0.5)


def small_cnn(seed=0):
    """The digits CNN of tests/test_quantization_static.py (1x8x8 images)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10))


CNN_LAYERS = (0, 2, 6, 8)


def calibration_pass(model, data):
    """Training-mode forwards without gradients: what the static QAT observers watch."""
    model.train()
    with torch.no_grad():
        for batch in data:
            model(batch)


def images(n, seed):
    return torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("learn", [False, True], ids=["observed", "lsq"])
@pytest.mark.parametrize("config", [WO, STATIC, STATIC_MA], ids=["weight_only", "static_minmax", "static_ma"])
def test_int8_weight_only_and_static_prepare_convert(config, learn):
    model, ptq = small_cnn(), small_cnn()
    data = [images(8, i) for i in range(3)]
    prepare_qat(model, config, learn_scales=learn)
    static = isinstance(config, Int8StaticActivationInt8WeightConfig)
    want = {0: QATConv2d, 2: QATConv2d, 6: QATLinear, 8: QATLinear} if static else {6: QATLinear, 8: QATLinear}
    for i in CNN_LAYERS:
        assert type(model[i]) is want.get(i, nn.Conv2d)
    if static:
        calibration_pass(model, data)
        if config.observer == "minmax":
            first = torch.cat(data).abs().max()
        else:  # moving averages of the batches' min and max, constant 0.5
            mn, mx = data[0].min(), data[0].max()
            for d in data[1:]:
                mn, mx = mn + 0.5 * (d.min() - mn), mx + 0.5 * (d.max() - mx)
            first = torch.maximum(mn.abs(), mx.abs())
        assert model[0].input_scale.item() == pytest.approx(first.item() / 127, rel=1e-6)
        assert freeze_observers(model) == 4 and model[2].observer_frozen
        assert isinstance(model[0].input_scale, nn.Parameter) == learn
    model.eval()
    x = images(5, 9)
    y_qat = model(x)
    layer_inputs, layer_outputs = {}, {}

    def keep(i):
        def hook(_m, inp, out):
            layer_inputs[i], layer_outputs[i] = inp[0], out.detach()
        return hook

    hooks = [model[i].register_forward_hook(keep(i)) for i in want]
    model(x)
    for h in hooks:
        h.remove()
    for i in want:  # the weight QAT trains against is bit-identical to PTQ's
        w = ptq[i].weight.detach()
        wq, ws = ops.quantize_per_channel(w.reshape(w.shape[0], -1))
        assert torch.equal(model[i].fake_quantized_weight().detach(), (wq.float() * ws[:, None]).reshape(w.shape))
    scales = {i: model[i].input_scale.item() for i in want} if static else {}
    convert(model)
    if static:
        quantize_(ptq, config, calibration_data=data, verbose=False)
    else:
        quantize_(ptq, config, verbose=False)
    for i in CNN_LAYERS:
        assert type(model[i]) is type(ptq[i])
    for i in want:
        for (k, a), (k2, b) in zip(model[i].state_dict().items(), ptq[i].state_dict().items()):
            # the layers after the first see QAT's fake-quantized activations while calibrating, PTQ's float ones
            assert k == k2 and (k == "input_scale" and i != 0 or torch.equal(a, b)), (i, k)
        if static:
            assert model[i].input_scale.item() == scales[i]
        # each converted layer on the QAT layer's own input: the same output up to float summation order
        assert_close(model[i](layer_inputs[i]), layer_outputs[i], atol=2e-5, rtol=1e-5, name=f"layer {i}")
    assert_close(model(x), y_qat, atol=1e-4, rtol=1e-4, name="QAT forward vs converted")
    assert model._mltk_quantization == ptq._mltk_quantization


def test_static_qat_training_freezing_learned_scales_save_load(tmp_path):
    torch.manual_seed(1)
    x = images(64, 1)
    target = small_cnn(seed=5)(x).detach().argmax(1)
    model = small_cnn()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    prepare_qat(model, STATIC_MA, learn_scales=True, freeze_observers_after=3)
    opt.add_param_group({"params": [p for n, p in model.named_parameters() if "scale" in n], "lr": 1e-3})
    model.train()
    losses, observed = [], None
    for step in range(25):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step == 2:  # frozen after 3 observed batches: the learned scale starts from the observer's
            assert all(model[i].observer_frozen and int(model[i].observer.batches) == 3 for i in CNN_LAYERS)
            observed = model[0].observer.scale()
    assert losses[-1] < 0.8 * losses[0], losses
    assert int(model[0].observer.batches) == 3, "a frozen observer watches no more"
    assert model[0].input_scale.item() != observed.item(), "the input scales learned"
    model.eval()
    y_qat = model(x).detach()
    learned = {i: model[i].input_scale.detach().clone() for i in CNN_LAYERS}
    fq = {i: model[i].fake_quantized_weight().detach() for i in CNN_LAYERS}
    state = copy.deepcopy(model.state_dict())  # a QAT checkpoint keeps the frozen flags
    again = prepare_qat(small_cnn(seed=2), STATIC_MA, learn_scales=True)
    again.load_state_dict(state)
    assert again[2].observer_frozen and torch.equal(again.eval()(x), y_qat)
    convert(model)
    assert isinstance(model[0], Int8Conv2d) and isinstance(model[8], Int8StaticLinear)
    for i in CNN_LAYERS:
        assert model[i].input_scale.item() == learned[i].item()
        wq = model[i].weight_int8.float() * model[i].weight_scale.reshape(-1, *[1] * (fq[i].dim() - 1))
        assert torch.equal(wq, fq[i]), "convert writes the learned weight quantizer exactly"
    assert_close(model(x), y_qat, atol=1e-4, rtol=1e-4, name="trained QAT forward vs converted")
    path = tmp_path / "qat_static.safetensors"
    save_quantized(model, path)
    restored = load_quantized(small_cnn(seed=3), path)
    assert torch.equal(restored(x), model(x))
    report = quantization_report(small_cnn(), model, (x,))
    assert set(report.layers) == {"0", "2", "6", "8"}


def test_weight_only_qat_trains():
    torch.manual_seed(1)
    x = torch.randn(256, 64)
    target = mlp(seed=5)(x).detach().argmax(1)
    model = prepare_qat(mlp(), WO)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses
    y = model(x).detach()
    convert(model)
    assert all(isinstance(model[i], Int8WeightOnlyLinear) for i in (0, 2, 4))
    assert_close(model(x), y, atol=1e-4, rtol=1e-4)


def test_static_qat_refusals_name_the_layer(capsys):
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, groups=2),
                          nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(8 * 36, 5))
    prepare_qat(model, STATIC, verbose=True)
    out = capsys.readouterr().out
    assert "2 of 4 Linear/Conv2d layers prepared" in out
    assert "skipped 1: Int8Conv2d supports groups=1 only" in out
    assert "skipped 2: Int8Conv2d supports padding_mode" in out
    assert isinstance(model[0], QATConv2d) and type(model[1]) is nn.Conv2d and type(model[2]) is nn.Conv2d
    with pytest.raises(RuntimeError, match="input observer has seen no data"):
        model.eval()(torch.randn(2, 4, 8, 8))
    with pytest.raises(RuntimeError, match="freeze_observers: layer '0'"):
        freeze_observers(model)
    with pytest.raises(RuntimeError, match=r"convert: layer '0' \(QATConv2d\): the input observer has seen no data"):
        convert(model)
    assert isinstance(model[0], QATConv2d) and isinstance(model[4], QATLinear), "a failed convert changes nothing"
    fresh = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, groups=2))
    with pytest.raises(ValueError, match=r"overrides\['1'\] = Int8StaticActivationInt8WeightConfig cannot take layer "
                                         r"'1' \(Conv2d\): Int8Conv2d supports groups=1 only"):
        prepare_qat(fresh, WO, overrides={"1": STATIC})
    with pytest.raises(ValueError, match="padding_mode='zeros' only, got padding_mode='circular'"):
        QATConv2d(nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), STATIC)
    with pytest.raises(ValueError, match="pads unevenly"):
        QATConv2d(nn.Conv2d(4, 4, 4, padding="same"), STATIC)
    with pytest.raises(ValueError, match="quantizes Linear layers, not Conv2d"):
        QATConv2d(nn.Conv2d(4, 4, 3), WO)
    with pytest.raises(ValueError, match="freeze_observers_after must be a positive int"):
        prepare_qat(small_cnn(), STATIC, freeze_observers_after=0)
    wo = prepare_qat(small_cnn(), WO)
    assert type(wo[0]) is nn.Conv2d and isinstance(wo[6], QATLinear)  # weight-only leaves convolutions float
    assert freeze_observers(wo) == 0


def test_static_qat_frozen_under_compile():
    """Once frozen, a static QAT layer's forward is plain tensor code (the observer is not consulted)."""
    layer = QATConv2d(nn.Conv2d(1, 4, 3, padding=1), STATIC, learn_scales=True)
    calibration_pass(layer, [images(8, 0)])
    freeze_observers(layer)
    x = images(4, 1)
    eager = layer(x)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True)(x)
    assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


@pytest.mark.cuda
@pytest.mark.parametrize("learn", [False, True], ids=["observed", "lsq"])
def test_static_qat_on_cuda(learn):
    """Static int8 QAT of the CNN on the GPU: observers, freezing, a few training steps, and convert's modules
    computing what the QAT forward computed."""
    model = prepare_qat(small_cnn().cuda(), STATIC_MA, learn_scales=learn, freeze_observers_after=2)
    x = images(32, 0).cuda()
    target = torch.randint(0, 10, (32,), generator=torch.Generator().manual_seed(0)).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), target).backward()
        opt.step()
    assert all(model[i].observer_frozen and model[i].input_scale.is_cuda for i in CNN_LAYERS)
    y_qat = model.eval()(x).detach()
    convert(model)
    assert isinstance(model[0], Int8Conv2d) and model[0].weight_int8.is_cuda
    assert_close(model(x), y_qat, atol=1e-3, rtol=1e-3, name="QAT forward vs converted on CUDA")


@pytest.mark.parametrize("observer,learn,freeze_after", [("moving_average", True, 4), ("minmax", False, None)],
                         ids=["ma_frozen_then_lsq", "minmax_tracking"])
def test_digits_cnn_static_int8_qat_within_one_point_of_float(observer, learn, freeze_after):
    """The digits CNN of tests/test_quantization_static.py trained in float, then fine-tuned with static int8 QAT
    and converted to Int8Conv2d / Int8StaticLinear: within 1 point of the float model's test accuracy. Input scales
    either from moving-average observers frozen after 4 steps, then learned (LSQ), or from min-max observers that
    track the inputs for the whole fine-tuning."""
    data = _digits(images=True)
    x, train = data[0], data[2]

    model = _fit(small_cnn(), data, 15, 3e-3)
    ptq = copy.deepcopy(model)
    quantize_(ptq, Int8StaticActivationInt8WeightConfig(), calibration_data=[x[idx] for idx in train.split(128)[:4]],
              verbose=False)
    qat = prepare_qat(copy.deepcopy(model), Int8StaticActivationInt8WeightConfig(observer, 0.1),
                      learn_scales=learn, freeze_observers_after=freeze_after)
    _fit(qat, data, 3, 5e-4)
    assert all(qat[i].observer_frozen == learn for i in CNN_LAYERS)
    qat_acc_fake = _accuracy(qat, data)
    convert(qat)
    assert isinstance(qat[0], Int8Conv2d) and isinstance(qat[2], Int8Conv2d) and isinstance(qat[6], Int8StaticLinear)
    base, ptq_acc, qat_acc = _accuracy(model, data), _accuracy(ptq, data), _accuracy(qat, data)
    msg = (f"float {base:.2f}%, static int8 PTQ (min-max) {ptq_acc:.2f}%, static int8 QAT ({observer}) {qat_acc:.2f}% "
           f"(fake-quantized {qat_acc_fake:.2f}%)")
    print(msg)
    assert base > 94, msg
    assert qat_acc >= base - 1.0, msg
    assert abs(qat_acc - qat_acc_fake) <= 0.5, msg
