"""The machine a result was computed on, recorded in every report so that results from two hosts can be told apart."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import torch


def environment(dev: torch.device) -> dict[str, Any]:
    """What a result was computed on. One seed gives the same bits on one host; on another, kernels picked by CPU
    feature level (AVX2, AVX512, ...) may round differently, and long runs amplify that. Reports say which host."""
    env: dict[str, Any] = {"device": str(dev), "torch": torch.__version__, "threads": torch.get_num_threads(),
                           "cpu": torch.backends.cpu.get_cpu_capability(), "cpu_model": _cpu_model()}
    if dev.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(dev)
    return env


def _cpu_model() -> str:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), platform.processor())
