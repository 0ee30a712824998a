"""Rich progress bars and tables for the engine's progress callbacks."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from metaaug.progress import UnitStats


class _Bars:
    """A rich progress display with one bar per phase and a free-text info column; a context manager."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                            console=console)
        self.task = None

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)


class RichProgress(_Bars):
    """One bar per unit, showing iterations and ms/iteration as it goes; with an estimate, a job bar whose time
    remaining is the whole reconstruction's (units weighted by their estimated ms/iteration)."""

    def __init__(self, console: Console) -> None:
        super().__init__(console)
        self.n_units = 0
        self.job = None
        self.weights: dict[str, float] = {}
        self.unit_weight = 0.0

    def start(self, unit_names: list[str]) -> None:
        self.n_units = len(unit_names)

    def plan(self, estimate, cache_budget: int) -> None:
        from metaaug.recon.cache import human

        where = "in memory" if estimate.cache_peak <= cache_budget else "spilling past it to disk"
        self.console.print(
            f"estimate: reconstruction ~{_duration(estimate.seconds)} for {len(estimate.units)} units x {estimate.iters} "
            f"iterations (from timed FP passes; quantized steps run slower); caches ~{human(estimate.cache_peak)} at the "
            f"largest unit, budget {human(cache_budget)}: {where}", highlight=False, soft_wrap=True)
        mean = sum(u.ms_per_iter for u in estimate.units) / max(len(estimate.units), 1)
        if mean > 0:  # the job bar counts iterations, each weighted by its unit's cost relative to the mean
            self.weights = {u.name: u.ms_per_iter / mean for u in estimate.units}
            self.job = self.bar.add_task("job", total=len(estimate.units) * estimate.iters, info="")

    def unit_start(self, index: int, name: str, total: int) -> None:
        self.unit_weight = self.weights.get(name, 0.0)
        self.task = self.bar.add_task(f"unit {index + 1}/{self.n_units} {name}", total=max(total, 1), info="")

    def advance(self, steps: int) -> None:
        self.bar.advance(self.task, steps)
        if self.job is not None:
            self.bar.advance(self.job, steps * self.unit_weight)

    def unit_end(self, index: int, stats: UnitStats) -> None:
        info = f"{stats.ms_per_iter:.1f} ms/it" if stats.iters else "no optimisation"
        if stats.loss_end is not None:
            info += f"  loss {stats.loss_start:.4g} -> {stats.loss_end:.4g}"
        self.bar.update(self.task, completed=max(stats.iters, 1), info=info)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class RichPhases(_Bars):
    """One bar per phase (MetaQuantNet steps, GA generations, QAT epochs) with its current status."""

    def phase(self, name: str, total: int) -> None:
        self.task = self.bar.add_task(name, total=max(total, 1), info="")

    def advance(self, steps: int, info: str) -> None:
        self.bar.update(self.task, advance=steps, info=info)


def report_table(report: dict) -> Table:
    bits = "mixed-precision policy" if "policy" in report else f"W{report['wbits']}A{report['abits']}"
    table = Table(title=f"{report['model']} {report['method']} {bits}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("fp_top1", "quant_top1", "calib_top1", "holdout_top1", "calib_size", "iters", "seed",
                "seconds", "recon_seconds", "meta_seconds"):
        if key in report:
            table.add_row(key, str(report[key]))
    if "cost" in report:
        c = report["cost"]
        table.add_row("weights", f"{c['weight_kb']:.1f} KB ({100 * c['weight_vs_w8a8']:.1f}% of W8A8), avg {c['avg_wbits']:.2f} bits")
        table.add_row("BOPs", f"{c['gbops']:.3f} G ({100 * c['bops_vs_w8a8']:.1f}% of W8A8)")
    if "cache" in report:
        c = report["cache"]
        table.add_row("cache", f"{c['where']} ({c['dtype']}), peak {c['peak_memory']} in memory"
                      + (f" + {c['peak_disk']} on disk" if c["spilled_tensors"] else "") + f", budget {c['budget']}")
    if report.get("unit_plan"):
        kinds: dict[str, int] = {}
        for unit in report["unit_plan"]:
            kinds[unit["found"]] = kinds.get(unit["found"], 0) + 1
        table.add_row("units", f"{len(report['unit_plan'])} ({', '.join(f'{v} {k}' for k, v in sorted(kinds.items()))})")
    return table


def cost_table(cost: dict) -> Table:
    """Per-layer bits, weight memory and BOPs, then the totals against FP32 and uniform W8A8."""
    table = Table(title="cost of the bit-width policy")
    for col in ("layer", "W", "A", "params", "MACs", "weight KB", "MBOPs"):
        table.add_column(col, justify="left" if col == "layer" else "right")
    for r in cost["layers"]:
        table.add_row(r["name"], str(r["wbits"]), "image" if r["abits"] is None else str(r["abits"]), str(r["params"]),
                      str(r["macs"]), f"{r['weight_bits'] / 8192:.2f}", f"{r['bops'] / 1e6:.1f}")
    for r in cost.get("matmuls", []):
        table.add_row(f"{r['name']} ({r['role']} matmul)", "-", "x".join(map(str, r["abits"])), "0", str(r["macs"]), "0.00",
                      f"{r['bops'] / 1e6:.1f}")
    table.add_section()
    table.add_row("total", f"{cost['avg_wbits']:.2f}", "", "", "", f"{cost['weight_kb']:.2f}", f"{cost['gbops'] * 1e3:.1f}")
    table.add_row("vs FP32", "", "", "", "", f"{100 * cost['weight_vs_fp32']:.1f}%", f"{100 * cost['bops_vs_fp32']:.2f}%")
    table.add_row("vs W8A8", "", "", "", "", f"{100 * cost['weight_vs_w8a8']:.1f}%", f"{100 * cost['bops_vs_w8a8']:.1f}%")
    return table
