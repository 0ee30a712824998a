"""The QAT recipe as one typed config: MEBQAT and the baselines it is measured against."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from metaaug.config_check import Ranges, check_config
from metaaug.errors import ConfigError
from metaaug.qat.switchable import Width
from metaaug.quant.quantizers import check_bits

QAT_METHODS = {
    "mebqat": "MEBQAT: each step samples bit-width tasks (lowest and highest forced) on one batch, averages their "
              "gradients (CE + soft CE to the FP forward), one step; no inner adaptation (as the released code)",
    "mebqat-maml": "MEBQAT with first-order MAML: per task, inner SGD on half the batch at its width, outer gradient "
                   "on the other half at the adapted weights",
    "joint": "Any-Precision-style joint training: every candidate width every step (CE + soft CE to FP)",
    "dedicated": "LSQ QAT of one model per width (CE at that width only); give one width",
}


@dataclass(frozen=True)
class QATConfig:
    """Bitwidth-adaptive QAT, MEBQAT (Youn et al., "Bitwidth-Adaptive Quantization-Aware Neural Network Training: a
    Meta-Learning Approach", ECCV 2022), with the released code's defaults where it has them: 4 tasks per step
    (here: FP plus `tasks` quantized widths), AdamW, gradients clamped to +-10. `lr` is the weights' learning rate,
    `quant_lr` the quantizers' (their log steps: a relative change per step). Candidates are W=A pairs from `bits`,
    or every (w, a) with `abits` set. First and last layers stay at 8 bits (the PTQ baselines' setting).
    """

    method: str = "mebqat"
    bits: tuple[int, ...] = (2, 3, 4, 8)
    abits: tuple[int, ...] | None = None
    tasks: int = 3
    distill: float = 1.0
    epochs: int = 2
    steps: int | None = None
    batch: int = 128
    lr: float = 1e-4
    quant_lr: float = 5e-3
    weight_decay: float = 5e-5
    grad_clamp: float = 10.0
    share_quantizers: bool = False
    inner_steps: int = 1
    inner_lr: float = 0.01
    calib_size: int = 1024
    classes: tuple[int, ...] | None = None
    eval_size: int = 2000
    save_every: int = 100
    RANGES: ClassVar[Ranges] = {
        "tasks": ">= 1", "distill": ">= 0", "epochs": ">= 1", "steps": ">= 1", "batch": ">= 1", "lr": "> 0", "quant_lr": "> 0",
        "weight_decay": ">= 0", "grad_clamp": "> 0", "inner_steps": ">= 1", "inner_lr": "> 0", "calib_size": ">= 1",
        "classes": ">= 0", "eval_size": ">= 1", "save_every": ">= 1",
    }

    def __post_init__(self) -> None:
        check_config(self)
        if self.method not in QAT_METHODS:
            raise ConfigError(f"unknown QAT method {self.method!r}; choose from {', '.join(QAT_METHODS)}")
        if not self.bits:
            raise ConfigError("the list of candidate bit-widths is empty; give e.g. --bits 2,4,8")
        for b in (*self.bits, *(self.abits or ())):
            check_bits(b, "candidate bit-width")
        if self.abits is not None and not self.abits:
            raise ConfigError("the list of candidate activation bit-widths is empty")
        if self.method == "dedicated" and len(self.widths()) != 1:
            raise ConfigError(f"dedicated QAT trains one width; got {len(self.widths())} ({self.bits})")

    def widths(self) -> list[Width]:
        """Candidate (weight bits, activation bits) pairs, lowest first."""
        if self.abits is None:
            return [(b, b) for b in sorted(set(self.bits))]
        return [(w, a) for w in sorted(set(self.bits)) for a in sorted(set(self.abits))]

    def wbits(self) -> list[int]:
        return sorted({w for w, _ in self.widths()})

    def abits_list(self) -> list[int]:
        return sorted({a for _, a in self.widths()})
