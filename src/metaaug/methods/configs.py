"""One dataclass per method, holding the paper's defaults; the API, CLI and benchmarks all use these."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from metaaug.errors import ConfigError


@dataclass
class ReconConfig:
    """Knobs shared by every reconstruction method (BRECQ's loop: Adam, batch 32, 20k iterations per unit)."""

    name: ClassVar[str] = "recon"
    iters: int = 20000
    batch_size: int = 32
    units: str = "block"
    lr_round: float = 1e-3
    lr_act: float = 4e-5
    lr_weight_scale: float = 0.0
    round_weight: float | None = None
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    quant_prob: float = 1.0
    learn_rounding: bool = True
    learn_act_scale: bool = True
    cache_device: str = "cpu"

    def __post_init__(self) -> None:
        if self.iters < 0:
            raise ConfigError(f"iters must be >= 0, got {self.iters}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 < self.quant_prob <= 1.0:
            raise ConfigError(f"quant_prob must be in (0, 1], got {self.quant_prob}")
        if not 0.0 <= self.warmup < 1.0:
            raise ConfigError(f"warmup must be in [0, 1), got {self.warmup}")

    def resolved_round_weight(self, depthwise: bool) -> float:
        """QDrop uses 0.01, and 0.1 for MobileNetV2 (models with depthwise convs)."""
        if self.round_weight is not None:
            return self.round_weight
        return 0.1 if depthwise else 0.01

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, **dataclasses.asdict(self)}


@dataclass
class RTNConfig(ReconConfig):
    """Round-to-nearest with Lp-searched (MSE-style) clipping; no optimisation. The floor every method must beat."""

    name: ClassVar[str] = "rtn"
    iters: int = 0
    learn_rounding: bool = False
    learn_act_scale: bool = False


@dataclass
class AdaRoundConfig(ReconConfig):
    """AdaRound (Nagel et al., ICML 2020): learned rounding per layer against the layer's FP output."""

    name: ClassVar[str] = "adaround"
    units: str = "layer"
    learn_act_scale: bool = False


@dataclass
class BRECQConfig(ReconConfig):
    """BRECQ (Li et al., ICLR 2021): AdaRound per block, with learned activation steps."""

    name: ClassVar[str] = "brecq"


@dataclass
class QDropConfig(ReconConfig):
    """QDrop (Wei et al., ICLR 2022): BRECQ plus random element-wise dropping of activation quantization (p=0.5)."""

    name: ClassVar[str] = "qdrop"
    quant_prob: float = 0.5


METHODS: dict[str, type[ReconConfig]] = {c.name: c for c in (RTNConfig, AdaRoundConfig, BRECQConfig, QDropConfig)}


def register(cls: type[ReconConfig]) -> type[ReconConfig]:
    METHODS[cls.name] = cls
    return cls


def method_config(method: str | ReconConfig, **overrides: Any) -> ReconConfig:
    """A method's config from its name (with overrides) or a config passed through."""
    if isinstance(method, ReconConfig):
        return dataclasses.replace(method, **overrides) if overrides else method
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    cls = METHODS[method]
    names = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(overrides) - names)
    if bad:
        raise ConfigError(f"{method} has no option {bad[0]!r}")
    return cls(**{k: v for k, v in overrides.items() if v is not None})


