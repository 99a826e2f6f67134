"""mltoolkit.quantization: configs, quantize_, the quantized modules, saving and loading, the report, and accuracy
on a small network trained on scikit-learn's digits."""
import copy
import os

import pytest
import torch
from torch import nn

from mltoolkit.quantization import (
    Int4Linear,
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8Linear,
    config_from_dict,
    load_quantized,
    quantization_report,
    quantize_,
    save_quantized,
)

INT8 = Int8DynamicActivationInt8WeightConfig()
INT4 = Int4WeightOnlyConfig(group_size=32)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 10)).eval()


def test_config_round_trip_and_errors():
    for cfg in (INT8, INT4, Int4WeightOnlyConfig()):
        assert config_from_dict(cfg.to_dict()) == cfg
    assert INT4.to_dict() == {"type": "Int4WeightOnlyConfig", "version": 1, "group_size": 32}
    with pytest.raises(ValueError, match="group_size"):
        Int4WeightOnlyConfig(group_size=48)
    with pytest.raises(ValueError, match="unknown config type"):
        config_from_dict({"type": "Int3Config"})
    with pytest.raises(ValueError, match="newer"):
        config_from_dict({**INT8.to_dict(), "version": 99})


@pytest.mark.parametrize("config,module,floor", [(INT8, Int8Linear, 30.0), (INT4, Int4Linear, 15.0)],
                         ids=["int8", "int4"])
def test_quantize_swaps_layers_and_reports(config, module, floor, capsys):
    model, ref = mlp(), mlp()
    x = torch.randn(32, 64)
    summary = quantize_(model, config)
    assert "3 of 3 Linear layers quantized" in capsys.readouterr().out
    assert all(isinstance(model[i], module) for i in (0, 2, 4)) and len(summary.quantized) == 3
    assert summary.bytes_after < summary.bytes_before / 2.5
    report = quantization_report(ref, model, (x,))
    assert set(report.layers) == {"0", "2", "4"}
    assert min(report.layers.values()) > floor and report.output_sqnr > floor
    assert "output SQNR" in str(report)


def test_filter_overrides_and_unsupported_layers():
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 48), nn.Linear(48, 8))
    summary = quantize_(model, INT4, overrides={"2": INT8}, verbose=False)
    assert isinstance(model[0], Int4Linear) and isinstance(model[1], Int4Linear)
    assert isinstance(model[2], Int8Linear)  # 48 is not a multiple of 32, but the override is int8
    model = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 48), nn.Linear(48, 8))
    summary = quantize_(model, INT4, filter_fn=lambda m, name: name != "0", verbose=False)
    assert type(model[0]) is nn.Linear and summary.skipped["0"] == "filter_fn"
    assert "not a multiple of group_size" in summary.skipped["2"]
    model = nn.Sequential(nn.Linear(64, 32))
    summary = quantize_(model, INT8, overrides={"0": None}, verbose=False)
    assert type(model[0]) is nn.Linear and not summary.quantized
    with pytest.raises(ValueError, match="not nn.Linear layers"):
        quantize_(model, INT8, overrides={"missing": INT8})
    with pytest.raises(TypeError, match="config must be one of"):
        quantize_(model, object())


def test_save_and_load_restore_exactly(tmp_path):
    model = mlp()
    quantize_(model, INT4, overrides={"4": INT8}, verbose=False)
    path = tmp_path / "model.safetensors"
    save_quantized(model, path)
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"]  # the temporary file was renamed, none left over
    restored = load_quantized(mlp(seed=1), path)
    assert isinstance(restored[0], Int4Linear) and isinstance(restored[4], Int8Linear)
    for (k, a), (k2, b) in zip(model.state_dict().items(), restored.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.randn(5, 64)
    assert torch.equal(model(x), restored(x))
    with pytest.raises(ValueError, match="does not have"):
        load_quantized(nn.Sequential(nn.Linear(64, 128)), path)
    with pytest.raises(ValueError, match="no layers quantized"):
        save_quantized(mlp(), tmp_path / "float.safetensors")


def test_int8_linear_under_compile():
    layer = Int8Linear.from_float(nn.Linear(64, 32))
    x = torch.randn(4, 64)
    eager = layer(x)
    compiled = torch.compile(layer, fullgraph=True)(x)
    assert torch.equal(eager, compiled)


def test_int8_linear_packed_weight_cache_follows_new_buffers():
    """The CPU kernel's packed weight is cached per module; reassigned (and in-place changed) weight buffers are
    repacked, also when a new buffer takes the freed one's address with the same version counter."""
    from mltoolkit import ops

    layer = Int8Linear.from_float(nn.Linear(64, 32))
    x = torch.randn(4, 64)
    with torch.no_grad():
        for step in range(30):
            want = ops.int8_linear_dynamic(x, layer.weight_int8, layer.weight_scale, layer.bias)
            assert torch.equal(layer(x), want), step
            if step % 3 == 0:
                layer.weight_int8.neg_()
            else:  # the old buffer is released first, so that the new one can take its address
                layer.weight_int8 = None
                layer.weight_int8 = torch.randint(-127, 128, (32, 64), dtype=torch.int8)


def test_digits_accuracy_after_ptq():
    """A small MLP trained on scikit-learn's 8x8 digits: int8 dynamic PTQ within 1 point of float accuracy; int4
    weight-only PTQ (group 32) within 3 points (quantization-aware training, which should recover the rest, is the
    next increment)."""
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(x), generator=g)
    train, test = perm[:1400], perm[1400:]
    model = mlp()
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(60):
        for idx in train.split(128):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()

    def accuracy(m):
        with torch.no_grad():
            return (m(x[test]).argmax(1) == y[test]).float().mean().item() * 100

    base = accuracy(model)
    assert base > 94
    int8, int4 = copy.deepcopy(model), copy.deepcopy(model)
    quantize_(int8, INT8, verbose=False)
    quantize_(int4, INT4, verbose=False)
    assert accuracy(int8) >= base - 1.0
    assert accuracy(int4) >= base - 3.0
