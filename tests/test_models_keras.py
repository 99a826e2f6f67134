"""Keras ResNet weights (mltoolkit.models.keras): a keras.applications.ResNet50 with random weights (Keras 3 on the
torch backend: no TensorFlow), saved with save_weights (Keras 3 .weights.h5) and in the legacy HDF5 format, loads
into resnet50_keras and gives Keras' logits (fp32; NHWC input permuted to NCHW); bad files fail naming the layer.

Importing Keras costs ~12 s on this machine; the module builds one Keras model (64 x 64 input, 10 classes, no
softmax) with batch-norm statistics and conv biases randomized so that every mapped tensor matters."""
import os
import shutil

import numpy as np
import pytest
import torch

from mltoolkit.models import create_model, from_pretrained
from mltoolkit.models import keras as mkeras

if os.environ.setdefault("KERAS_BACKEND", "torch") != "torch":
    pytest.skip("Keras tests run on the torch backend (KERAS_BACKEND=torch)", allow_module_level=True)
h5py = pytest.importorskip("h5py")
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy:DeprecationWarning")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def keras_model(tmp_path_factory):
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip(f"Keras runs on the {keras.backend.backend()} backend, not torch")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    keras.utils.set_random_seed(0)
    model = keras.applications.ResNet50(weights=None, input_shape=(64, 64, 3), classes=10,
                                        classifier_activation=None)
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            c = layer.get_weights()[0].shape
            layer.set_weights([1 + 0.2 * rng.standard_normal(c), 0.1 * rng.standard_normal(c),
                               0.1 * rng.standard_normal(c), 0.5 + np.abs(rng.standard_normal(c))])
        elif isinstance(layer, keras.layers.Conv2D):
            kernel, bias = layer.get_weights()
            layer.set_weights([kernel, 0.1 * rng.standard_normal(bias.shape)])
    folder = tmp_path_factory.mktemp("keras")
    new = folder / "resnet50.weights.h5"
    model.save_weights(str(new))
    legacy = folder / "resnet50_legacy.h5"
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(legacy, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    x = rng.standard_normal((2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        logits = model(x, training=False)
    logits = logits.detach().cpu().numpy() if torch.is_tensor(logits) else np.asarray(logits)
    torch.set_num_threads(n)
    return {"model": model, "new": new, "legacy": legacy, "x": x, "logits": torch.from_numpy(logits)}


def _nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def _close(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-4) -> None:
    scale = ref.abs().max().item()
    assert (ours - ref).abs().max().item() <= rel * max(scale, 1.0), ((ours - ref).abs().max(), scale)


@pytest.mark.parametrize("fmt", ["new", "legacy"])
def test_logits_match_keras(keras_model, fmt):
    model = create_model("resnet50_keras", pretrained_path=keras_model[fmt], num_classes=10).eval()
    x = _nchw(keras_model["x"])
    with torch.no_grad():
        _close(model(x), keras_model["logits"])
        # channels_last model and input: same logits
        model_cl = model.to(memory_format=torch.channels_last)
        _close(model_cl(x.to(memory_format=torch.channels_last)), keras_model["logits"])


def test_architecture_is_keras_v1():
    model = create_model("resnet50_keras")
    block = model.layer2[0]
    assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)  # torchvision's resnet50: the reverse
    assert model.conv1.bias is not None and block.downsample[0].bias is not None
    assert model.bn1.eps == pytest.approx(1.001e-5) and model.bn1.momentum == pytest.approx(0.01)
    tv_keys = set(create_model("resnet50").state_dict())
    extra = set(model.state_dict()) - tv_keys
    assert tv_keys <= set(model.state_dict()) and extra and all(k.endswith("conv1.bias") or ".bias" in k
                                                                  for k in extra)
    assert len(extra) == 53  # one bias per convolution


def test_train_mode_matches_keras(keras_model):
    """Batch statistics in training mode: Keras' BatchNormalization(training=True) and our fused ops agree (to 1e-3
    of the output scale: conv5's batch statistics come from 2 x 2 x 2 values, which magnifies fp32 rounding)."""
    model = create_model("resnet50_keras", pretrained_path=keras_model["new"], num_classes=10).train()
    saved = keras_model["model"].get_weights()
    ref = keras_model["model"](keras_model["x"], training=True)
    keras_model["model"].set_weights(saved)  # training=True moved Keras' moving statistics
    ref = ref.detach().cpu() if torch.is_tensor(ref) else torch.from_numpy(np.asarray(ref))
    with torch.no_grad():
        ours = model(_nchw(keras_model["x"]))
    _close(ours, ref, rel=1e-3)


def test_from_pretrained_infers_the_model(keras_model):
    model = from_pretrained(keras_model["new"])
    assert type(model).__name__ == "ResNet" and model.fc.out_features == 10 and model._mltk_keras
    assert mkeras.infer_model(keras_model["legacy"]) == ("resnet50_keras", {"num_classes": 10})
    with torch.no_grad():
        _close(model.eval()(_nchw(keras_model["x"])), keras_model["logits"])


def _delete_layer(path, name: str) -> None:
    """Remove the Keras layer `name` from a weights file (either format)."""
    with h5py.File(path, "a") as f:
        if "layer_names" in f.attrs:
            del f[name]
            f.attrs["layer_names"] = [n for n in f.attrs["layer_names"] if (n.decode() if isinstance(n, bytes)
                                                                            else n) != name]
            return
        for key in list(f["layers"]):
            if f[f"layers/{key}/vars"].attrs.get("name") == name:
                del f[f"layers/{key}"]
                return
    raise AssertionError(name)


@pytest.mark.parametrize("fmt", ["new", "legacy"])
def test_missing_layer_named(keras_model, fmt, tmp_path):
    path = tmp_path / "broken.h5"
    shutil.copy(keras_model[fmt], path)
    _delete_layer(path, "conv4_block6_3_conv")
    with pytest.raises(KeyError, match=r"does not match a Keras ResNet50: 1 missing layer\(s\) "
                                       r"\[conv4_block6_3_conv\]"):
        create_model("resnet50_keras", pretrained_path=path, num_classes=10)
    with pytest.warns(UserWarning) as record:
        model = create_model("resnet50_keras", pretrained_path=path, num_classes=10, strict=False)
    assert any("missing layer(s) [conv4_block6_3_conv]" in str(w.message) for w in record)
    assert torch.count_nonzero(model.layer3[5].conv3.bias) == 0  # left as built
    # no predictions layer (include_top=False): warned, the rest loads; features equal Keras' backbone
    _delete_layer(path, "predictions")
    with pytest.warns(UserWarning) as record:
        create_model("resnet50_keras", pretrained_path=path, num_classes=10, strict=False)
    assert any("no 'predictions' layer (saved with include_top=False?)" in str(w.message) for w in record)


def test_headless_file_gives_keras_features(keras_model, tmp_path):
    """A file without the top (include_top=False): the backbone loads and forward_features equals Keras'
    conv5_block3_out (NHWC there)."""
    keras = pytest.importorskip("keras")
    path = tmp_path / "notop.weights.h5"
    shutil.copy(keras_model["new"], path)
    _delete_layer(path, "predictions")
    with pytest.warns(UserWarning, match="no 'predictions' layer"):
        model = create_model("resnet50_keras", pretrained_path=path, num_classes=10, strict=False).eval()
    kmodel = keras_model["model"]
    backbone = keras.Model(kmodel.inputs[0], kmodel.get_layer("conv5_block3_out").output)
    ref = backbone(keras_model["x"], training=False)
    ref = (ref.detach().cpu() if torch.is_tensor(ref) else torch.from_numpy(np.asarray(ref))).permute(0, 3, 1, 2)
    with torch.no_grad():
        _close(model.forward_features(_nchw(keras_model["x"])), ref)


def test_bad_files(keras_model, tmp_path):
    # the wrong number of classes: the layer and both shapes named
    with pytest.raises(ValueError, match=r"layer 'predictions' gives 'fc.weight' the shape \[10, 2048\] but the "
                                         r"model's 'fc.weight' has shape \[1000, 2048\]"):
        create_model("resnet50_keras", pretrained_path=keras_model["new"])
    # Keras weights into torchvision's architecture: refused, pointing at resnet50_keras
    for name in ("resnet50", "resnet18"):
        with pytest.raises(ValueError, match=r"create_model\('resnet50_keras'"):
            create_model(name, pretrained_path=keras_model["new"], num_classes=10)
    # a ResNet50 file for a ResNet101: the missing blocks named, the file's model said
    with pytest.raises(KeyError, match=r"Keras ResNet101: 102 missing layer\(s\) \[conv4_block7_1_conv.*holds a Keras "
                                       r"ResNet50"):
        create_model("resnet101_keras", pretrained_path=keras_model["new"], num_classes=10)
    # an HDF5 file that is not a Keras weights file
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(ValueError, match="not a Keras weights file"):
        create_model("resnet50_keras", pretrained_path=path)
    # a Keras weights file of another model
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [b"dense_1"]
        f["dense_1"] = np.zeros(0)
        del f["dense_1"]
        g = f.create_group("dense_1")
        g.attrs["weight_names"] = [b"dense_1/kernel:0", b"dense_1/bias:0"]
        g["dense_1/kernel:0"] = np.zeros((4, 2), np.float32)
        g["dense_1/bias:0"] = np.zeros(2, np.float32)
    with pytest.raises(KeyError, match="not a Keras ResNet weights file: it has no layer 'conv1_conv'.*dense_1"):
        create_model("resnet50_keras", pretrained_path=path)
    with pytest.raises(ValueError, match="not of a Keras ResNet50/101/152"):
        from_pretrained(path)
