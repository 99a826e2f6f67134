"""The model registry: every registered model (parametrized over list_models()) runs forward and backward, survives a
state_dict round-trip and builds on the meta device; a cheap subset compiles with torch.compile(fullgraph=True);
create_model / list_models / pretrained_path / from_pretrained behave and fail clearly (unknown name with suggestions,
missing and unexpected keys listed, shape mismatches naming the key).

Each registry entry knows its input kind (registry.example_input): image models get 2 x 3 x 32 x 32 (ViTs built
with image_size=32), text models (bert_*, gpt2*, llama_*) 2 x 8 token ids. Vision models of more than ~50M parameters
are built on the meta device and filled with `fill_` (torch's initializers draw random numbers at ~35M/s on this
machine); the base/large text configs keep their widths and vocabularies but are built with 2 layers."""
import io
import os

import pytest
import torch

from mltoolkit.models import (
    create_model,
    example_input,
    from_pretrained,
    list_models,
    load_pretrained,
    register_model,
    registry,
    save_pretrained,
)

BIG = {"resnet101", "resnet152", "efficientnet_b5", "efficientnet_b6", "efficientnet_b7", "vit_b_16", "vit_b_32",
       "vit_l_16", "vit_l_32", "resnet101_keras", "resnet152_keras"}
TEXT = {"bert": "num_hidden_layers", "gpt2": "n_layer", "llama": "num_hidden_layers"}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fill_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every parameter and buffer set from one random vector of prime length (cheap, and rows differ): weights with
    variance 1 / fan_in, batch-norm affine and running stats around (1, 0), so the logits stay O(1)..O(1e3)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(1_000_003, generator=g)
    offset = 0

    def take(n: int) -> torch.Tensor:
        nonlocal offset
        reps = (offset + n) // base.numel() + 1
        out = base.repeat(reps)[offset:offset + n] if reps > 1 else base[offset:offset + n]
        offset = (offset + 7919 * n + 1) % base.numel()
        return out

    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point():
                t.fill_(3)
                continue
            r = take(t.numel()).view_as(t)
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "running_var":
                t.copy_(r.abs() * 0.5 + 0.5)
            elif leaf == "running_mean" or (t.dim() == 1 and leaf == "bias"):
                t.copy_(r * 0.1)
            elif t.dim() == 1:  # norm weights
                t.copy_(1 + 0.2 * r)
            else:
                fan_in = t[0].numel() if t.dim() > 1 else 1
                t.copy_(r).mul_((1.0 / fan_in) ** 0.5 if leaf != "pos_embedding" and "token" not in leaf else 0.02)
    return model


def _is_text(name: str) -> bool:
    return registry.resolve_name(name).input_kind == "tokens"


def _kwargs(name: str) -> dict:
    """num_classes=10; ViTs at image_size=32, and ViT-B/L with 2 of their 12/24 layers (test_models_vision runs them
    whole against torchvision). Text models: the base/large/small configs with 2 layers."""
    if _is_text(name):
        family = registry.resolve_name(name).family
        return {} if "tiny" in name else {TEXT[family]: 2}
    kw = {"num_classes": 10}
    if name.startswith("vit"):
        kw["image_size"] = 32
    if name.startswith(("vit_b", "vit_l")):
        kw["num_layers"] = 2
    return kw


