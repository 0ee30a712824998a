"""The pieces the ONNX exporter writes with: a node and initializer builder, the values it tracks (ONNX name plus
shadow values at two batch sizes), and the tables that map torch and ATen names to ONNX ops."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from metaaug.quant.attention import masked_scores

INT64_MAX = 2**63 - 1  # an open slice end


class _Builder:
    """Accumulates ONNX nodes and initializers with unique names."""

    def __init__(self, onnx: Any) -> None:
        self.onnx, self.h, self.tp = onnx, onnx.helper, onnx.TensorProto
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self._used: set[str] = set()

    def name(self, base: str) -> str:
        base = base.replace(".", "_") or "t"
        name, i = base, 1
        while name in self._used:
            name, i = f"{base}_{i}", i + 1
        self._used.add(name)
        return name

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        arr = np.asarray(array)
        self.inits.append(self.onnx.numpy_helper.from_array(np.ascontiguousarray(arr) if arr.ndim else arr, name))
        return name

    def raw(self, base: str, dtype: int, dims: list[int], data: bytes) -> str:
        name = self.name(base)
        self.inits.append(self.h.make_tensor(name, dtype, dims, data, raw=True))
        return name

    def op(self, op_type: str, inputs: list[str], base: str, **attrs: Any) -> str:
        out = self.name(base)
        self.nodes.append(self.h.make_node(op_type, inputs, [out], name=out, **attrs))
        return out


@dataclass(eq=False)
class _Run:
    """A value computed when the ONNX graph runs: its name there and its values on the two shadow batches (tensors,
    or ints for a size that follows the batch, held in the graph as an int64 scalar)."""

    name: str
    values: tuple[Any, Any]

    @property
    def is_size(self) -> bool:
        return isinstance(self.values[0], int)

    @property
    def rank(self) -> int:
        return self.values[0].dim()


@dataclass
class _Call:
    """The node being exported: the base of its ONNX names and its values on the two shadow batches."""

    base: str
    outs: tuple[Any, Any]

    @property
    def out(self) -> Any:
        return self.outs[0]


def _has_run(v: Any) -> bool:
    if isinstance(v, _Run):
        return True
    if isinstance(v, list | tuple):
        return any(_has_run(a) for a in v)
    if isinstance(v, dict):
        return any(_has_run(a) for a in v.values())
    if isinstance(v, slice):
        return any(_has_run(a) for a in (v.start, v.stop, v.step))
    return False


def _pair(v: Any) -> list[int]:
    return list(v) if isinstance(v, tuple | list) else [v, v]


def _function_name(target: Any) -> str | None:
    """The name a torch function or an ATen operator goes by (`torch.ops.aten.view.default` -> "view"); None for
    anything else (a user's function), which is then unsupported."""
    if target in _OPERATORS:
        return _OPERATORS[target]
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::", 1)[1] if target.namespace == "aten" else None
    module = getattr(target, "__module__", None) or ""
    return getattr(target, "__name__", None) if module == "torch" or module.startswith("torch.") else None


_OPERATORS = {operator.add: "add", operator.iadd: "add", operator.sub: "sub", operator.mul: "mul", operator.imul: "mul",
              operator.truediv: "div", operator.floordiv: "floordiv", operator.pow: "pow", operator.neg: "neg",
              operator.matmul: "matmul", operator.ge: "ge", operator.gt: "gt", operator.le: "le", operator.lt: "lt",
              operator.eq: "eq", operator.ne: "ne", operator.invert: "bitwise_not", masked_scores: "masked_scores"}
# torch functions, tensor methods and ATen operators that compute the same, by name
_ALIASES = {"view": "reshape", "_unsafe_view": "reshape", "true_divide": "div", "divide": "div", "multiply": "mul",
            "subtract": "sub", "_softmax": "softmax", "concat": "cat", "concatenate": "cat", "sym_size": "size",
            "clone": "contiguous", "detach": "contiguous", "alias": "contiguous", "lift_fresh_copy": "contiguous",
            "bmm": "matmul", "split_with_sizes": "split", "chunk": "split", "logical_not": "bitwise_not",
            "swapaxes": "transpose", "feature_dropout": "dropout", "greater_equal": "ge", "greater": "gt",
            "less_equal": "le", "less": "lt"}
_CHECKS = frozenset({"_assert_tensor_metadata", "_assert_scalar", "_assert_async", "sym_constrain_range",
                     "sym_constrain_range_for_size"})  # torch.export's run-time checks: nothing to compute
_BINARY = {"add": "Add", "sub": "Sub", "mul": "Mul", "div": "Div", "pow": "Pow"}
_SIZE_OPS = {"add": "Add", "sub": "Sub", "mul": "Mul", "floordiv": "Div"}  # sizes are >= 0: truncation is floor
_COMPARE = {"ge": "GreaterOrEqual", "gt": "Greater", "le": "LessOrEqual", "lt": "Less", "eq": "Equal"}
_UNARY = {"relu": "Relu", "sigmoid": "Sigmoid", "tanh": "Tanh", "neg": "Neg", "exp": "Exp", "sqrt": "Sqrt", "erf": "Erf",
          "abs": "Abs", "log": "Log", "reciprocal": "Reciprocal", "hardswish": "HardSwish", "bitwise_not": "Not"}
_MODULE_UNARY: tuple[tuple[type[nn.Module], str], ...] = ((nn.ReLU, "Relu"), (nn.Sigmoid, "Sigmoid"), (nn.Tanh, "Tanh"),
                                                         (nn.Hardswish, "HardSwish"))
