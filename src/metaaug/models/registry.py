"""Model lookup: bundled names, or a user's `path/to/file.py:factory` with a weights file."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from metaaug.errors import ModelError
from metaaug.models.mobilenet import mobilenetv2
from metaaug.models.resnet import resnet20, resnet56
from metaaug.models.vit import vit
from metaaug.quant.prepare import check_model_tensors

WEIGHTS_DIR = Path(__file__).parent / "weights"
BUNDLED: dict[str, Callable[[], nn.Module]] = {"resnet20": resnet20, "mobilenetv2": mobilenetv2, "resnet56": resnet56, "vit": vit}


def bundled_weights(name: str) -> Path:
    return WEIGHTS_DIR / f"{name}_fmnist.safetensors"


def _load_factory(spec: str) -> Callable[[], nn.Module]:
    path_str, _, attr = spec.rpartition(":")
    path = Path(path_str)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist (expected 'path/to/file.py:factory')")
    mod_spec = importlib.util.spec_from_file_location(f"metaaug_user_model_{path.stem}", path)
    if mod_spec is None or mod_spec.loader is None:
        raise ModelError(f"cannot import {path} as a Python module")
    module = importlib.util.module_from_spec(mod_spec)
    sys.modules[mod_spec.name] = module
    try:
        mod_spec.loader.exec_module(module)
    except Exception as exc:  # a user file: SyntaxError, ImportError, anything its top level raises
        sys.modules.pop(mod_spec.name, None)
        raise ModelError(f"model file {path} failed to import: {_reason(exc)}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ModelError(f"{path} has no callable named {attr!r}")

    def build() -> nn.Module:
        try:
            return factory()
        except Exception as exc:
            raise ModelError(f"model factory {path}:{attr}() raised {_reason(exc)}") from None
    return build


def _reason(exc: BaseException) -> str:
    """One line: the exception type, its first message line, and for syntax errors the line number."""
    msg = str(exc).splitlines()[0] if str(exc) else ""
    if isinstance(exc, SyntaxError):
        msg = f"{exc.msg} (line {exc.lineno})"
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


def build_model(name: str, weights: str | Path | None = None) -> nn.Module:
    """Build a model in eval mode with weights loaded.

    `name` is a bundled name (`resnet20`, `mobilenetv2`) or `path/to/file.py:factory`, where `factory()`
    returns an `nn.Module`; `weights` is a safetensors or `torch.save` state dict (loaded with
    `weights_only=True`). Bundled models default to their shipped checkpoint. A model on the meta device is
    refused; a half- or double-precision one is converted to float32 with a warning.
    """
    if name in BUNDLED:
        model = BUNDLED[name]()
        if weights is None and not bundled_weights(name).is_file():
            raise ModelError(f"the weights of bundled model {name!r} are not in this install; "
                             f"train them with `metaaug train --model {name}`")
        weights = weights if weights is not None else bundled_weights(name)
    elif ":" in name and name.rpartition(":")[0].endswith(".py"):
        model = _load_factory(name)()
        if not isinstance(model, nn.Module):
            raise ModelError(f"{name} returned {type(model).__name__}, not an nn.Module")
        if weights is None:
            raise ModelError(f"a user model needs a weights file (--weights) for {name}")
    else:
        raise ModelError(f"unknown model {name!r}; use one of {sorted(BUNDLED)} or 'path/to/file.py:factory'")
    check_model_tensors(model)  # before loading: float32 weights are not rounded through a half-precision model first
    load_weights(model, weights)
    return model.eval()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict safely: safetensors, or a torch file with `weights_only=True`."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"weights file {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelError(f"cannot read weights file {path}: {str(exc).splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path} does not hold a state dict of tensors")
    return state


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a checkpoint, naming missing, unexpected and mis-shaped keys when it does not match."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if shapes:
            parts.append(f"{len(shapes)} with wrong shape (e.g. {shapes[0]})")
        raise ModelError(f"weights file {path} does not match the model: " + "; ".join(parts))
    for key, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ModelError(f"weights file {path}: tensor '{key}' holds {int((~torch.isfinite(t)).sum())} NaN/Inf value(s)")
    model.load_state_dict(state)
