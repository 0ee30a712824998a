"""Turn any `nn.Module` into a fake-quant model split into reconstruction units.

Steps: capture the graph (`quant.capture`: torch.fx, else torch.export), fold BN, wrap every Conv2d/Linear in a
`QuantLayer`, put one `ActQuantizer` on each tensor a quantized layer or a GELU reads (shared by all its readers, the
image excepted), turn each matmul between two activations into a `QuantMatmul` with a quantizer on each input (a
softmax output on the chosen grid), then split the graph into units.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.split_module import split_module

from metaaug.errors import ConfigError, ModelError, warn
from metaaug.quant.capture import Example, capture
from metaaug.quant.fold import fold_batchnorm
from metaaug.quant.graph_ops import insert_matmul_quantizers, localize_constants, params_into_modules, quantized_readers, warn_unhandled_ops
from metaaug.quant.layers import SUPPORTED, ParamRef, QuantLayer, QuantMatmul
from metaaug.quant.policy import Policy
from metaaug.quant.quantizers import ActQuantizer, check_bits
from metaaug.quant.reparam import reparam_layernorms
from metaaug.quant.units import UnitFinder, UnitPlan, check_unit_names, warn_fallback

ALLOWED_PARAM_FREE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardswish, nn.Hardsigmoid, nn.SiLU, nn.GELU, nn.Sigmoid, nn.Tanh,
                      nn.Identity, nn.Flatten, nn.Dropout, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                      nn.AdaptiveMaxPool2d)
KEPT_FLOAT = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)  # normalisations left in float (BN folded)


SOFTMAX_GRIDS = ("uniform", "log2")
DEFAULT_WBITS, DEFAULT_ABITS = 2, 4  # the one default setting of the API, the CLI and RunConfig: W2A4


@dataclass(frozen=True)
class QuantSpec:
    """Bit-widths in the QDrop setting: first layer W8 on the raw image, last layer W8 with an A8 input.

    With a `policy` (mixed precision) every layer takes its own weight and input-activation bits from it instead,
    the first and last layers included.
    """

    wbits: int = DEFAULT_WBITS
    abits: int = DEFAULT_ABITS
    first_last_bits: int = 8
    fold_bn: bool = True
    policy: Policy | None = None
    softmax_grid: str = "uniform"  # grid of the quantizer on a softmax output: "uniform" or "log2" (FQ-ViT, RepQ-ViT)
    ln_reparam: bool = False  # move LayerNorm's per-channel output ranges into the next Linear layers (RepQ-ViT)

    def __post_init__(self) -> None:
        check_bits(self.wbits, "weight bit-width (wbits)")
        check_bits(self.abits, "activation bit-width (abits)")
        check_bits(self.first_last_bits, "first/last layer bit-width")
        if self.softmax_grid not in SOFTMAX_GRIDS:
            raise ConfigError(f"softmax_grid must be one of {', '.join(SOFTMAX_GRIDS)}, got {self.softmax_grid!r}")
        if self.policy is not None and not isinstance(self.policy, Policy):  # e.g. from dataclasses.asdict / JSON
            object.__setattr__(self, "policy", Policy.from_dict(self.policy))


class QuantModel(nn.Module):
    """The prepared fake-quant model: a split FX graph whose top-level submodules are the units."""

    def __init__(self, gm: fx.GraphModule, plans: list[UnitPlan]) -> None:
        super().__init__()
        self.gm = gm
        self.unit_plans = plans
        self.unit_names = [p.name for p in plans]
        self.unit_targets = [f"submod_{i}" for i in range(len(plans))]
        self.input_shape: tuple[int, ...] | None = None
        # a parameter read in several units (`x + self.pos` in every block) sits in each of them: one state-dict entry
        paths: dict[int, list[str]] = {}
        for name, mod in self.named_modules(remove_duplicate=False):
            if isinstance(mod, ParamRef):
                paths.setdefault(id(mod), []).append(f"{name}.value")
        self._aliases = {alias: names[0] for names in paths.values() for alias in names[1:]}
        if self._aliases:
            self._register_state_dict_hook(_drop_aliases)
            self._register_load_state_dict_pre_hook(_fill_aliases, with_module=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gm(x)

    def unit(self, i: int) -> nn.Module:
        return getattr(self.gm, self.unit_targets[i])

    def units(self) -> list[nn.Module]:
        return [self.unit(i) for i in range(len(self.unit_names))]

    def quant_layers(self, module: nn.Module | None = None) -> Iterator[QuantLayer]:
        yield from (m for m in (module or self).modules() if isinstance(m, QuantLayer))

    def matmuls(self, module: nn.Module | None = None) -> Iterator[QuantMatmul]:
        """The matmuls between two activations (attention's QK^T and attn.V), each input quantized."""
        yield from (m for m in (module or self).modules() if isinstance(m, QuantMatmul))

    def act_quantizers(self, module: nn.Module | None = None) -> Iterator[ActQuantizer]:
        yield from (m for m in (module or self).modules() if isinstance(m, ActQuantizer))

    def set_quant(self, weights: bool, acts: bool, module: nn.Module | None = None) -> None:
        """Switch weight/activation quantization on or off for the whole model or one unit."""
        for layer in self.quant_layers(module):
            layer.quantize_weight = weights
        for aq in self.act_quantizers(module):
            aq.enabled = acts and bool(aq.initialized)

    def harden(self) -> None:
        for layer in self.quant_layers():
            layer.wq.harden()
        for aq in self.act_quantizers():
            aq.scale.requires_grad_(False)
            aq.quant_prob = 1.0


def _drop_aliases(module: QuantModel, state: dict, prefix: str, _meta: dict) -> None:
    for alias in module._aliases:
        state.pop(prefix + alias, None)


def _fill_aliases(module: QuantModel, state: dict, prefix: str, *_args) -> None:
    for alias, name in module._aliases.items():
        if prefix + name in state and prefix + alias not in state:
            state[prefix + alias] = state[prefix + name]


def check_model_tensors(model: nn.Module) -> None:
    """A model on the meta device has no values to quantize (refused); float16/bfloat16/float64 weights would meet
    float32 images and quantizers, so they are converted to float32 in place, with a warning. Non-floating buffers
    (BatchNorm's num_batches_tracked) stay as they are."""

    tensors = [*model.named_parameters(), *model.named_buffers()]
    meta = [name for name, t in tensors if t.is_meta]
    if meta:
        raise ModelError(f"model tensor '{meta[0]}' ({len(meta)} of {len(tensors)}) is on the meta device and holds no values; "
                         "build the model with real tensors (e.g. load_state_dict(..., assign=True) or .to_empty() then load)")
    odd = sorted({str(t.dtype).removeprefix("torch.") for _, t in tensors if t.is_floating_point() and t.dtype != torch.float32})
    if odd:
        model.float()
        warn(f"the model's weights are {' and '.join(odd)}; converted to float32 (metaaug quantizes float32 models)")


def check_finite_weights(model: nn.Module) -> None:
    """Meta, non-float32 (`check_model_tensors`) and NaN/Inf weights: NaN/Inf would quantize to garbage without an
    error, so the first such tensor is named."""
    check_model_tensors(model)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise ModelError(f"model tensor '{name}' holds {bad} NaN/Inf value(s); the checkpoint is corrupt")


def _check_layers(gm: fx.GraphModule) -> None:
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        mod = modules[node.target]
        if isinstance(mod, SUPPORTED + ALLOWED_PARAM_FREE + KEPT_FLOAT):
            continue
        if any(True for _ in mod.parameters(recurse=False)) or any(True for _ in mod.buffers(recurse=False)):
            raise ModelError(f"unknown layer type {type(mod).__name__} at '{node.target}': "
                             "supported are Conv2d, Linear, BatchNorm, LayerNorm, GroupNorm, MultiheadAttention and "
                             "parameter-free activations/pooling")


def _layer_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    modules = dict(gm.named_modules())
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules[n.target], QuantLayer)]


