"""The engine's configuration: the knobs every reconstruction method shares (methods subclass it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from metaaug.config_check import Ranges, check_config

SCHEDULES = ("constant", "cosine")


@dataclass
class ReconConfig:
    """Knobs shared by every reconstruction method (BRECQ's loop: Adam, batch 32, 20k iterations per unit).

    `scale_schedule="cosine"` anneals the activation- and weight-step learning rates to 0 over the unit's iterations,
    as QDrop's and Genie's released code do; the rounding logits keep a constant rate in either case.
    `aug_views` > 0 (not in any of the papers) reconstructs on each calibration image plus that many random
    shift/flip views of it, drawn once per run (seeded): fixed augmentation, the control a learned one must beat.
    `cache_dtype` stores the cached unit inputs/outputs in bfloat16 or float16 (half the memory; not in the papers,
    measured in bench/cache_dtype); float32 keeps the papers' numbers. Where the caches live is a run setting, not a
    config field (`CacheSettings`: the budget changes speed, never the result).
    Two speed options, off by default (not in the papers; the CLI's `--fast` turns on both; measured in
    bench/speed/options and options3: accuracy held over 3 seeds, 0.75x the time with 2 threads, little with one thread
    on an idle CPU; off so that the papers' float32 numbers stay bit-identical): `compute_dtype="bfloat16"`
    runs the unit's convolutions and matmuls under bf16 autocast during reconstruction steps only (caching, observation
    and evaluation stay float32; activations are still quantized in float32); `compile_fake_quant` runs the fused
    activation fake-quant through torch.compile during the steps (compile time per shape, outputs identical).
    `RANGES` are what each knob can mean: a learned parameter needs a positive rate, `lr_weight_scale` 0 is off.
    """

    name: ClassVar[str] = "recon"
    RANGES: ClassVar[Ranges] = {
        "iters": ">= 0", "batch_size": ">= 1", "units": ("block", "layer"), "lr_round": "> 0", "lr_act": "> 0",
        "lr_weight_scale": ">= 0", "scale_schedule": SCHEDULES, "round_weight": ">= 0", "warmup": "[0, 1)",
        "beta_start": "> 0", "beta_end": "> 0", "quant_prob": "(0, 1]", "cache_device": "device", "aug_views": ">= 0",
        "cache_dtype": ("float32", "bfloat16", "float16"), "compute_dtype": ("float32", "bfloat16"),
    }
    iters: int = 20000
    batch_size: int = 32
    units: str = "block"
    lr_round: float = 1e-3
    lr_act: float = 4e-5
    lr_weight_scale: float = 0.0
    scale_schedule: str = "constant"
    round_weight: float | None = None
    warmup: float = 0.2
    beta_start: float = 20.0
    beta_end: float = 2.0
    quant_prob: float = 1.0
    learn_rounding: bool = True
    learn_act_scale: bool = True
    cache_device: str = "cpu"
    cache_dtype: str = "float32"
    compute_dtype: str = "float32"
    compile_fake_quant: bool = False
    aug_views: int = 0

    def __post_init__(self) -> None:
        check_config(self)

    def resolved_round_weight(self, depthwise: bool) -> float:
        """QDrop uses 0.01, and 0.1 for MobileNetV2 (models with depthwise convs)."""
        if self.round_weight is not None:
            return self.round_weight
        return 0.1 if depthwise else 0.01
