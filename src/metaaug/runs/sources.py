"""Paths a job reads (model file, weights, data) stored absolute, so every later command works from any folder."""

from __future__ import annotations

import os
from typing import Any

PATH_FIELDS = ("model", "weights", "data_dir", "synth")


def absolute_source(field: str, value: Any) -> Any:
    """`value` with its path made absolute: a model only when it is `path/to/file.py:factory` (a bundled name stays)."""
    if not isinstance(value, str) or not value:
        return value
    if field == "model":
        path, sep, attr = value.rpartition(":")
        return f"{os.path.abspath(path)}:{attr}" if sep and path.endswith(".py") else value
    return os.path.abspath(value)


def absolutize(cfg: Any) -> None:
    """Make the job config's path fields absolute in place (frozen dataclasses included)."""
    for field in PATH_FIELDS:
        if hasattr(cfg, field):
            object.__setattr__(cfg, field, absolute_source(field, getattr(cfg, field)))
