"""`metaaug runs`: a table of run folders side by side and, with --plot, top-1 against weight memory or BOPs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.measure import Measurement
from rich.segment import Segment, Segments
from rich.table import Table

from metaaug.cli.common import app, friendly, out_console
from metaaug.errors import ConfigError
from metaaug.runs.summary import RunRow

PLOT_MARK = "metaaug runs"  # the PNG's Software tag: a plot this command wrote, which it may replace
AXES = ("memory", "bops")
COLUMNS = ("folder", "kind", "model", "method", "top-1", "weight KB", "GBOPs", "seconds", "resumed", "note")


def written_by_runs(path: Path) -> bool:
    """A PNG an earlier `metaaug runs --plot` wrote (its text metadata carries the mark)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.format == "PNG" and getattr(im, "text", {}).get("Software") == PLOT_MARK
    except (OSError, ValueError, SyntaxError):  # not an image, a truncated one, or broken chunks
        return False


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _yes(value: bool | None) -> str:
    return "-" if value is None else "yes" if value else "no"


def runs_table(rows: list[RunRow]) -> Table:
    """One line per row; an unfinished or unreadable run shows why in the note column."""
    folders = len({r.folder for r in rows})
    title = f"{folders} run folder{'s' * (folders != 1)}" + (f", {len(rows)} rows (one per QAT width)" if len(rows) != folders else "")
    table = Table(title=title, title_justify="left")
    for col in COLUMNS:
        table.add_column(col, justify="right" if col in ("top-1", "weight KB", "GBOPs", "seconds") else "left")
    for r in rows:
        note = r.note if r.finished else r.status
        top1 = _fmt(r.top1, ".2f") + ("*" if r.heldout and r.top1 is not None else "")
        table.add_row(r.folder, r.kind, r.model or "-", r.method_bits or "-", top1, _fmt(r.weight_kb, ".1f"),
                      _fmt(None if r.bops is None else r.bops / 1e9, ".4g"), _fmt(r.seconds, ".1f"), _yes(r.resumed), note,
                      style=None if r.finished else "yellow" if r.status.startswith("in progress") else "red")
    if any(r.heldout and r.top1 is not None for r in rows):
        table.caption = "* a search's top-1 is on its held-out calibration images, the others' on the test split"
        table.caption_justify = "left"
    return table


def _print_whole(table: Table) -> None:
    """On a terminal the table fits its width; into a pipe or a file, each row stays on one line (not cut at 80
    columns), so the output can be searched and compared."""
    if out_console.is_terminal:
        out_console.print(table)
        return
    options = out_console.options
    width = Measurement.get(out_console, options.update(width=10_000), table).maximum
    segments: list[Segment] = []
    for line in out_console.render_lines(table, options.update(width=width), pad=False):
        while line and not line[-1].text.strip():  # the title's and caption's padding: no trailing blanks in a file
            line = line[:-1]
        segments += [*line[:-1], Segment(line[-1].text.rstrip(), line[-1].style)] if line else []
        segments.append(Segment.line())
    out_console.print(Segments(segments), soft_wrap=True, end="")


@app.command()
@friendly
def runs(
    dirs: Annotated[list[Path], typer.Argument(help="run folders, or folders of run folders (e.g. runs/)", show_default=False)],
    plot: Annotated[Path | None, typer.Option(help="write a PNG of top-1 against --x, each run a point")] = None,
    x: Annotated[str, typer.Option("--x", help="the plot's x axis: memory (weight KB) | bops")] = "memory",
    force: Annotated[bool, typer.Option("--force", help="--plot may overwrite a file `metaaug runs` did not write")] = False,
) -> None:
    """List run folders (quantize, qat, search, synth): method and bits, top-1, weight memory, BOPs, time.

    A QAT run gives one row per width; its weight memory and BOPs are the cost model's for that uniform width (as
    `metaaug cost --wbits W --abits A` gives them), worked out from its model, or '-' and no point in the plot when
    the model cannot be built here. A search's top-1 is on its held-out calibration images. A run without a result is
    "in progress" (or was interrupted: rerun its command to resume); an unreadable file is "corrupt: <file>".
    """
    from metaaug.runs.outputs import check_output_file
    from metaaug.runs.summary import plottable, summarize

    if x not in AXES:
        raise ConfigError(f"--x {x!r}: use memory or bops")
    if plot is not None:
        if plot.suffix.lower() != ".png":
            raise ConfigError(f"--plot {plot}: the figure is a PNG; give a file name ending in .png")
        check_output_file(plot, "--plot", PLOT_MARK, written_by_runs, force)
    rows = summarize(dirs)
    _print_whole(runs_table(rows))
    if plot is None:
        return
    points = plottable(rows, x)
    if not points:
        raise ConfigError(f"--plot: no finished run has a top-1 and a {'weight memory' if x == 'memory' else 'BOPs'} figure to plot")
    from metaaug.viz import save_runs_plot

    save_runs_plot(points, plot, x, {"Software": PLOT_MARK, "Title": f"top-1 vs {x} of {len(points)} runs"})
    out_console.print(f"plot: {plot} ({len(points)} point{'s' * (len(points) != 1)})", highlight=False)