def _reaches_output_directly(node: fx.Node, layers: set[fx.Node]) -> bool:
    """True when the node's value reaches the graph output without passing another quantized layer."""
    todo, seen = list(node.users), set()
    while todo:
        n = todo.pop()
        if n in seen or n in layers:
            continue
        seen.add(n)
        if n.op == "output":
            return True
        todo.extend(n.users)
    return False


def _input_bits(spec: QuantSpec, consumers: list[fx.Node], last: set[fx.Node]) -> int:
    """Bits of the quantizer on a tensor: all layers reading it share that quantizer, so their policy must agree."""
    if spec.policy is None:
        return spec.first_last_bits if any(u in last for u in consumers) else spec.abits
    wanted = {str(u.target): spec.policy.layers[str(u.target)].abits for u in consumers}
    if len(set(wanted.values())) > 1:
        pairs = ", ".join(f"{k}: A{v}" for k, v in wanted.items())
        raise ConfigError(f"policy gives different abits to layers that read the same tensor ({pairs}); they share one quantizer")
    return next(iter(wanted.values()))


def _reader_name(node: fx.Node) -> str:
    """A non-layer reader of a quantized tensor (a GELU) by its module path, else its graph name."""
    return str(node.target) if node.op == "call_module" else node.name


def prepare(model: nn.Module, spec: QuantSpec, units: str | Sequence[str] = "block",
            example: Example = None) -> QuantModel:
    """Build the fake-quant model (quantization off) from a copy of `model`.

    `units`: 'block' (blocks found from the graph: residual/concat regions, multi-layer modules, lone layers
    elsewhere; see `quant.units`), 'layer' (one unit per Conv/Linear, AdaRound) or a list of module paths.
    `example` (a batch of inputs, or a function returning one) is needed only for models torch.fx cannot trace:
    torch.export captures them from it.
    """
    model = copy.deepcopy(model).eval()
    if not any(isinstance(m, SUPPORTED) for m in model.modules()):
        raise ModelError(f"{type(model).__name__} has no Conv2d or Linear layer to quantize")
    check_finite_weights(model)
    if isinstance(units, str) and units not in ("block", "layer"):
        raise ConfigError(f"units must be 'block', 'layer' or a list of module paths, got {units!r}")
    mode: str | list[str] = units if isinstance(units, str) else check_unit_names(model, units)

    gm = capture(model, example)
    _check_layers(gm)
    if spec.fold_bn:
        fold_batchnorm(gm)
    warn_unhandled_ops(gm, spec.fold_bn)
    if spec.ln_reparam:
        calib = example() if callable(example) else example
        if calib is None:
            raise ConfigError("ln_reparam measures LayerNorm outputs: pass calibration images (example=...) to prepare()")
        if not reparam_layernorms(gm, calib):
            warn("ln_reparam: no nn.LayerNorm read only by Linear layers in the graph (a torch.export capture keeps "
                 "LayerNorm as an ATen op); nothing was reparameterised")
    modules = dict(gm.named_modules())

    # wrap layers
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules[node.target], SUPPORTED):
            parent, _, attr = node.target.rpartition(".")
            owner = gm.get_submodule(parent) if parent else gm
            setattr(owner, attr, QuantLayer(modules[node.target], spec.wbits))
    modules = dict(gm.named_modules())
    layers = _layer_nodes(gm)
    layer_set = set(layers)
    first = {n for n in layers if all(a.op == "placeholder" for a in n.all_input_nodes)}
    last = {n for n in layers if _reaches_output_directly(n, layer_set)}
    if spec.policy is not None:
        spec.policy.check_layers([str(n.target) for n in layers])
    for n in layers:
        ql = modules[n.target]
        ql.path = str(n.target)
        ql.edge = "first" if n in first else "last" if n in last else None
        bits = spec.policy.layers[ql.path].wbits if spec.policy is not None else (
            spec.first_last_bits if n in first or n in last else spec.wbits)
        if bits != ql.wq.bits:
            ql.wq.bits = bits
            ql.wq.init_scale(ql.weight)

    # one activation quantizer per tensor consumed by a quantized layer (the raw input excepted)
    aq_root = nn.Module()
    gm.add_module("aq", aq_root)
    quantizer_src: dict[fx.Node, fx.Node] = {}
    for tensor in list(gm.graph.nodes):
        consumers = quantized_readers(tensor, layer_set, modules)
        if not consumers or tensor.op == "placeholder":
            continue
        layer_readers = [u for u in consumers if u in layer_set]
        bits = _input_bits(spec, layer_readers, last) if layer_readers else spec.abits
        for u in layer_readers:
            modules[u.target].abits = bits
        name = tensor.name.replace(".", "_")
        aq = ActQuantizer(bits)
        aq.consumers = [str(u.target) if u in layer_set else _reader_name(u) for u in consumers]
        aq_root.add_module(name, aq)
        with gm.graph.inserting_after(tensor):
            qnode = gm.graph.call_module(f"aq.{name}", (tensor,))
        tensor.replace_all_uses_with(qnode, delete_user_cb=lambda u, q=qnode: u is not q)
        quantizer_src[qnode] = tensor
    insert_matmul_quantizers(gm, spec.abits, spec.softmax_grid)
    params_into_modules(gm)
    gm.recompile()

    unit_of, plans = UnitFinder(gm, layer_set.__contains__, quantizer_src.get).plan(mode)
    localize_constants(gm.graph, unit_of)
    if mode == "block" and all(p.found == "layer" for p in plans):
        warn_fallback(type(model).__name__)
    split = split_module(gm, model, lambda n: unit_of[n], keep_original_order=True)
    targets = sorted({unit_of[n] for n in unit_of})
    if targets != list(range(len(plans))):
        raise ModelError("internal error: unit partition is not contiguous")
    qmodel = QuantModel(split, plans)
    qmodel.input_shape = gm.meta.get("input_shape")  # set where torch.export captured the model (it needs an example)
    return qmodel
