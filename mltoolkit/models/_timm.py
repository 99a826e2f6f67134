"""timm checkpoints: key converters (timm state_dict -> our torchvision-style keys) for resnet, efficientnet and vit,
and timm's model names as aliases of ours (create_model("vit_base_patch16_224") builds vit_b_16).

Only key names are mapped; the architectures are the same (timm's resnet*, efficientnet_b* and vit_*_patch*
classification models with their default options). Hyperparameters that are not in a state_dict must match too:
timm's efficientnet_b5..b7 use batch-norm eps 1e-5 where torchvision uses 1e-3 (pass norm_eps=1e-5), and a ViT's
image_size must be the one the checkpoint was trained at (the position embedding's length is checked).
"""
from __future__ import annotations

import re
from collections.abc import Mapping

from torch import Tensor

from mltoolkit.models.registry import register_alias, register_converter


def _rename(sd: Mapping[str, Tensor], rules: list[tuple[str, str]]) -> dict[str, Tensor]:
    out = {}
    for key, value in sd.items():
        for pattern, repl in rules:
            new, n = re.subn(pattern, repl, key)
            if n:
                key = new
                break
        out[key] = value
    return out


# ---- resnet: timm's ResNet has torchvision's names already ----------------------------------------------------------

def resnet_from_timm(sd: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
    if "conv1.weight" not in sd:
        return None
    return {k: v for k, v in sd.items()}


# ---- efficientnet -------------------------------------------------------------------------------------------------

def efficientnet_from_timm(sd: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
    """timm: conv_stem/bn1, blocks.<s>.<b>.{conv_pw, bn1, conv_dw, bn2, se.conv_reduce, se.conv_expand, conv_pwl,
    bn3} (stage 0: {conv_dw, bn1, se, conv_pw, bn2}), conv_head/bn2, classifier -> torchvision's features.*."""
    if "conv_stem.weight" not in sd:
        return None
    num_stages = 1 + max(int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k)))
    out: dict[str, Tensor] = {}
    bn = r"(weight|bias|running_mean|running_var|num_batches_tracked)"
    for key, value in sd.items():
        new = None
        if m := re.fullmatch(r"conv_stem\.weight", key):
            new = "features.0.0.weight"
        elif m := re.fullmatch(r"bn1\." + bn, key):
            new = f"features.0.1.{m.group(1)}"
        elif m := re.fullmatch(r"conv_head\.weight", key):
            new = f"features.{num_stages + 1}.0.weight"
        elif m := re.fullmatch(r"bn2\." + bn, key):
            new = f"features.{num_stages + 1}.1.{m.group(1)}"
        elif m := re.fullmatch(r"classifier\.(weight|bias)", key):
            new = f"classifier.1.{m.group(1)}"
        elif m := re.fullmatch(r"blocks\.(\d+)\.(\d+)\.(.+)", key):
            stage, block, rest = int(m.group(1)), m.group(2), m.group(3)
            prefix = f"features.{stage + 1}.{block}.block"
            # A block without an expansion conv (DepthwiseSeparableConv) has depthwise, SE, project = block.0..2.
            expand = f"blocks.{stage}.{block}.conv_pw.weight" in sd and \
                f"blocks.{stage}.{block}.conv_pwl.weight" in sd
            if expand:
                table = {"conv_pw": "0.0", "bn1": "0.1", "conv_dw": "1.0", "bn2": "1.1", "se.conv_reduce": "2.fc1",
                         "se.conv_expand": "2.fc2", "conv_pwl": "3.0", "bn3": "3.1"}
            else:
                table = {"conv_dw": "0.0", "bn1": "0.1", "se.conv_reduce": "1.fc1", "se.conv_expand": "1.fc2",
                         "conv_pw": "2.0", "bn2": "2.1"}
            head, _, leaf = rest.rpartition(".")
            if head in table:
                new = f"{prefix}.{table[head]}.{leaf}"
        out[new if new is not None else key] = value
    return out


# ---- vit ------------------------------------------------------------------------------------------------------------

def vit_from_timm(sd: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
    """timm: cls_token, pos_embed, patch_embed.proj, blocks.<i>.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1,
    mlp.fc2}, norm, head -> torchvision's VisionTransformer keys (qkv is packed q, k, v as in_proj_weight is)."""
    if "patch_embed.proj.weight" not in sd:
        return None
    layer = r"encoder.layers.encoder_layer_\1"
    return _rename(sd, [
        (r"^cls_token$", "class_token"),
        (r"^pos_embed$", "encoder.pos_embedding"),
        (r"^patch_embed\.proj\.", "conv_proj."),
        (r"^blocks\.(\d+)\.norm1\.", layer + ".ln_1."),
        (r"^blocks\.(\d+)\.norm2\.", layer + ".ln_2."),
        (r"^blocks\.(\d+)\.attn\.qkv\.weight$", layer + ".self_attention.in_proj_weight"),
        (r"^blocks\.(\d+)\.attn\.qkv\.bias$", layer + ".self_attention.in_proj_bias"),
        (r"^blocks\.(\d+)\.attn\.proj\.", layer + ".self_attention.out_proj."),
        (r"^blocks\.(\d+)\.mlp\.fc1\.", layer + ".mlp.0."),
        (r"^blocks\.(\d+)\.mlp\.fc2\.", layer + ".mlp.3."),
        (r"^norm\.", "encoder.ln."),
        (r"^head\.", "heads.head."),
    ])


register_converter("resnet", "timm", resnet_from_timm)
register_converter("efficientnet", "timm", efficientnet_from_timm)
register_converter("vit", "timm", vit_from_timm)

# timm's names for the same architectures (resnet* and efficientnet_b* are the same names in timm and torchvision).
TIMM_NAMES = {
    "vit_tiny_patch16_224": "vit_tiny_16",
    "vit_tiny_patch32_224": "vit_tiny_32",
    "vit_small_patch16_224": "vit_small_16",
    "vit_small_patch32_224": "vit_small_32",
    "vit_base_patch16_224": "vit_b_16",
    "vit_base_patch32_224": "vit_b_32",
    "vit_large_patch16_224": "vit_l_16",
    "vit_large_patch32_224": "vit_l_32",
}
for _alias, _name in TIMM_NAMES.items():
    register_alias(_alias, _name)
