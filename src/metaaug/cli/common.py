"""What every subcommand shares: the typer app, the two consoles, and the rule that a user error is one line."""

from __future__ import annotations

import functools
import json
import warnings

import typer
from rich.console import Console
from rich.markup import escape

from metaaug.errors import MetaAugError, MetaAugWarning

app = typer.Typer(add_completion=False, no_args_is_help=False,
                  help="Low-bit post-training quantization (MetaAug, QDrop, BRECQ, AdaRound, RTN).")
console = Console(stderr=True)
out_console = Console()


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """metaaug's own warnings as one yellow line on stderr; others as Python prints them."""
    if issubclass(category, MetaAugWarning):
        console.print(f"[bold yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)
    else:
        _python_show(message, category, filename, lineno, file, line)


_python_show = warnings.showwarning


def friendly(fn):
    """Turn user errors into one red line and exit code 2, never a traceback; metaaug warnings into one line each."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        warnings.showwarning = _show_warning
        try:
            return fn(*args, **kwargs)
        except MetaAugError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            console.print("[bold red]interrupted[/]: progress saved so far is kept; rerun the same command to resume")
            raise typer.Exit(130) from None
    return wrapper


def fail(message: str) -> None:
    console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def parse_options(items: list[str]) -> dict:
    opts = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep:
            raise MetaAugError(f"--set expects key=value, got {item!r}")
        try:
            opts[key] = json.loads(raw)
        except json.JSONDecodeError:
            opts[key] = raw
    return opts