def _tensors(out) -> list[torch.Tensor]:
    """The float tensors of a model's output (a tensor, or a transformers-style ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return [out]
    return [v for v in out.to_tuple() if isinstance(v, torch.Tensor) and v.is_floating_point()]


def _build(name: str, cheap: bool | None = None) -> torch.nn.Module:
    cheap = name in BIG if cheap is None else cheap
    if not cheap:
        return create_model(name, **_kwargs(name))
    with torch.device("meta"):
        model = create_model(name, **_kwargs(name))
    return fill_(model.to_empty(device="cpu"))


def test_list_models():
    names = list_models()
    assert names == sorted(names) and len(names) == len(set(names))
    assert {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152"} <= set(names)
    assert {f"efficientnet_b{i}" for i in range(8)} <= set(names)
    assert {"vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_tiny_16", "vit_small_32"} <= set(names)
    assert list_models("resnet*") == ["resnet101", "resnet101_keras", "resnet152", "resnet152_keras", "resnet18",
                                      "resnet34", "resnet50", "resnet50_keras"]
    assert list_models("resnet[0-9]*[0-9]") == ["resnet101", "resnet152", "resnet18", "resnet34", "resnet50"]
    assert list_models("vit_?_32") == ["vit_b_32", "vit_l_32"]
    assert list_models(["resnet18", "efficientnet_b[01]"]) == ["efficientnet_b0", "efficientnet_b1", "resnet18"]
    assert list_models("nothing*") == []
    assert "vit_base_patch16_224" not in names  # aliases resolve but are not listed
    assert list_models("bert*") == ["bert_base", "bert_base_classifier", "bert_base_mlm", "bert_large", "bert_tiny",
                                    "bert_tiny_classifier", "bert_tiny_mlm"]
    assert list_models("gpt2*") == ["gpt2", "gpt2_medium", "gpt2_tiny"]
    assert {"llama_tiny", "llama_small", "resnet50_keras"} <= set(names)
    assert {registry.resolve_name(n).input_kind for n in names} == {"image", "tokens"}
    assert registry.resolve_name("gpt2_tiny").family == "gpt2" and registry.resolve_name("llama_tiny").family == "llama"
    with pytest.raises(ValueError, match="input_kind"):
        register_model(lambda: None, name="test_bad_kind", input_kind="audio")
    with pytest.raises(TypeError, match="pattern"):
        list_models(3)


@pytest.mark.parametrize("name", list_models())
def test_forward_backward_roundtrip(name):
    torch.manual_seed(0)
    model = _build(name).train()
    x = example_input(name, model)
    assert x.dtype == (torch.long if _is_text(name) else torch.float32)
    outs = _tensors(model(x))
    assert outs and all(o.shape[0] == 2 and torch.isfinite(o).all() for o in outs)
    if not _is_text(name):
        assert outs[0].shape == (2, 10)
    sum(o.square().mean() for o in outs).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    # state_dict round-trip: save, load into a fresh (meta-built) model, same outputs
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    with torch.device("meta"):
        fresh = create_model(name, **_kwargs(name))
    fresh.load_state_dict(torch.load(buf, weights_only=True), assign=True)
    assert list(fresh.state_dict()) == list(model.state_dict())
    own_buffers = dict(model.named_buffers())
    for bname, b in list(fresh.named_buffers()):  # non-persistent buffers (RoPE's inv_freq) are not in a state_dict
        if b.is_meta:
            owner, _, leaf = bname.rpartition(".")
            fresh.get_submodule(owner).register_buffer(leaf, own_buffers[bname].clone(), persistent=False)
    model.eval()
    fresh.eval()
    with torch.no_grad():
        for a, b in zip(_tensors(fresh(x)), _tensors(model(x)), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


# torch.compile costs 20..200 s per model on this machine with inductor, and Dynamo's capture alone 15..75 s: the
# tier-1 test captures ResNet-18 and a 2-layer ViT-Tiny whole (fullgraph=True) with the "eager" backend (the graph
# capture is what fullgraph checks); EfficientNet-B0's capture and inductor runs of all three are in the slow tier
# (MLTK_SLOW_TESTS=1). The text models' tiny configs (one per family) are captured the same way; the
# Keras-architecture ResNet shares resnet18's modules and ops.
COMPILE_CHEAP = ["resnet18", "efficientnet_b0", "vit_tiny_32", "bert_tiny", "gpt2_tiny", "llama_tiny"]


def _compile_case(name):
    torch._dynamo.reset()
    torch.manual_seed(0)
    kwargs = {**_kwargs(name), **({"num_layers": 2} if name.startswith("vit") else {})}
    model = create_model(name, **kwargs).eval()
    return model, example_input(name, model)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "efficientnet_b0" else n
                                  for n in COMPILE_CHEAP])
def test_compile_fullgraph(name):
    model, x = _compile_case(name)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        for a, b in zip(_tensors(compiled(x)), _tensors(model(x)), strict=True):
            torch.testing.assert_close(a, b)


@pytest.mark.slow
@pytest.mark.parametrize("name", COMPILE_CHEAP)
def test_compile_inductor(name):
    model, x = _compile_case(name)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        for a, b in zip(_tensors(compiled(x)), _tensors(model(x)), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_optimize_keeps_outputs():
    import mltoolkit

    model = _build("resnet18").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(mltoolkit.optimize(model)(x), ref)


# ---- create_model and its errors ----------------------------------------------------------------------------------

def test_unknown_name_suggests_close_matches():
    with pytest.raises(ValueError, match=r"unknown model name 'resnet5'.*did you mean.*'resnet50'"):
        create_model("resnet5")
    with pytest.raises(ValueError, match=r"'efficientnet_b0'"):
        create_model("efficientnet-b0")
    with pytest.raises(ValueError, match="unknown model name 'zzz'.*list_models"):
        create_model("zzz")
    with pytest.raises(TypeError, match="name must be a str"):
        create_model(50)


def test_timm_alias_and_kwargs():
    model = create_model("vit_tiny_patch32_224", image_size=64, num_classes=7)
    assert model.heads.head.out_features == 7 and model.image_size == 64 and model.patch_size == 32
    with pytest.raises(ValueError, match="image_size"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet18", num_classes=0)


def test_register_model_and_duplicates():
    name = "test_registry_tiny_net"
    if name not in registry._MODELS:
        @register_model(name=name, family="resnet")
        def tiny(**kwargs):
            return torch.nn.Linear(4, kwargs.get("num_classes", 2))
    assert name in list_models("test_registry_*")
    assert create_model(name, num_classes=3).out_features == 3
    with pytest.raises(ValueError, match="already registered"):
        register_model(lambda: None, name=name)
    del registry._MODELS[name]


# ---- pretrained_path ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def resnet18_state():
    torch.manual_seed(0)
    return fill_(create_model("resnet18", num_classes=10), seed=3).state_dict()


@pytest.mark.parametrize("wrap", ["plain", "state_dict", "ddp", "safetensors"])
def test_pretrained_path_formats(wrap, resnet18_state, tmp_path):
    path = tmp_path / "ckpt.pth"
    if wrap == "plain":
        torch.save(resnet18_state, path)
    elif wrap == "state_dict":
        torch.save({"state_dict": resnet18_state, "epoch": 3}, path)
    elif wrap == "ddp":
        torch.save({f"module.{k}": v for k, v in resnet18_state.items()}, path)
    else:
        safetensors = pytest.importorskip("safetensors.torch")
        path = tmp_path / "ckpt.safetensors"
        safetensors.save_file({k: v.contiguous() for k, v in resnet18_state.items()}, str(path))
    model = create_model("resnet18", pretrained_path=path, num_classes=10)
    for key, value in model.state_dict().items():
        assert torch.equal(value, resnet18_state[key]), key


def test_pretrained_path_errors(resnet18_state, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        create_model("resnet18", pretrained_path=tmp_path / "missing.pth")
    # head of another size: refused, naming the key and both shapes (also with strict=False)
    path = tmp_path / "sd.pth"
    torch.save(resnet18_state, path)
    for strict in (True, False):
        with pytest.raises(ValueError, match=r"'fc.weight' has shape \[10, 512\] but the model's 'fc.weight' has "
                                             r"shape \[1000, 512\]"):
            create_model("resnet18", pretrained_path=path, strict=strict)
    # missing and unexpected keys: listed; strict=False loads the rest with a warning
    partial = {k: v for k, v in resnet18_state.items() if not k.startswith("layer4.")}
    partial["extra.weight"] = torch.zeros(3)
    torch.save(partial, path)
    with pytest.raises(KeyError, match=r"missing key\(s\) \[layer4\.0\.bn1\.bias.*1 unexpected key\(s\) "
                                       r"\[extra\.weight\]"):
        create_model("resnet18", pretrained_path=path, num_classes=10)
    with pytest.warns(UserWarning, match="missing key"):
        model = create_model("resnet18", pretrained_path=path, num_classes=10, strict=False)
    assert torch.equal(model.conv1.weight, resnet18_state["conv1.weight"])
    # not a state_dict at all
    torch.save([1, 2, 3], path)
    with pytest.raises(ValueError, match="does not hold a state_dict"):
        create_model("resnet18", pretrained_path=path)


def test_load_pretrained_detects_vit_format_and_legacy_mlp_keys():
    """A timm-keyed ViT state_dict (in memory) converts; torchvision's legacy MLP keys (linear_1/linear_2) load."""
    model = fill_(create_model("vit_tiny_32", image_size=32, num_classes=5))
    sd = model.state_dict()
    from mltoolkit.models._timm import vit_from_timm

    timm_keys = {"cls_token": sd["class_token"], "pos_embed": sd["encoder.pos_embedding"]}
    for k, v in sd.items():
        if k not in ("class_token", "encoder.pos_embedding"):
            timm_keys["x." + k] = v  # foreign keys: none match
    assert vit_from_timm(timm_keys) is None  # no patch_embed: not timm's format
    legacy = {k.replace("mlp.0.", "mlp.linear_1.").replace("mlp.3.", "mlp.linear_2."): v for k, v in sd.items()}
    fresh = create_model("vit_tiny_32", image_size=32, num_classes=5)
    fresh.load_state_dict(legacy)
    assert torch.equal(fresh.encoder.layers.encoder_layer_3.mlp[3].weight,
                       sd["encoder.layers.encoder_layer_3.mlp.3.weight"])
    result = load_pretrained(create_model("vit_tiny_32", image_size=32, num_classes=5), sd, family="vit")
    assert not result.missing_keys and not result.unexpected_keys


