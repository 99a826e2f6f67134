"""Vision Transformers with torchvision's module names and state_dict keys (conv_proj, class_token,
encoder.pos_embedding, encoder.layers.encoder_layer_<i>.{ln_1, self_attention, ln_2, mlp.0, mlp.3}, encoder.ln,
heads.head): vit_b_16, vit_b_32, vit_l_16, vit_l_32 as in torchvision, and vit_tiny_16/32, vit_small_16/32 (timm's
tiny and small widths, torchvision's layout). Attention runs through mltoolkit.nn.MultiheadAttention (flash-style
kernel), the norms through mltoolkit's layer_norm, and the residual add before ln_2 through the fused add_layer_norm.

`image_size` (default 224) fixes the position-embedding length, as in torchvision."""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mltoolkit import nn as mnn
from mltoolkit import ops
from mltoolkit.models.registry import register_model


class MLPBlock(nn.Sequential):
    """torchvision's MLPBlock: Linear, GELU, Dropout, Linear, Dropout (keys "0.*" and "3.*"; the legacy
    "linear_1.*" / "linear_2.*" keys of old torchvision checkpoints load too)."""

    _version = 2

    def __init__(self, in_dim: int, mlp_dim: int, dropout: float):
        super().__init__(nn.Linear(in_dim, mlp_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_dim, in_dim),
                         nn.Dropout(dropout))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        version = local_metadata.get("version", None)
        if version is None or version < 2:
            for i in range(2):
                for kind in ("weight", "bias"):
                    old_key, new_key = f"{prefix}linear_{i + 1}.{kind}", f"{prefix}{3 * i}.{kind}"
                    if old_key in state_dict:
                        state_dict[new_key] = state_dict.pop(old_key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class EncoderBlock(nn.Module):
    def __init__(self, num_heads: int, hidden_dim: int, mlp_dim: int, dropout: float, attention_dropout: float,
                 eps: float = 1e-6):
        super().__init__()
        self.num_heads = num_heads
        self.ln_1 = mnn.LayerNorm(hidden_dim, eps=eps)
        self.self_attention = mnn.MultiheadAttention(hidden_dim, num_heads, dropout=attention_dropout,
                                                     batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = mnn.LayerNorm(hidden_dim, eps=eps)
        self.mlp = MLPBlock(hidden_dim, mlp_dim, dropout)

    def forward(self, input: Tensor) -> Tensor:
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x)
        y, x = ops.add_layer_norm(x, input, self.ln_2.weight, self.ln_2.bias, self.ln_2.eps,
                                  self.ln_2.normalized_shape)
        return x + self.mlp(y)


class Encoder(nn.Module):
    def __init__(self, seq_length: int, num_layers: int, num_heads: int, hidden_dim: int, mlp_dim: int,
                 dropout: float, attention_dropout: float, eps: float = 1e-6):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(num_heads, hidden_dim, mlp_dim, dropout, attention_dropout, eps))
            for i in range(num_layers)))
        self.ln = mnn.LayerNorm(hidden_dim, eps=eps)

    def forward(self, input: Tensor) -> Tensor:
        return self.ln(self.layers(self.dropout(input + self.pos_embedding)))


