"""Rich progress bars and tables for the engine's progress callbacks."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from metaaug.recon.engine import UnitStats


class RichProgress:
    """One bar per unit, showing iterations and ms/iteration as it goes."""

    def __init__(self, console: Console) -> None:
        self.console, self.n_units = console, 0
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console)
        self.task = None

    def __enter__(self) -> RichProgress:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def start(self, unit_names: list[str]) -> None:
        self.n_units = len(unit_names)

    def unit_start(self, index: int, name: str, total: int) -> None:
        self.task = self.bar.add_task(f"unit {index + 1}/{self.n_units} {name}", total=max(total, 1), info="")

    def advance(self, steps: int) -> None:
        self.bar.advance(self.task, steps)

    def unit_end(self, index: int, stats: UnitStats) -> None:
        info = f"{stats.ms_per_iter:.1f} ms/it" if stats.iters else "no optimisation"
        if stats.loss_end is not None:
            info += f"  loss {stats.loss_start:.4g} -> {stats.loss_end:.4g}"
        self.bar.update(self.task, completed=max(stats.iters, 1), info=info)


def report_table(report: dict) -> Table:
    table = Table(title=f"{report['model']} {report['method']} W{report['wbits']}A{report['abits']}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("fp_top1", "quant_top1", "calib_top1", "holdout_top1", "calib_size", "iters", "seed",
                "seconds", "recon_seconds", "meta_seconds"):
        if key in report:
            table.add_row(key, str(report[key]))
    if report.get("unit_plan"):
        kinds: dict[str, int] = {}
        for unit in report["unit_plan"]:
            kinds[unit["found"]] = kinds.get(unit["found"], 0) + 1
        table.add_row("units", f"{len(report['unit_plan'])} ({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))})")
    return table
