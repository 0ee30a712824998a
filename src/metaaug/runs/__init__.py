"""Run folders: the one place jobs keep their config, checkpoints and results, and the checks on output paths."""

from metaaug.runs.files import CorruptFileError
from metaaug.runs.folder import Checkpoint, Checkpoints, RunFolder
from metaaug.runs.outputs import check_output_file

__all__ = ["Checkpoint", "Checkpoints", "CorruptFileError", "RunFolder", "check_output_file"]
