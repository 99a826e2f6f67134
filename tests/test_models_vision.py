"""The vision models against the torchvision (and timm) originals: every torchvision model we mirror, loaded from a
randomly filled torchvision model's state_dict, gives its logits (fp32, max abs diff <= 1e-4 of the output scale) in
eval; in training mode batch statistics, running stats, stochastic depth, dropout and gradients match too. timm
checkpoints load through the key mapping and give timm's logits.

Small inputs keep it quick: 64x64 images (ViTs built with image_size=64). The biggest models (ResNet-101/152,
EfficientNet-B5..B7, ViT-B/L) are built on the meta device and filled with a cheap deterministic pattern instead of
torch's initializers, whose random draws cost seconds per 100M parameters on this machine."""
import pytest
import torch

from mltoolkit.models import create_model
from tests.test_models_registry import fill_

torchvision = pytest.importorskip("torchvision")

MIRRORED = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"] + [
    f"efficientnet_b{i}" for i in range(8)] + ["vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32"]
BIG = {"resnet101", "resnet152", "efficientnet_b5", "efficientnet_b6", "efficientnet_b7", "vit_b_16", "vit_b_32",
       "vit_l_16", "vit_l_32"}
IMAGE_SIZE = {"vit_l_16": 32, "vit_l_32": 32, "resnet152": 32, "efficientnet_b7": 32}  # the biggest: fewer pixels


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _kwargs(name: str) -> dict:
    return {"image_size": IMAGE_SIZE.get(name, 64)} if name.startswith("vit") else {}


def _build_pair(name: str, **extra):
    """(torchvision model, our model loaded from its state_dict), both filled with fill_."""
    kw = {**_kwargs(name), **extra}
    if name in BIG:
        with torch.device("meta"):
            tv = getattr(torchvision.models, name)(**kw)
            ours = create_model(name, **kw)
        tv.to_empty(device="cpu")
        ours.to_empty(device="cpu")
    else:
        tv = getattr(torchvision.models, name)(**kw)
        ours = create_model(name, **kw)
    fill_(tv)
    # strict: same keys and shapes. The big ones share torchvision's tensors (assign) instead of copying ~1 GB.
    result = ours.load_state_dict(tv.state_dict(), assign=name in BIG)
    assert not result.missing_keys and not result.unexpected_keys
    return tv, ours


def _assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4):
    scale = ref.abs().max().item()
    assert torch.isfinite(ref).all() and scale > 0
    err = (ours - ref).abs().max().item()
    assert err <= tol * scale, f"max abs diff {err:.3g} > {tol} x output scale {scale:.3g}"


@pytest.mark.parametrize("name", MIRRORED)
def test_same_logits_as_torchvision(name):
    tv, ours = _build_pair(name)
    tv.eval()
    ours.eval()
    size = IMAGE_SIZE.get(name, 64)
    x = torch.randn(1 if name in BIG else 2, 3, size, size)
    with torch.no_grad():
        _assert_logits_close(ours(x), tv(x))
    assert list(ours.state_dict()) == list(tv.state_dict())


def test_resnet_channels_last():
    tv, ours = _build_pair("resnet50")
    tv.eval()
    ours.eval().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = tv(x)
        out = ours(x.to(memory_format=torch.channels_last))
    _assert_logits_close(out, ref)


