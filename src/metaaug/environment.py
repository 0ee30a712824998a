"""The machine a job runs on: the device it asks for, the threads of the hot loops, and what reports record of it.

OpenMP's wait policy is set once, in `metaaug/__init__.py`, before torch loads its OpenMP runtime.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from metaaug.errors import ConfigError

DEVICE_KINDS = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """The device to run on (`auto`: CUDA when present); on CUDA, full-FP32 arithmetic from here on (`ieee_fp32`)."""
    check_device_name(str(device), "device")
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if str(device) == "auto" else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda requested but no CUDA device is available")
    if dev.type == "cuda":
        ieee_fp32()
    return dev


def check_device_name(name: str, what: str) -> None:
    """`auto`, `cpu`, `cuda` or `cuda:N`; anything else is refused in one line naming the option."""
    kind, _, index = name.partition(":")
    if kind not in DEVICE_KINDS or (index and (kind != "cuda" or not index.isdigit())):
        raise ConfigError(f"{what} must be auto, cpu, cuda or cuda:N, got {name!r}")


def ieee_fp32() -> None:
    """Turn off TF32 for convolutions and matrix products. cuDNN convolves in TF32 by default on Ampere and later
    GPUs; its ~1e-3 relative error moves values across rounding thresholds, and a W4A4 ResNet-20 on an H200 then
    disagreed with the CPU on 2% of its predictions. Simulated quantization must compute what the CPU computes."""
    torch.backends.cudnn.conv.fp32_precision = "ieee"
    torch.backends.cuda.matmul.fp32_precision = "ieee"


def loop_threads() -> int:
    """Threads for the small-batch hot loops (reconstruction, meta steps).

    Each iteration is ~100 small ops; with sleeping OpenMP workers (PASSIVE) every op pays a wake-up, so one
    thread is faster (measured: 9.4/6.4/5.5 vs 10.6/8.1/11.2 ms per ResNet-20 block step, idle 2-core machine)
    and stays fast when other processes share the cores. With OMP_WAIT_POLICY=ACTIVE (a dedicated machine)
    all threads are used: ~1.45x faster idle, but 10-100x slower under contention.
    """
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "ACTIVE":
        return torch.get_num_threads()
    return 1


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


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
