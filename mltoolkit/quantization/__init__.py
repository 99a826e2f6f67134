"""Post-training quantization of a model's linear and convolution layers (issue 5): configs, quantize_, the static
int8 flow (prepare, calibrate, convert, observers), quantized modules, saving and loading, and a report of what
quantization changed."""
from mltoolkit.quantization.api import (
    QuantizationReport,
    QuantizeSummary,
    convert,
    load_quantized,
    model_bytes,
    prepare,
    quantization_report,
    quantize_,
    save_quantized,
)
from mltoolkit.quantization.config import (
    Int4WeightOnlyConfig,
    Int8DynamicActivationInt8WeightConfig,
    Int8StaticActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    QuantConfig,
    config_from_dict,
)
from mltoolkit.quantization.modules import Int4Linear, Int8Conv2d, Int8Linear, Int8StaticLinear, Int8WeightOnlyLinear
from mltoolkit.quantization.observers import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    Observer,
    PercentileObserver,
)
from mltoolkit.quantization.qat import QATConv2d, QATLinear, freeze_observers, prepare_qat
from mltoolkit.quantization.static import ObservedModule, calibrate

__all__ = ["quantize_", "save_quantized", "load_quantized", "quantization_report", "model_bytes", "QuantizeSummary",
           "QuantizationReport", "QuantConfig", "Int8DynamicActivationInt8WeightConfig", "Int4WeightOnlyConfig",
           "config_from_dict", "Int8Linear", "Int4Linear",
           "Int8WeightOnlyConfig", "Int8StaticActivationInt8WeightConfig", "Int8WeightOnlyLinear", "Int8StaticLinear",
           "Int8Conv2d", "prepare", "calibrate", "convert", "ObservedModule", "Observer", "MinMaxObserver",
           "MovingAverageMinMaxObserver", "PercentileObserver", "MSEObserver", "prepare_qat", "QATLinear",
           "QATConv2d", "freeze_observers"]
