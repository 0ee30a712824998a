"""Progress callbacks for phased jobs (search, QAT): one bar per phase with a free-text status."""

from __future__ import annotations

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