def test_pretrained_path_is_local_only(tmp_path):
    assert not os.path.exists(tmp_path / "x")
    with pytest.raises(FileNotFoundError):
        create_model("vit_tiny_16", pretrained_path="https://example.com/vit.pth")


# ---- text models through the registry: Hugging Face folders and weights files -----------------------------------

@pytest.mark.parametrize("name", ["bert_tiny_classifier", "gpt2_tiny", "llama_tiny"])
def test_text_pretrained_folder_and_file(name, tmp_path):
    torch.manual_seed(0)
    src = create_model(name, **({"num_labels": 3} if "classifier" in name else {})).eval()
    folder = tmp_path / "hf"
    save_pretrained(src, folder)
    x = example_input(name, src)
    with torch.no_grad():
        ref = _tensors(src(x))
    # folder: the name's class with config.json's sizes; kwargs override config fields
    for model in (create_model(name, pretrained_path=folder), from_pretrained(folder), from_pretrained(folder, name)):
        assert type(model) is type(src) and not model.training
        with torch.no_grad():
            for a, b in zip(_tensors(model(x)), ref, strict=True):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a weights file (model.safetensors, tied copies left out) into a model built with the same config
    kwargs = {"num_labels": 3} if "classifier" in name else {}
    model = create_model(name, pretrained_path=folder / "model.safetensors", **kwargs).eval()
    with torch.no_grad():
        torch.testing.assert_close(_tensors(model(x))[0], ref[0], rtol=0, atol=0)


