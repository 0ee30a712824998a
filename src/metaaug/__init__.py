"""metaaug: low-bit post-training quantization (RTN, AdaRound, BRECQ, QDrop, MetaAug) for PyTorch models."""

from metaaug.api import quantize
from metaaug.errors import ConfigError, DataError, MetaAugError, ModelError
from metaaug.export.pack import load_quantized
from metaaug.methods import METHODS, AdaRoundConfig, BRECQConfig, QDropConfig, RTNConfig, method_config
from metaaug.quant import QuantModel, QuantSpec, prepare

__all__ = ["METHODS", "AdaRoundConfig", "BRECQConfig", "ConfigError", "DataError", "MetaAugError", "ModelError",
           "QDropConfig", "QuantModel", "QuantSpec", "RTNConfig", "load_quantized", "method_config", "prepare", "quantize"]
__version__ = "0.1.0"