def _train_step_matches(name, x, params, **extra):
    """Training mode: same outputs (same RNG draws for dropout / stochastic depth), same running stats after the
    step and the same gradients of `params`."""
    tv, ours = _build_pair(name, **extra)
    tv.train()
    ours.train()
    torch.manual_seed(5)
    ref = tv(x)
    ref.square().mean().backward()
    torch.manual_seed(5)
    out = ours(x)
    out.square().mean().backward()
    # Batch statistics over few values (small batches, 1x1 or 2x2 maps at the end) amplify fp32 rounding (float64
    # runs agree to 1e-11): 1e-3 of the scale.
    _assert_logits_close(out, ref, tol=1e-3)
    tv_params, our_params = dict(tv.named_parameters()), dict(ours.named_parameters())
    for p in params:
        g_ref, g = tv_params[p].grad, our_params[p].grad
        assert g is not None, p
        assert (g - g_ref).abs().max() <= 1e-3 * g_ref.abs().max() + 1e-12, p
    tv_bufs, our_bufs = dict(tv.named_buffers()), dict(ours.named_buffers())
    for key, value in tv_bufs.items():
        torch.testing.assert_close(our_bufs[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_resnet_training_mode_matches_torchvision():
    _train_step_matches("resnet18", torch.randn(4, 3, 32, 32),
                        ["conv1.weight", "bn1.weight", "layer1.0.conv2.weight", "layer4.1.bn2.bias", "fc.weight"])


def test_efficientnet_training_mode_matches_torchvision():
    """Stochastic depth (raised to 0.5 so that samples are dropped) and classifier dropout draw torchvision's
    random numbers."""
    _train_step_matches("efficientnet_b0", torch.randn(4, 3, 64, 64),
                        ["features.0.0.weight", "features.2.1.block.2.fc1.weight", "features.6.0.block.3.1.weight",
                         "classifier.1.weight"], stochastic_depth_prob=0.5)


def test_vit_training_mode_matches_torchvision():
    """Dropout in the MLP and after attention is torch's nn.Dropout: same draws."""
    _train_step_matches("vit_b_32", torch.randn(2, 3, 64, 64),
                        ["conv_proj.weight", "class_token", "encoder.pos_embedding",
                         "encoder.layers.encoder_layer_0.self_attention.in_proj_weight",
                         "encoder.layers.encoder_layer_11.mlp.3.weight", "heads.head.weight"], dropout=0.1)


def test_stochastic_depth_zeroes_whole_samples():
    model = create_model("efficientnet_b0", stochastic_depth_prob=0.9, num_classes=3)
    block = model.features[6][3]  # a late block: drop probability close to 0.9 * 14 / 16
    assert block.use_res_connect and block.stochastic_depth.p > 0.7
    x = torch.randn(8, *block.block[0][0].weight.shape[1:2], 4, 4)
    block.train()
    torch.manual_seed(0)
    delta = block(x) - x
    dropped = [bool((delta[i] == 0).all()) for i in range(8)]
    assert any(dropped) and not all(dropped)
    block.eval()
    with torch.no_grad():
        assert not (block(x) - x).eq(0).all()


# ---- timm -----------------------------------------------------------------------------------------------------------

TIMM_CASES = [("resnet18", "resnet18", {}), ("efficientnet_b0", "efficientnet_b0", {}),
              ("vit_tiny_patch16_224", "vit_tiny_16", {"img_size": 64})]


@pytest.mark.parametrize("timm_name,ours_name,timm_kw", TIMM_CASES, ids=[c[0] for c in TIMM_CASES])
def test_timm_checkpoint_loads_and_matches(timm_name, ours_name, timm_kw, tmp_path):
    timm = pytest.importorskip("timm")
    ref_model = fill_(timm.create_model(timm_name, pretrained=False, **timm_kw)).eval()
    path = tmp_path / "timm.pth"
    torch.save(ref_model.state_dict(), path)
    kw = {"image_size": timm_kw["img_size"]} if "img_size" in timm_kw else {}
    ours = create_model(timm_name, pretrained_path=path, **kw).eval()  # timm's name works as an alias too
    assert type(ours) is type(create_model(ours_name, **kw))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _assert_logits_close(ours(x), ref_model(x))


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
def test_seeded_construction_draws_torchvision_weights(name):
    """Built under the same seed, the zoo model holds torchvision's initial weights (same modules, built in the same
    order: the squeeze-excitation convolutions once each)."""
    torch.manual_seed(0)
    ref = getattr(torchvision.models, name)().state_dict()
    torch.manual_seed(0)
    ours = create_model(name).state_dict()
    assert list(ours) == list(ref)
    for k, v in ref.items():
        assert torch.equal(ours[k], v), k
