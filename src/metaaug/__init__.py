"""metaaug: low-bit post-training quantization (RTN, AdaRound, BRECQ, QDrop, MetaAug) for PyTorch models."""

import os

# Sleeping OpenMP workers, set here once, before anything imports torch (libgomp reads it when it loads): the default
# and ACTIVE spinning stall 10-100x when other processes share the cores (measured here); the hot loops run
# single-threaded instead (environment.loop_threads). OMP_WAIT_POLICY=ACTIVE in the environment overrides it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# isort: split

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
