"""The shared reconstruction engine: unit-by-unit caching and optimisation (AdaRound/BRECQ/QDrop loop)."""

from metaaug.recon.engine import Reconstructor, UnitData
from metaaug.recon.stepper import GraphStepper

__all__ = ["GraphStepper", "Reconstructor", "UnitData"]
