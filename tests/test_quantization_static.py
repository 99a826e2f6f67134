"""Static int8 quantization (calibrated per-tensor activation scales) and int8 weight-only quantization: observers
against hand computations, the prepare / calibrate / convert flow and quantize_(..., calibration_data=), Int8Conv2d,
saving and loading, the report, and accuracy on scikit-learn's digits (an MLP and a small CNN)."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mltoolkit.ops.reference import int8 as reference
from mltoolkit.quantization import (
    Int8Conv2d,
    Int8DynamicActivationInt8WeightConfig,
    Int8StaticActivationInt8WeightConfig,
    Int8StaticLinear,
    Int8WeightOnlyConfig,
    Int8WeightOnlyLinear,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    ObservedModule,
    PercentileObserver,
    calibrate,
    config_from_dict,
    convert,
    load_quantized,
    prepare,
    quantization_report,
    quantize_,
    save_quantized,
)
from mltoolkit.testing import sqnr

STATIC = Int8StaticActivationInt8WeightConfig()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread is as fast, and a loaded 2-core machine stalls 2-thread regions (the digits
    training took 100 s instead of 1 s with OMP_NUM_THREADS=2 while a build ran). The kernels' threading is tested in
    tests/ops."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- observers ----------------------------------------------------------------------------------------------------

def test_minmax_and_moving_average_by_hand():
    obs = MinMaxObserver()
    obs(torch.tensor([-1.0, 2.0, 0.5]))
    obs(torch.tensor([[-3.0, 0.5]]))
    assert float(obs.min_val) == -3 and float(obs.max_val) == 2 and obs.threshold() == 3
    assert obs.scale().item() == pytest.approx(3 / 127, rel=1e-7) and obs.scale().dtype == torch.float32
    ma = MovingAverageMinMaxObserver(averaging_constant=0.5)
    ma(torch.tensor([-1.0, 2.0]))
    ma(torch.tensor([-3.0, 4.0]))  # min -1 + 0.5 (-3 + 1) = -2, max 2 + 0.5 (4 - 2) = 3
    ma(torch.tensor([0.0, 1.0]))  # min -2 + 0.5 (0 + 2) = -1, max 3 + 0.5 (1 - 3) = 2
    assert float(ma.min_val) == -1 and float(ma.max_val) == 2 and ma.threshold() == 2
    zero = MinMaxObserver()
    zero(torch.zeros(4))
    assert zero.scale().item() == 1.0  # nothing but zeros: scale 1, never 0
    with pytest.raises(RuntimeError, match="no calibration data"):
        MinMaxObserver().scale()
    with pytest.raises(ValueError, match="inf or nan"):
        MinMaxObserver()(torch.tensor([1.0, math.nan]))
    with pytest.raises(ValueError, match="averaging_constant"):
        MovingAverageMinMaxObserver(0.0)


def test_percentile_by_hand_and_histogram_growth():
    x = torch.arange(1, 10001, dtype=torch.float32) / 10000  # |x| uniform on (0, 1]
    obs = PercentileObserver(percentile=99.0, bins=2048)
    obs(x[:5000])  # range (0, 0.5]: the second half doubles it once, merging bin pairs
    obs(-x[5000:])
    assert float(obs.upper) == pytest.approx(1.0) and float(obs.histogram.sum()) == 10000
    assert obs.threshold() == pytest.approx(0.99, abs=2 / 2048)
    full = PercentileObserver(100.0)
    full(x)
    assert full.threshold() == pytest.approx(1.0, abs=1e-6)
    # growth by a large factor: everything lands in bin 0 of the new range, nothing is lost
    obs = PercentileObserver(50.0, bins=64)
    obs(torch.full((10,), 1e-3))
    obs(torch.tensor([1000.0]))
    assert float(obs.histogram.sum()) == 11 and float(obs.histogram[0]) == 10


def _quant_mse(x, t):
    s = t / 127
    return float(((torch.round(x / s).clamp(-127, 127) * s - x) ** 2).mean())


def test_mse_observer_finds_the_best_clipping():
    # Laplace data (heavy tails): the best 8-bit clipping sits inside the largest values
    torch.manual_seed(0)
    x = torch.distributions.Laplace(0.0, 1.0).sample((200_000,))
    obs = MSEObserver()
    obs(x[:100_000])
    obs(x[100_000:] * 0.5)
    x[100_000:] *= 0.5
    t = obs.threshold()
    amax = float(x.abs().max())
    grid = torch.linspace(1.0, amax, 200)
    best = min(_quant_mse(x, float(g)) for g in grid)
    assert _quant_mse(x, t) <= 1.05 * best
    assert t < amax and _quant_mse(x, t) < _quant_mse(x, amax)
    # the model of the error: expected_error(t) / N close to the measured error at a few thresholds
    for thr in (2.0, 5.0, amax):
        assert float(obs.expected_error(torch.tensor([thr]))[0]) / x.numel() == pytest.approx(_quant_mse(x, thr),
                                                                                            rel=0.15)


@pytest.mark.parametrize("observer", ["minmax", "moving_average", "percentile", "mse"])
def test_each_observer_calibrates_a_layer(observer):
    cfg = Int8StaticActivationInt8WeightConfig(observer=observer, averaging_constant=0.5, percentile=99.9)
    lin = nn.Linear(64, 32)
    data = [torch.randn(16, 64, generator=gen(i)) * (1 + i) for i in range(4)]
    model = nn.Sequential(lin)
    prepare(model, cfg)
    assert isinstance(model[0], ObservedModule)
    assert calibrate(model, data) == 4
    obs = model[0].observer
    allx = torch.cat(data)
    if observer == "minmax":
        want = allx.abs().max() / 127
    elif observer == "moving_average":
        mn, mx = data[0].min(), data[0].max()
        for d in data[1:]:
            mn, mx = mn + 0.5 * (d.min() - mn), mx + 0.5 * (d.max() - mx)
        want = max(abs(mn), abs(mx)) / 127
    elif observer == "percentile":
        want = torch.quantile(allx.abs().flatten().double(), 0.999) / 127
    else:
        want = None
    scale = obs.scale()
    if want is not None:
        tol = 1e-6 if observer != "percentile" else float(allx.abs().max()) / 2048 / 127 * 2
        assert abs(scale.item() - float(want)) <= tol * (1 if observer == "percentile" else float(want))
    convert(model)
    assert isinstance(model[0], Int8StaticLinear) and model[0].input_scale.item() == scale.item()
    x = data[1]
    assert sqnr(lin(x), model(x)) >= 30


# ---- configs ------------------------------------------------------------------------------------------------------

def test_config_round_trip_and_errors():
    cfgs = [Int8WeightOnlyConfig(), STATIC, Int8StaticActivationInt8WeightConfig("percentile", percentile=99.5),
            Int8StaticActivationInt8WeightConfig("mse", bins=512)]
    for cfg in cfgs:
        assert config_from_dict(cfg.to_dict()) == cfg
    assert STATIC.to_dict() == {"type": "Int8StaticActivationInt8WeightConfig", "version": 1, "observer": "minmax",
                                "averaging_constant": 0.01, "percentile": 99.99, "bins": 2048}
    with pytest.raises(ValueError, match="observer must be one of"):
        Int8StaticActivationInt8WeightConfig("kl")
    with pytest.raises(ValueError, match="percentile"):
        Int8StaticActivationInt8WeightConfig(percentile=0)
    with pytest.raises(ValueError, match="newer"):
        config_from_dict({**STATIC.to_dict(), "version": 2})
    assert "groups=1 only" in STATIC.unsupported(nn.Conv2d(4, 4, 3, groups=2))
    assert "padding_mode='zeros' only" in STATIC.unsupported(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    assert "pads unevenly" in STATIC.unsupported(nn.Conv2d(4, 4, 4, padding="same"))
    assert STATIC.unsupported(nn.Conv2d(4, 4, 3, padding="same")) is None
    assert "not Conv2d" in Int8WeightOnlyConfig().unsupported(nn.Conv2d(4, 4, 3))


# ---- modules ------------------------------------------------------------------------------------------------------

def test_static_linear_integer_path_and_sqnr():
    lin = nn.Linear(97, 123)
    x = torch.randn(3, 7, 97, generator=gen(1))
    s = (x.abs().max() / 127).reshape(())
    q = Int8StaticLinear.from_float(lin, STATIC, input_scale=s)
    y = q(x)
    xq = reference.quantize_static(x.reshape(-1, 97), s)
    want = reference.int8_linear(xq, s.expand(21), q.weight_int8, q.weight_scale, lin.bias.detach(), torch.float32)
    assert torch.equal(y.reshape(-1, 123), want)
    assert sqnr(lin(x), y) >= 30
    with pytest.raises(ValueError, match="needs a calibrated input_scale"):
        Int8StaticLinear.from_float(lin, STATIC)
    with pytest.raises(ValueError, match="input_scale must be finite"):
        Int8StaticLinear.from_float(lin, STATIC, input_scale=0.0)


def test_weight_only_linear():
    lin = nn.Linear(256, 100)
    q = Int8WeightOnlyLinear.from_float(lin)
    x = torch.randn(9, 256, generator=gen(2), requires_grad=True)
    y = q(x)
    assert sqnr(lin(x), y) >= 38
    y.sum().backward()
    assert sqnr(lin.weight.detach().sum(0).expand(9, -1), x.grad) >= 38


@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, padding=1), dict(kernel_size=3, stride=2, padding=1),
                                    dict(kernel_size=(3, 5), padding=(0, 2), dilation=(2, 1)),
                                    dict(kernel_size=1, bias=False), dict(kernel_size=3, padding="same"),
                                    dict(kernel_size=2, padding="valid", stride=2)], ids=str)
def test_int8_conv2d(kwargs):
    conv = nn.Conv2d(6, 10, **kwargs)
    x = torch.randn(2, 6, 11, 9, generator=gen(3))
    s = (x.abs().max() / 127).reshape(())
    q = Int8Conv2d.from_float(conv, STATIC, input_scale=s)
    y = q(x)
    want_f = conv(x)
    assert y.shape == want_f.shape and sqnr(want_f, y) >= 30
    cols = reference.im2col_int8(reference.quantize_static(x, s), q.kernel_size, q.stride, q.padding, q.dilation)
    bias = None if conv.bias is None else conv.bias.detach()
    want = reference.int8_linear(cols, s.expand(cols.shape[0]), reference.conv_weight_2d(q.weight_int8),
                                 q.weight_scale, bias, torch.float32)
    assert torch.equal(y.permute(0, 2, 3, 1).reshape(-1, 10), want)
    ycl = q(x.contiguous(memory_format=torch.channels_last))
    assert ycl.is_contiguous(memory_format=torch.channels_last) and torch.equal(ycl, y)


def test_int8_conv2d_refusals_and_compile():
    with pytest.raises(ValueError, match="groups=1 only"):
        Int8Conv2d.from_float(nn.Conv2d(4, 4, 3, groups=2), STATIC, input_scale=1.0)
    with pytest.raises(ValueError, match="padding_mode='zeros' only, got padding_mode='circular'"):
        Int8Conv2d.from_float(nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), STATIC, input_scale=1.0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.Conv2d(8, 8, 3, groups=2),
                          nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(8 * 36, 5))
    summary = quantize_(model, STATIC, calibration_data=[torch.randn(2, 4, 8, 8)], verbose=False)
    assert isinstance(model[0], Int8Conv2d) and isinstance(model[4], Int8StaticLinear)
    assert type(model[1]) is nn.Conv2d and "groups=1 only" in summary.skipped["1"]
    assert type(model[2]) is nn.Conv2d and "padding_mode" in summary.skipped["2"]
    assert "of 4 Linear/Conv2d layers" in str(summary)
    q = model[0]
    x = torch.randn(2, 4, 8, 8)
    torch._dynamo.reset()
    assert torch.equal(torch.compile(q, fullgraph=True)(x), q(x))


# ---- flow, save / load, report ------------------------------------------------------------------------------------

def small_cnn(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 16, 64), nn.ReLU(), nn.Linear(64, 10)).eval()


def test_prepare_calibrate_convert_equals_quantize_():
    data = [torch.randn(8, 1, 8, 8, generator=gen(i)) for i in range(3)]
    a, b = small_cnn(), small_cnn()
    quantize_(a, STATIC, calibration_data=data, verbose=False)
    prepare(b, STATIC)
    for batch in data:  # plain forward calls calibrate too
        b(batch)
    assert convert(b) is b and set(b._mltk_quantization) == {"0", "2", "6", "8"}
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(ValueError, match="calibration_data"):
        quantize_(small_cnn(), STATIC)
    with pytest.raises(ValueError, match="no observers"):
        calibrate(small_cnn(), data)
    with pytest.raises(ValueError, match="no prepared .observed. layers"):
        convert(small_cnn())
    c = prepare(small_cnn(), STATIC)
    with pytest.raises(RuntimeError, match="no calibration data"):
        convert(c)
    # (inputs, targets) batches and num_batches
    d = prepare(small_cnn(), STATIC)
    assert calibrate(d, [(x, torch.zeros(8)) for x in data], num_batches=2) == 2


def test_mixed_configs_save_load_and_report(tmp_path):
    data = [torch.randn(8, 1, 8, 8, generator=gen(i)) for i in range(3)]
    model = small_cnn()
    ref = small_cnn()
    quantize_(model, STATIC, overrides={"6": Int8WeightOnlyConfig(), "8": Int8DynamicActivationInt8WeightConfig()},
              calibration_data=data, verbose=False)
    assert isinstance(model[0], Int8Conv2d) and isinstance(model[2], Int8Conv2d)
    assert isinstance(model[6], Int8WeightOnlyLinear) and type(model[8]).__name__ == "Int8Linear"
    path = tmp_path / "cnn.safetensors"
    save_quantized(model, path)
    restored = load_quantized(small_cnn(seed=1), path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), restored.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert restored[2].input_scale.item() == model[2].input_scale.item() != 1.0
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(model(x), restored(x))
    report = quantization_report(ref, model, (x,))
    assert set(report.layers) == {"0", "2", "6", "8"} and report.output_sqnr > 25
    assert report.bytes_after < report.bytes_before / 3
    with pytest.raises(ValueError, match="is a ReLU, expected nn.Linear"):
        load_quantized(nn.Sequential(*[nn.ReLU() for _ in range(9)]), path)


# ---- accuracy on digits -------------------------------------------------------------------------------------------

def _digits():
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    perm = torch.randperm(len(x), generator=gen(0))
    return x, y, perm[:1400], perm[1400:]


def _train(model, x, y, train, epochs):
    model.train()
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(epochs):
        for idx in train.split(128):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


def _accuracy(model, x, y):
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item() * 100


def test_digits_mlp_static_ptq():
    """The MLP of tests/test_quantization.py: static int8 PTQ (calibrated on 4 training batches) within 1 point of
    float, for each observer; int8 weight-only within 0.5."""
    x, y, train, test = _digits()
    torch.manual_seed(0)
    model = _train(nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 10)),
                   x, y, train, 30)
    base = _accuracy(model, x[test], y[test])
    assert base > 94
    calib = [x[idx] for idx in train.split(128)[:4]]
    for observer in ("minmax", "moving_average", "percentile", "mse"):
        q = copy.deepcopy(model)
        quantize_(q, Int8StaticActivationInt8WeightConfig(observer), calibration_data=calib, verbose=False)
        assert _accuracy(q, x[test], y[test]) >= base - 1.0, observer
    q = copy.deepcopy(model)
    quantize_(q, Int8WeightOnlyConfig(), verbose=False)
    assert _accuracy(q, x[test], y[test]) >= base - 0.5


def test_digits_cnn_int8_conv2d():
    """A small CNN on the 8x8 digits as 1x8x8 images: static int8 PTQ (Int8Conv2d + Int8StaticLinear) within 1 point
    of float accuracy, NCHW and channels_last."""
    x, y, train, test = _digits()
    x = x.reshape(-1, 1, 8, 8)
    model = _train(small_cnn(), x, y, train, 15)
    base = _accuracy(model, x[test], y[test])
    assert base > 94
    q = copy.deepcopy(model)
    quantize_(q, Int8StaticActivationInt8WeightConfig("percentile"), calibration_data=[x[idx] for idx in
                                                                                      train.split(128)[:4]],
              verbose=False)
    assert isinstance(q[0], Int8Conv2d) and isinstance(q[2], Int8Conv2d)
    assert _accuracy(q, x[test], y[test]) >= base - 1.0
    xcl = x[test].contiguous(memory_format=torch.channels_last)
    assert _accuracy(q, xcl, y[test]) >= base - 1.0