def test_bert_folder_loads_as_the_names_class(tmp_path):
    """A BertModel folder loads as the classifier the name asks for (pooler + new head, warned as missing)."""
    torch.manual_seed(0)
    save_pretrained(create_model("bert_tiny"), tmp_path)
    with pytest.warns(UserWarning, match="missing keys.*classifier"):
        model = create_model("bert_tiny_classifier", pretrained_path=tmp_path, strict=False, num_labels=4)
    assert type(model).__name__ == "BertForSequenceClassification" and model.classifier.out_features == 4
    with pytest.raises(RuntimeError, match="missing keys.*classifier"):
        create_model("bert_tiny_classifier", pretrained_path=tmp_path)


def test_from_pretrained_errors(tmp_path, resnet18_state):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        from_pretrained(tmp_path / "missing")
    path = tmp_path / "resnet18.pth"
    torch.save(resnet18_state, path)
    with pytest.raises(ValueError, match=r"pass the model name, e\.g\. from_pretrained\(path, 'resnet50'"):
        from_pretrained(path)
    model = from_pretrained(path, "resnet18", num_classes=10)  # a state_dict file with a model name
    assert torch.equal(model.fc.weight, resnet18_state["fc.weight"])
    with pytest.raises(ValueError, match="is a folder.*'resnet18' loads a checkpoint file"):
        create_model("resnet18", pretrained_path=tmp_path)
    with pytest.raises(ValueError, match="only the text models load"):
        from_pretrained(tmp_path, "resnet18")
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path)
    with pytest.raises(TypeError, match="save_pretrained: writes Hugging Face folders.*got ResNet"):
        save_pretrained(model, tmp_path / "out")


def test_convolutional_models_come_back_channels_last():
    """create_model puts the CNN families' 4-D weights in channels_last (as optimize() does) unless told not to;
    values and keys are those of the default layout, and a checkpoint loads into either."""
    torch.manual_seed(0)
    cl = create_model("resnet18", num_classes=5)
    assert cl.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    plain = create_model("resnet18", num_classes=5, channels_last=False)
    assert plain.conv1.weight.is_contiguous() and not plain.conv1.weight.is_contiguous(
        memory_format=torch.channels_last)
    assert list(cl.state_dict()) == list(plain.state_dict())
    for k, v in plain.state_dict().items():
        assert torch.equal(cl.state_dict()[k], v), k
    cl.load_state_dict(plain.state_dict())
    assert cl.conv1.weight.is_contiguous(memory_format=torch.channels_last)  # the copy keeps the layout
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(cl.eval()(x), plain.eval()(x), atol=1e-5, rtol=1e-5)
    assert create_model("efficientnet_b0", num_classes=3).features[0][0].weight.is_contiguous(
        memory_format=torch.channels_last)
    vit = create_model("vit_tiny_patch16_224" if "vit_tiny_patch16_224" in list_models() else "vit_b_16",
                       channels_last=None, num_classes=3)
    assert all(p.dim() != 4 or p.is_contiguous() for p in vit.parameters())  # not a CNN family: left as built
    with pytest.raises(TypeError, match="channels_last must be a bool"):
        create_model("resnet18", channels_last="yes")
