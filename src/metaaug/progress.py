"""Progress callbacks: per reconstruction unit (quantize) and per phase (search, QAT), and the per-unit statistics they report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class PhaseProgress(Protocol):
    def phase(self, name: str, total: int) -> None: ...
    def advance(self, steps: int, info: str) -> None: ...


class QuietPhases:
    """No display (the Python API's default)."""

    def phase(self, name: str, total: int) -> None:
        pass

    def advance(self, steps: int, info: str) -> None:
        pass


@dataclass
class UnitStats:
    name: str
    iters: int
    seconds: float
    ms_per_iter: float
    loss_start: float | None = None
    loss_end: float | None = None
    extra: dict = field(default_factory=dict)


class Progress(Protocol):
    def start(self, unit_names: list[str]) -> None: ...
    def plan(self, estimate, cache_budget: int) -> None: ...  # a `recon.estimate.JobEstimate`, before unit 1
    def unit_start(self, index: int, name: str, total: int) -> None: ...
    def advance(self, steps: int) -> None: ...
    def unit_end(self, index: int, stats: UnitStats) -> None: ...


class NullProgress:
    def start(self, unit_names: list[str]) -> None:
        pass

    def plan(self, estimate, cache_budget: int) -> None:
        pass

    def unit_start(self, index: int, name: str, total: int) -> None:
        pass

    def advance(self, steps: int) -> None:
        pass

    def unit_end(self, index: int, stats: UnitStats) -> None:
        pass
