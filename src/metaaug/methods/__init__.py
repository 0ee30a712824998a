"""PTQ methods as small configs over the shared reconstruction engine, found through one registry."""

from metaaug.methods.configs import AdaRoundConfig, BRECQConfig, QDropConfig, RTNConfig
from metaaug.methods.metaaug import MetaAugConfig
from metaaug.methods.registry import JobContext, MethodResult, method_config, method_names, register_method
from metaaug.recon.config import ReconConfig

__all__ = ["AdaRoundConfig", "BRECQConfig", "JobContext", "MetaAugConfig", "MethodResult", "QDropConfig", "RTNConfig",
           "ReconConfig", "method_config", "method_names", "register_method"]
