"""What every subcommand shares: the typer app, the two consoles, and the rule that a user error is one line."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Mapping

import typer
from rich.console import Console
from rich.markup import escape

from metaaug.errors import ConfigError, MetaAugError, MetaAugWarning

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


def parse_options(items: list[str]) -> dict[str, str]:
    """`--set key=value` items as raw strings: the config they go to coerces each by its field's type."""
    opts: dict[str, str] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got {item!r}")
        if key in opts:
            raise ConfigError(f"--set {key} is given twice ({opts[key]!r} and {raw!r}); give it once")
        opts[key] = raw
    return opts


def refuse_set(options: Mapping[str, str], own: Mapping[str, str]) -> None:
    """A `--set` key that has its own option (key -> option) would be overridden by it: refused, naming the option."""
    for key, option in own.items():
        if key in options:
            raise ConfigError(f"--set {key}={options[key]}: use {option} instead of --set")


def parse_ints(text: str | None, what: str) -> tuple[int, ...] | None:
    """A comma-separated list of integers from option `what` (None when not given); empty or non-integer refused."""
    if text is None:
        return None
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise ConfigError(f"{what} is empty; give e.g. 2,4,8")
    return values
