"""metaaug: low-bit post-training quantization (RTN, AdaRound, BRECQ, QDrop, MetaAug) for PyTorch models."""

from metaaug import data, models
from metaaug.api import quantize
from metaaug.errors import ConfigError, DataError, MetaAugError, ModelError
from metaaug.export.pack import load_quantized
from metaaug.methods import (
                             AdaRoundConfig,
                             BRECQConfig,
                             JobContext,
                             MetaAugConfig,
                             MethodResult,
                             QDropConfig,
                             RTNConfig,
                             method_config,
                             method_names,
                             register_method,
)
from metaaug.quant import QuantModel, QuantSpec, prepare

__all__ = ["AdaRoundConfig", "BRECQConfig", "ConfigError", "DataError", "JobContext", "MetaAugConfig", "MetaAugError",
           "MethodResult", "ModelError", "QDropConfig", "QuantModel", "QuantSpec", "RTNConfig", "data", "load_quantized",
           "method_config", "method_names", "models", "prepare", "quantize", "register_method"]
__version__ = "0.1.0"
