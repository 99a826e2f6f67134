"""mltoolkit ops: each is a registered `torch.ops.mltoolkit.*` op behind a torch-shaped Python function."""
from mltoolkit.ops.attention import flash_attn_varlen, scaled_dot_product_attention
from mltoolkit.ops.batch_norm import batch_norm_act
from mltoolkit.ops.conv import conv1d, conv2d, conv2d_act, conv2d_bn_act, fold_batch_norm
from mltoolkit.ops.fake_quantize import fake_quantize
from mltoolkit.ops.int4 import dequantize_int4, int4_weight_only_linear, quantize_int4
from mltoolkit.ops.int8 import (
    int8_linear,
    int8_linear_dynamic,
    int8_pack_weight,
    quantize_per_channel,
    quantize_per_token,
)
from mltoolkit.ops.int8_static import (
    im2col_int8,
    int8_conv2d_static,
    int8_linear_static,
    quantize_static,
)
from mltoolkit.ops.int8_weight_only import int8_weight_only_linear
from mltoolkit.ops.loss import cross_entropy
from mltoolkit.ops.lstm import gru_cell, gru_sequence, lstm_cell, lstm_sequence
from mltoolkit.ops.norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from mltoolkit.ops.rotary import apply_rotary_emb

__all__ = ["layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm", "scaled_dot_product_attention",
           "flash_attn_varlen", "apply_rotary_emb", "cross_entropy",
           "conv2d", "conv1d", "conv2d_act", "conv2d_bn_act", "fold_batch_norm", "batch_norm_act",
           "int4_weight_only_linear", "quantize_int4", "dequantize_int4",
           "quantize_per_token", "quantize_per_channel", "int8_linear", "int8_linear_dynamic",
           "int8_pack_weight", "fake_quantize", "int8_weight_only_linear", "quantize_static", "im2col_int8",
           "int8_linear_static", "int8_conv2d_static", "lstm_sequence", "gru_sequence",
           "lstm_cell", "gru_cell"]
