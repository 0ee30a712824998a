"""Checking config dataclasses: a `--set key=value` string coerced to its field's type, and every field checked
against its annotated type and declared range, so the CLI and the Python API refuse a bad value in the same line.

A config declares its ranges in a class-level `RANGES: ClassVar[Ranges]` (merged along its base classes) and calls
`check_config(self)` from `__post_init__`. A rule is one of:

- a bound, `">= 0"`, `"> 0"`, `"<= 1"`, `"< 1"`, or an interval, `"(0, 1]"`, `"[0, 1)"`;
- a tuple of the allowed values, `("block", "layer")`;
- `"bits"`, a bit-width (`check_bits`), or `"device"`, a device to keep data on (cpu, cuda, cuda:N).

On a tuple field the rule applies to each element; a field's `None` (for `X | None`) is not checked against it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import operator
import re
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

from metaaug.environment import check_device_name
from metaaug.errors import ConfigError

Rule = str | tuple[str, ...]
Ranges = dict[str, Rule]

SEED = "[0, 4294967295]"  # what every seeded generator (torch, numpy, random) takes
TRUE, FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
NULL = ("null", "none")
_NONE = type(None)
_FAILED = object()  # a string that does not parse as its field's type
_SIMPLE = {_NONE: "null", bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}
_PLURAL = {bool: "true/false values", int: "integers", float: "finite numbers", str: "strings"}
_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt}
_BOUND = re.compile(r"^(>=|>|<=|<)\s*(\S+)$")
_INTERVAL = re.compile(r"^([\[(])\s*([^,\s]+)\s*,\s*([^,\s\])]+)\s*([\])])$")


@functools.cache
def field_types(cls: type) -> dict[str, Any]:
    """Each field's annotated type (`Any` where a user's class has annotations that do not resolve)."""
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError, AttributeError):
        hints = {}
        for klass in reversed(cls.__mro__):
            try:
                hints.update(typing.get_type_hints(klass))
            except (NameError, TypeError, AttributeError):
                continue
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def _union(tp: Any) -> tuple[Any, ...] | None:
    return typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else None


def _item_types(tp: Any, n: int) -> list[Any] | None:
    """The element types of `n` items for a tuple or list annotation; None if a fixed-length tuple has not `n`."""
    args = typing.get_args(tp)
    if not args:
        return [Any] * n
    if typing.get_origin(tp) is list or (len(args) == 2 and args[1] is Ellipsis):
        return [args[0]] * n
    return list(args) if len(args) == n else None


def fits(value: Any, tp: Any) -> bool:
    """Whether `value` has type `tp` (bool is not an int; an int is a float; a float must be finite)."""
    members = _union(tp)
    if members:
        return any(fits(value, m) for m in members)
    if tp is Any:
        return True
    if tp is _NONE:
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool) and (isinstance(value, int) or math.isfinite(value))
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (tuple, list):
        items = _item_types(tp, len(value)) if isinstance(value, tuple if origin is tuple else tuple | list) else None
        return items is not None and all(fits(v, t) for v, t in zip(value, items, strict=True))
    if origin in (dict, Mapping):
        return isinstance(value, Mapping) and (not args or all(fits(k, args[0]) and fits(v, args[1]) for k, v in value.items()))
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # an annotation this checker does not know: left to the config's own checks


def describe(tp: Any) -> str:
    """`tp` in words, for "x must be ..."."""
    members = _union(tp)
    if members:
        return " or ".join(describe(m) for m in members)
    if tp in _SIMPLE:
        return _SIMPLE[tp]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (tuple, list):
        if not args:
            return "a list"
        if origin is tuple and args[-1] is not Ellipsis:
            if len(set(args)) == 1:
                return f"a list of {len(args)} {_PLURAL.get(args[0], 'values')}"
            return f"a list ({', '.join(describe(a) for a in args)})"
        return f"a list of {_PLURAL.get(args[0], 'values')}"
    if origin in (dict, Mapping):
        return "a mapping"
    return f"a {tp.__name__}" if isinstance(tp, type) else str(tp)


def _parse(raw: str, tp: Any) -> Any:
    """`raw` as a value of type `tp` (ValueError if it is not one). Lists: JSON (`[3,32,32]`) or `a,b` / `a+b`."""
    text = raw.strip()
    members = _union(tp)
    if members:
        if _NONE in members and text.lower() in NULL:
            return None
        for member in members:
            if member is _NONE:
                continue
            try:
                value = _parse(raw, member)
            except ValueError:
                continue
            if fits(value, member):
                return value
        raise ValueError(raw)
    if tp is str:
        return raw
    if tp is bool:
        if text.lower() in TRUE + FALSE:
            return text.lower() in TRUE
        raise ValueError(raw)
    if tp is int:
        return int(text)
    if tp is float:
        return float(text)
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        items = json.loads(text) if text.startswith("[") else [p.strip() for p in re.split(r"[,+]", text) if p.strip()]
        item_types = _item_types(tp, len(items)) if isinstance(items, list) else None
        if item_types is None:
            raise ValueError(raw)
        values = [_parse(v, t) if isinstance(v, str) else v for v, t in zip(items, item_types, strict=True)]
        return tuple(values) if origin is tuple else values
    try:
        return json.loads(text)
    except ValueError:
        if tp is Any:
            return raw
        raise


def coerce(cls: type, key: str, value: Any) -> Any:
    """The value of field `key` of config class `cls`: a string (as `--set key=value` gives it) parsed to the
    field's type, one line naming the option if it is not one; a value of any other type as given (the config's
    own check types it), so callers that pass typed values keep working."""
    if not isinstance(value, str):
        return value
    tp = field_types(cls)[key]
    try:
        parsed = _parse(value, tp)
    except (ValueError, RecursionError):
        parsed = _FAILED
    if parsed is _FAILED or not fits(parsed, tp):
        raise ConfigError(f"--set {key}={shown(value, quote=False)}: {key} must be {describe(tp)}")
    return parsed


def coerce_options(cls: type, options: Mapping[str, Any], what: str) -> dict[str, Any]:
    """Keyword overrides for config class `cls`: names checked (`what` names the config in the error), strings
    coerced by field type."""
    names = field_types(cls)
    for key in options:
        if key not in names:
            raise ConfigError(f"{what} has no option {key!r}; options: {', '.join(names)}")
    return {key: coerce(cls, key, value) for key, value in options.items()}


def check_config(cfg: Any, ranges: Mapping[str, Rule] | None = None) -> None:
    """Refuse, in one line naming the field, a value of the wrong type or outside its range (the class's `RANGES`
    along its bases, then `ranges`). A list given for a tuple field becomes a tuple (JSON has no tuples)."""
    cls = type(cfg)
    typed = field_types(cls)
    rules: dict[str, Rule] = {}
    for klass in reversed(cls.__mro__):
        rules.update(klass.__dict__.get("RANGES", {}))
    rules.update(ranges or {})
    stray = sorted(set(rules) - set(typed))
    if stray:
        raise TypeError(f"{cls.__name__} declares a range for {stray[0]!r}, which is not one of its fields")
    for name, tp in typed.items():
        value = getattr(cfg, name)
        if isinstance(value, list) and not fits(value, tp) and fits(tuple(value), tp):
            value = tuple(value)
            object.__setattr__(cfg, name, value)  # frozen configs too
        if not fits(value, tp):
            raise ConfigError(f"{name} must be {describe(tp)}, got {shown(value)}")
        if name in rules and value is not None:
            check_value(name, value, rules[name])


def check_value(what: str, value: Any, rule: Rule) -> None:
    """`value` (each element, for a tuple or list) within `rule`, else one line naming `what`."""
    many = isinstance(value, tuple | list)
    for item in value if many else (value,):
        if rule == "bits":
            from metaaug.quant.quantizers import check_bits

            check_bits(item, what)
            continue
        if rule == "device":  # a place to keep tensors: a device name, but not "auto"
            try:
                check_device_name(str(item), what)
            except ConfigError:
                item = None
            if item in (None, "auto"):
                raise ConfigError(f"{what} must be cpu, cuda or cuda:N (where tensors are kept), got {shown(value)}")
            continue
        if isinstance(rule, tuple):
            ok, text = item in rule, f"one of {', '.join(map(str, rule))}"
        else:
            test, text = _numeric(rule)
            ok = isinstance(item, int | float) and not isinstance(item, bool) and test(item)
        if not ok:
            raise ConfigError(f"{what} must{' each' if many else ''} be {text}, got {shown(value)}")


@functools.cache
def _numeric(rule: str) -> tuple[Callable[[float], bool], str]:
    """A bound or interval rule as a test and its text ("in (0, 1]" for an interval)."""
    if m := _BOUND.match(rule):
        op, bound = _OPS[m.group(1)], float(m.group(2))
        return (lambda x: op(x, bound)), rule
    if m := _INTERVAL.match(rule):
        low, high = float(m.group(2)), float(m.group(3))
        above = operator.ge if m.group(1) == "[" else operator.gt
        below = operator.le if m.group(4) == "]" else operator.lt
        return (lambda x: above(x, low) and below(x, high)), f"in {rule}"
    raise ValueError(f"not a range rule: {rule!r}")


def shown(value: Any, quote: bool = True, limit: int = 60) -> str:
    """A value for an error line, cut short (a hostile value can be huge, or nested too deeply to print)."""
    try:
        text = repr(value) if quote or not isinstance(value, str) else value
    except RecursionError:
        return "a value nested too deeply to show"
    return text if len(text) <= limit else text[:limit] + "..."
