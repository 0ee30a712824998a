"""Walk the split graph unit by unit, keeping only the live tensors (each node runs once per path)."""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch import fx

from metaaug.quant.prepare import QuantModel
from metaaug.recon.cache import Cache, StoredRows, is_rows, slice_rows, take_rows

Value = object


def map_chunks(fn: Callable[..., Value], args: tuple, chunk: int | None, device: torch.device, out_device: torch.device,
               cache: Cache | None = None, name: str = "") -> Value:
    """Apply `fn` to `args` in slices of up to `chunk` rows along dim 0, moving each slice to `device` and back.

    With a `cache`, the output tensors are allocated by it (in memory or spilled, see `recon.cache`) and filled
    slice by slice, so a large output is never held twice."""
    tensors = [a for a in args if is_rows(a)]
    n = tensors[0].shape[0] if tensors else 0
    if chunk is not None and tensors:
        chunk = slice_rows(tensors[0].shape[1:], chunk)
    if chunk is None or n <= chunk:
        out = fn(*[a.to(device) if is_rows(a) else a for a in args])
        return _to(out, out_device) if cache is None else _store(out, None, 0, n, cache, out_device, name)
    parts, stored = [], None
    for i in range(0, n, chunk):
        sl = [a[i : i + chunk].to(device) if is_rows(a) else a for a in args]
        out = fn(*sl)
        if cache is None:
            parts.append(_to(out, out_device))
        else:
            stored = _store(out, stored, i, n, cache, out_device, name)
    if cache is not None:
        return stored
    if isinstance(parts[0], tuple):
        return tuple(torch.cat(p) for p in zip(*parts, strict=True))
    return torch.cat(parts)


def _store(out: Value, stored: Value | None, start: int, n: int, cache: Cache, device: torch.device, name: str) -> Value:
    """Write slice `out` (rows from `start` of `n`) into the cache's tensors, allocating them at the first slice."""
    if isinstance(out, tuple | list):
        stored = stored if stored is not None else (None,) * len(out)
        return type(out)(_store(o, s, start, n, cache, device, f"{name}[{j}]") for j, (o, s) in enumerate(zip(out, stored, strict=True)))
    if not isinstance(out, torch.Tensor) or out.dim() == 0:
        return _to(out, device)
    target = stored if stored is not None else cache.allocate((n, *out.shape[1:]), out.dtype, name)
    if isinstance(target, torch.Tensor):
        target[start : start + out.shape[0]].copy_(out)
    else:
        target.write(start, out)
    return target


def _to(value: Value, device: torch.device) -> Value:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple | list):
        return type(value)(_to(v, device) for v in value)
    return value


class GraphStepper:
    """Executes the top-level graph of a `QuantModel` on a whole tensor, pausing before each unit.

    The quantization flags of the model at the time each node runs decide which path (FP or quantized)
    is computed, so one class serves both caches and the MetaAug prefix/suffix passes.
    """

    def __init__(self, qmodel: QuantModel, images: torch.Tensor, device: torch.device,
                 cache_device: torch.device | str = "cpu", chunk: int | None = 256, cache: Cache | None = None) -> None:
        self.qmodel, self.cache = qmodel, cache
        self.nodes = list(qmodel.gm.graph.nodes)
        self.device, self.cache_device, self.chunk = device, torch.device(cache_device), chunk
        self.last_use = {}
        for i, node in enumerate(self.nodes):
            for inp in node.all_input_nodes:
                self.last_use[inp] = i
        placeholder = self.nodes[0]
        self.env: dict[fx.Node, Value] = {placeholder: images.to(self.cache_device)}
        self.pos = 1
        self.unit_index = {t: i for i, t in enumerate(qmodel.unit_targets)}

    def _run_node(self, node: fx.Node, value: Value | None = None) -> None:
        if value is None:
            args = fx.node.map_arg(node.args, lambda n: self.env[n])
            if node.op == "call_module":
                mod = self.qmodel.gm.get_submodule(node.target)
                value = map_chunks(mod, args, self.chunk, self.device, self.cache_device, self.cache, str(node.target))
            elif node.op == "call_function":
                kwargs = fx.node.map_arg(node.kwargs, lambda n: self.env[n])
                value = self._call_function(node, args, kwargs)
            elif node.op == "output":
                value = args[0]
            else:
                raise RuntimeError(f"unexpected top-level node {node.op} {node.target}")
        self.env[node] = value
        for inp in node.all_input_nodes:
            if self.last_use.get(inp) == self.pos:
                del self.env[inp]
        self.pos += 1

    def _call_function(self, node: fx.Node, args: tuple, kwargs: dict) -> Value:
        """A function between units runs on whole tensors: stored rows are read back for it (in float32), and a
        large result goes back to the cache, so correctness never depends on the function working row by row."""
        if node.target is operator.getitem and isinstance(args[0], tuple | list):
            return args[0][args[1]]  # picking a unit's output: nothing to read back
        stored = False

        def load(v: Value) -> Value:
            nonlocal stored
            if isinstance(v, StoredRows):
                stored = True
                return v.to(self.cache_device)
            return v

        args, kwargs = fx.node.map_aggregate(args, load), fx.node.map_aggregate(kwargs, load)
        value = node.target(*args, **kwargs)
        if stored and isinstance(value, torch.Tensor) and value.dim() > 0:
            value = _store(value, None, 0, value.shape[0], self.cache, self.cache_device, node.name)
        return value

    def advance_to(self, unit: int) -> tuple:
        """Run up to (not including) unit `unit` and return the unit's input arguments."""
        while True:
            node = self.nodes[self.pos]
            if node.op == "call_module" and self.unit_index.get(node.target) == unit:
                return tuple(fx.node.map_arg(node.args, lambda n: self.env[n]))
            if node.op == "output":
                raise IndexError(f"unit {unit} not found after position {self.pos}")
            self._run_node(node)

    def batch_view(self, idx: torch.Tensor, device: torch.device) -> GraphStepper:
        """A stepper paused at the same place, holding only rows `idx` of every live tensor (for MetaAug's suffix)."""
        view = object.__new__(GraphStepper)
        view.__dict__.update(self.__dict__)
        view.env = {n: take_rows(v, idx).to(device) if is_rows(v) else v for n, v in self.env.items()}
        view.device, view.cache_device, view.chunk, view.cache = device, device, None, None
        return view

    def step(self, value: Value | None = None) -> None:
        """Execute the unit the stepper is paused at (or record `value` as its output)."""
        self._run_node(self.nodes[self.pos], value)

    def finish(self) -> Value:
        while self.nodes[self.pos].op != "output":
            self._run_node(self.nodes[self.pos])
        out = fx.node.map_arg(self.nodes[self.pos].args[0], lambda n: self.env[n])
        return out