class VisionTransformer(nn.Module):
    """torchvision.models.VisionTransformer's constructor (without conv_stem_configs), module tree, initialization
    and outputs."""

    def __init__(self, image_size: int, patch_size: int, num_layers: int, num_heads: int, hidden_dim: int,
                 mlp_dim: int, dropout: float = 0.0, attention_dropout: float = 0.0, num_classes: int = 1000,
                 representation_size: int | None = None):
        super().__init__()
        if not isinstance(image_size, int) or image_size % patch_size != 0:
            raise ValueError(f"VisionTransformer: image_size must be a multiple of patch_size {patch_size}, got "
                             f"{image_size!r}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"VisionTransformer: num_classes must be a positive int, got {num_classes!r}")
        self.image_size, self.patch_size = image_size, patch_size
        self.hidden_dim, self.mlp_dim = hidden_dim, mlp_dim
        self.attention_dropout, self.dropout = attention_dropout, dropout
        self.num_classes, self.representation_size = num_classes, representation_size
        self.conv_proj = mnn.Conv2d(3, hidden_dim, kernel_size=patch_size, stride=patch_size)
        seq_length = (image_size // patch_size) ** 2 + 1
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.encoder = Encoder(seq_length, num_layers, num_heads, hidden_dim, mlp_dim, dropout, attention_dropout)
        self.seq_length = seq_length
        heads: OrderedDict[str, nn.Module] = OrderedDict()
        if representation_size is None:
            heads["head"] = nn.Linear(hidden_dim, num_classes)
        else:
            heads["pre_logits"] = nn.Linear(hidden_dim, representation_size)
            heads["act"] = nn.Tanh()
            heads["head"] = nn.Linear(representation_size, num_classes)
        self.heads = nn.Sequential(heads)

        fan_in = 3 * patch_size * patch_size
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.conv_proj.bias)
        if representation_size is not None:
            nn.init.trunc_normal_(self.heads.pre_logits.weight, std=math.sqrt(1 / hidden_dim))
            nn.init.zeros_(self.heads.pre_logits.bias)
        nn.init.zeros_(self.heads.head.weight)
        nn.init.zeros_(self.heads.head.bias)

    def _process_input(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"VisionTransformer: input must be (N, 3, H, W), got shape {list(x.shape)}")
        n, _, h, w = x.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(f"VisionTransformer: input is {h}x{w} but the model was built for image_size "
                             f"{self.image_size} (pass image_size= to create_model)")
        p = self.patch_size
        # The patch embedding is a stride-p, p x p convolution: a (N * patches, 3p^2) x (3p^2, hidden) GEMM.
        x = x.reshape(n, 3, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // p) * (w // p), -1)
        return F.linear(x, self.conv_proj.weight.reshape(self.hidden_dim, -1), self.conv_proj.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        """The encoder's output tokens (N, 1 + patches, hidden_dim), class token first."""
        x = self._process_input(x)
        x = torch.cat([self.class_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.encoder(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.heads(self.forward_features(x)[:, 0])


# name: (patch_size, num_layers, num_heads, hidden_dim, mlp_dim)
_CONFIGS = {
    "vit_tiny_16": (16, 12, 3, 192, 768),
    "vit_tiny_32": (32, 12, 3, 192, 768),
    "vit_small_16": (16, 12, 6, 384, 1536),
    "vit_small_32": (32, 12, 6, 384, 1536),
    "vit_b_16": (16, 12, 12, 768, 3072),
    "vit_b_32": (32, 12, 12, 768, 3072),
    "vit_l_16": (16, 24, 16, 1024, 4096),
    "vit_l_32": (32, 24, 16, 1024, 4096),
}


def _register(name: str):
    patch, layers, heads, hidden, mlp = _CONFIGS[name]

    def build(image_size: int = 224, **kwargs) -> VisionTransformer:
        cfg = dict(patch_size=patch, num_layers=layers, num_heads=heads, hidden_dim=hidden, mlp_dim=mlp)
        cfg.update(kwargs)  # any of the architecture's numbers can be overridden too (e.g. num_layers=6)
        return VisionTransformer(image_size, **cfg)

    build.__name__ = build.__qualname__ = name
    build.__doc__ = (f"{name}: patch {patch}, {layers} layers, {heads} heads, width {hidden}, MLP {mlp}; kwargs: "
                     "image_size, num_classes, dropout, attention_dropout, representation_size, or any of patch_size, "
                     "num_layers, num_heads, hidden_dim, mlp_dim to override the architecture.")
    register_model(build, name=name, family="vit")
    return build


vit_tiny_16 = _register("vit_tiny_16")
vit_tiny_32 = _register("vit_tiny_32")
vit_small_16 = _register("vit_small_16")
vit_small_32 = _register("vit_small_32")
vit_b_16 = _register("vit_b_16")
vit_b_32 = _register("vit_b_32")
vit_l_16 = _register("vit_l_16")
vit_l_32 = _register("vit_l_32")
