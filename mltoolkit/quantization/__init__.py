"""Post-training quantization of a model's linear layers (issue 5, first increment): configs, quantize_,
quantized modules, saving and loading, and a report of what quantization changed."""
from mltoolkit.quantization.api import (
    QuantizationReport,
    QuantizeSummary,
    load_quantized,
    model_bytes,
    quantization_report,
    quantize_,
    save_quantized,
)
from mltoolkit.quantization.config import (
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    QuantConfig,
    config_from_dict,
)
from mltoolkit.quantization.modules import Int4Linear, Int8Linear
from mltoolkit.quantization.qat import QATLinear, convert, prepare_qat

__all__ = ["quantize_", "save_quantized", "load_quantized", "quantization_report", "model_bytes", "QuantizeSummary",
           "QuantizationReport", "QuantConfig", "Int8DynamicActivationInt8WeightConfig", "Int4WeightOnlyConfig",
           "config_from_dict", "Int8Linear", "Int4Linear", "prepare_qat", "convert", "QATLinear"]
