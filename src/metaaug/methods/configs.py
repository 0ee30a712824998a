"""One dataclass per reconstruction method, holding the paper's defaults, and the handler that runs them all.

The API, CLI and benchmarks all use these configs; the registry maps each config type to its handler.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from metaaug.methods.registry import JobContext, MethodResult, register_method
from metaaug.quant.prepare import QuantModel
from metaaug.recon.config import ReconConfig
from metaaug.recon.engine import Reconstructor


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
    """QDrop (Wei et al., ICLR 2022): BRECQ plus random element-wise dropping of activation quantization (p=0.5).

    One change from the paper's recipe, measured in `bench/recipe`: the weight quantizers' per-channel steps are
    learned as well (Adam, lr 1e-4, as in Genie-M and MetaAug's released code). On ResNet-20 W2A2 that gains about
    0.9 points at 500 iterations per unit. `QDropConfig.paper()` (CLI: `--set lr_weight_scale=0`) is the paper's
    recipe, with fixed weight steps.
    """

    name: ClassVar[str] = "qdrop"
    quant_prob: float = 0.5
    lr_weight_scale: float = 1e-4

    @classmethod
    def paper(cls, **overrides) -> QDropConfig:
        """The paper's recipe: weight steps fixed at their Lp-searched values."""
        return cls(**{"lr_weight_scale": 0.0, **overrides})


@register_method(ReconConfig, RTNConfig, AdaRoundConfig, BRECQConfig, QDropConfig)
def reconstruct(qmodel: QuantModel, cfg: ReconConfig, ctx: JobContext) -> MethodResult:
    """The plain engine loop: every method here differs only in its config."""
    engine = Reconstructor(qmodel, cfg, seed=ctx.seed, device=ctx.device, progress=ctx.progress, store=ctx.store,
                           cache=ctx.cache)
    return MethodResult(qmodel, engine.run(ctx.images), engine.engine_report())
