"""Shared output of the benchmark scripts: `results.json` and a markdown `results.md` led by the exact command."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any


def mean_std(vals: list[float]) -> str:
    """`mean ± std` over seeds (the value alone for one seed)."""
    return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else f"{vals[0]:.2f}"


def strip_run(report: dict[str, Any]) -> dict[str, Any]:
    """A report without its long per-unit lists, for results.json."""
    return {k: v for k, v in report.items() if k not in ("units", "meta_units")}


def write_results(out: Path, command: str, rows: list[dict], payload: dict[str, Any], legend: str, label: str = "") -> None:
    (out / "results.json").write_text(json.dumps({"label": label, "command": command, "summary": rows, **payload}, indent=2) + "\n")
    cols = list(rows[0]) if rows else []
    lines = ([f"**{label}**", ""] if label else []) + [f"Command: `{command}`", "", legend, "",
                                                      "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")
