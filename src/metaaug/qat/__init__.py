"""Quantization-aware training: one network trained for many bit-widths (MEBQAT) and its baselines."""

from metaaug.qat.config import QAT_METHODS, QATConfig
from metaaug.qat.switchable import QATModel, Width, width_name

__all__ = ["QAT_METHODS", "QATConfig", "QATModel", "Width", "width_name"]
