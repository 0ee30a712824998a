"""PTQ methods as small configs over the shared reconstruction engine."""

from metaaug.methods.configs import METHODS, AdaRoundConfig, BRECQConfig, QDropConfig, ReconConfig, RTNConfig, method_config

__all__ = ["METHODS", "AdaRoundConfig", "BRECQConfig", "QDropConfig", "RTNConfig", "ReconConfig", "method_config"]

from metaaug.methods.metaaug import MetaAugConfig

__all__ += ["MetaAugConfig"]
