"""The method registry: a config type maps to the handler that runs it (as torchao maps a config to its transform).

A handler is `(prepared model, config, context) -> MethodResult`. Adding a method is one module that defines its
config dataclass (with a `name`) and decorates its handler with `@register_method(ConfigType)`; list the module in
`BUILTIN`, or, from another package, in the `metaaug.methods` entry-point group. The API, the pipeline and the CLI
find it from here and need no edit.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import torch

from metaaug.config_check import coerce_options
from metaaug.data.datasets import ImageDataset
from metaaug.errors import ConfigError
from metaaug.progress import NullProgress, Progress, UnitStats
from metaaug.quant.prepare import QuantModel
from metaaug.recon.cache import CacheSettings
from metaaug.recon.config import ReconConfig
from metaaug.runs.store import RunStore

BUILTIN = ("metaaug.methods.configs", "metaaug.methods.metaaug")
ENTRY_POINT_GROUP = "metaaug.methods"


@dataclass
class JobContext:
    """What a job has for a method: calibration images (labels when known), held-out split, run store, progress,
    output folder, seed, device and cache settings. Handlers take what they need and ignore the rest."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    holdout: ImageDataset | None = None
    store: RunStore | None = None
    progress: Progress = field(default_factory=NullProgress)
    out_dir: Path | None = None
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    cache: CacheSettings | None = None  # where reconstruction caches live (budget, spill folder); None: defaults


@dataclass
class MethodResult:
    """The quantized model (quantization on, rounding hard), per-unit statistics and the method's report fields."""

    model: QuantModel
    stats: list[UnitStats] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)


Handler = Callable[[QuantModel, Any, JobContext], MethodResult]
_HANDLERS: dict[type, Handler] = {}
_loaded = False


def register_method(*config_types: type) -> Callable[[Handler], Handler]:
    """Register `handler` for each config type; subclasses without their own handler inherit it."""
    def deco(handler: Handler) -> Handler:
        for cls in config_types:
            _HANDLERS[cls] = handler
        return handler
    return deco


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN:
        importlib.import_module(module)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        ep.load()


def config_types() -> dict[str, type]:
    """Method name -> config type, for every registered method."""
    _load()
    return {cls.name: cls for cls in _HANDLERS if cls is not ReconConfig}


def method_names() -> list[str]:
    return list(config_types())


def handler_for(cfg: Any) -> Handler:
    """The handler of the config's type, or of its nearest registered base class."""
    _load()
    for cls in type(cfg).__mro__:
        if cls in _HANDLERS:
            return _HANDLERS[cls]
    raise ConfigError(f"no method is registered for config type {type(cfg).__name__}")


def config_dict(cfg: Any) -> dict[str, Any]:
    """A method config as stored in a run's config.json: its name and every field."""
    return {"method": type(cfg).name, **dataclasses.asdict(cfg)}


def method_config(method: Any, **overrides: Any) -> Any:
    """A method's config from its name (with overrides) or a config passed through (overrides applied). Overrides
    may be `--set` strings: each is coerced to its field's type, and the config checks every value."""
    if dataclasses.is_dataclass(method) and not isinstance(method, type):
        handler_for(method)
        cls = type(method)
        return dataclasses.replace(method, **coerce_options(cls, overrides, getattr(cls, "name", cls.__name__))) if overrides else method
    cls = method_class(method)
    return cls(**coerce_options(cls, overrides, method))


def method_class(method: str) -> type:
    """The config type of a method name, or one line listing the names."""
    types = config_types()
    if method not in types:
        raise ConfigError(f"unknown method {method!r}; choose from {', '.join(types)}")
    return types[method]
