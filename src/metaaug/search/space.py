"""The mixed-precision search space of a prepared model: genes, the policies they encode, and the budget.

A genome holds one weight-bit gene per searchable layer, then (unless weights only) one activation-bit gene per
activation quantizer (a tensor that several layers read has one gene: they share its quantizer). The first and
last layers stay at 8 bits, as in the QDrop setting.
"""

from __future__ import annotations

import dataclasses
import random
import re
from dataclasses import dataclass

import torch

from metaaug.errors import ConfigError
from metaaug.quant.cost import LayerInfo, layer_infos, layer_macs, matmul_infos, policy_cost
from metaaug.quant.policy import LayerBits, Policy
from metaaug.quant.prepare import QuantModel
from metaaug.quant.quantizers import check_bits

BUDGET_KINDS = ("avg_wbits", "weight_kb", "weight_vs_w8", "bops", "bops_vs_w8a8")
EDGE_BITS = 8

Genome = tuple[int, ...]


@dataclass(frozen=True)
class Budget:
    """An upper bound on one cost: average weight bits (parameter-weighted), weight KB, weight memory as a fraction
    of uniform W8, BOPs (absolute), or BOPs as a fraction of uniform W8A8."""

    kind: str
    limit: float

    def __post_init__(self) -> None:
        if self.kind not in BUDGET_KINDS:
            raise ConfigError(f"unknown budget {self.kind!r}; use one of {', '.join(BUDGET_KINDS)}")
        if not self.limit > 0:
            raise ConfigError(f"budget {self.kind} must be positive, got {self.limit}")

    def value(self, cost: dict) -> float:
        return cost_value(self.kind, cost)

    def within(self, value: float) -> bool:
        """Whether a figure of this budget's kind is inside it; a budget set to a policy's own cost admits that
        policy despite rounding in the sum."""
        return value <= self.limit + 1e-9 * max(1.0, abs(self.limit))

    def fits(self, cost: dict) -> bool:
        """Whether a policy with this `policy_cost` dict is inside the budget."""
        return self.within(self.value(cost))


def cost_value(kind: str, cost: dict) -> float:
    """The figure of a `policy_cost` dict that a budget of `kind` bounds."""
    return cost["weight_vs_w8a8" if kind == "weight_vs_w8" else kind]


_UNIFORM_SPEC = re.compile(r"(?:(\d+(?:\.\d+)?)\s*[x*]\s*)?W(\d+)(?:A(\d+))?", re.IGNORECASE)


def uniform_spec(spec: str) -> tuple[float, int, int | None]:
    """'W3A3' -> (1.0, 3, 3); '1.1xW2' -> (1.1, 2, None): a budget stated as a multiple of a uniform policy's cost,
    which is how budgets are compared ("the BOPs of W3A3"), so users need not look the absolute figure up."""
    m = _UNIFORM_SPEC.fullmatch(spec.strip())
    if m is None:
        raise ConfigError(f"budget {spec!r}: give a number or a uniform policy such as W3A3 or 1.1xW2")
    factor = float(m[1]) if m[1] else 1.0
    return factor, check_bits(int(m[2]), f"budget {spec!r}"), check_bits(int(m[3]), f"budget {spec!r}") if m[3] else None


def budget_number(spec: float | str) -> float | None:
    """The budget as a number, None if it names a uniform policy (checked for syntax here)."""
    try:
        return float(spec)
    except ValueError:
        uniform_spec(str(spec))
        return None


def _choices(values: tuple[int, ...], what: str) -> tuple[int, ...]:
    if not values:
        raise ConfigError(f"{what} must list at least one bit-width")
    return tuple(sorted({check_bits(v, what) for v in values}))


class SearchSpace:
    """Genes <-> policies for one prepared model, with the cost of every genome."""

    def __init__(self, qmodel: QuantModel, example: torch.Tensor, wchoices: tuple[int, ...], achoices: tuple[int, ...] | None,
                 abits: int = 4) -> None:
        self.wchoices = _choices(wchoices, "--wbits-choices")
        self.achoices = _choices(achoices, "--abits-choices") if achoices else None
        self.abits = check_bits(abits, "--abits")
        layers = list(qmodel.quant_layers())
        self.layers = [ql.path for ql in layers]
        self.first = [ql.path for ql in layers if ql.edge == "first"]
        self.last = [ql.path for ql in layers if ql.edge == "last"]
        self.wgenes = [p for p in self.layers if p not in self.first and p not in self.last]
        # activation genes: tensors that quantized layers read; attention matmul and GELU inputs stay at `abits`
        self.agroups = [list(aq.consumers) for aq in qmodel.act_quantizers()
                        if set(aq.consumers) <= set(self.layers) and not set(aq.consumers) & set(self.last)]
        macs = layer_macs(qmodel, example)
        self.infos: list[LayerInfo] = layer_infos(qmodel, example, macs)
        self.matmuls = [dataclasses.replace(m, abits=(self.abits, self.abits)) for m in matmul_infos(qmodel, example, macs)]

    @property
    def length(self) -> int:
        return len(self.wgenes) + (len(self.agroups) if self.achoices else 0)

    def gene_choices(self, i: int) -> tuple[int, ...]:
        return self.wchoices if i < len(self.wgenes) else self.achoices  # type: ignore[return-value]

    def policy(self, genome: Genome) -> Policy:
        wb = dict(zip(self.wgenes, genome[: len(self.wgenes)], strict=True))
        ab: dict[str, int] = {}
        for k, group in enumerate(self.agroups):
            for layer in group:
                ab[layer] = genome[len(self.wgenes) + k] if self.achoices else self.abits
        return Policy({p: LayerBits(wb.get(p, EDGE_BITS), ab.get(p, EDGE_BITS)) for p in self.layers})

    def uniform(self, wbits: int, abits: int | None = None) -> Genome:
        return tuple([wbits] * len(self.wgenes) + ([abits or self.abits] * len(self.agroups) if self.achoices else []))

    def uniform_policies(self) -> dict[str, Genome]:
        """Every uniform policy of the choices, by name ('W2A4'): the reference points a search is compared with."""
        return {f"W{w}A{a or self.abits}": self.uniform(w, a) for w in self.wchoices for a in (self.achoices or (None,))}

    def cost(self, genome: Genome) -> dict:
        c = policy_cost(self.infos, self.policy(genome).layers, self.matmuls)
        c.pop("matmuls", None)
        c.pop("layers")
        return c

    def budget(self, kind: str, spec: float | str) -> Budget:
        """A budget from a number or a uniform policy ('W3A3', '1.1xW2': 1.1 x uniform W2's cost). Uniform means
        every searchable layer at those bits, first and last at 8, like the uniform policies the search reports."""
        number = budget_number(spec)
        if number is not None:
            return Budget(kind, number)
        factor, wbits, abits = uniform_spec(str(spec))
        if abits is None and kind.startswith("bops") and self.achoices:
            raise ConfigError(f"budget {spec!r}: a BOPs budget needs the activation bits too, e.g. W{wbits}A{wbits}")
        return Budget(kind, factor * cost_value(kind, self.cost(self.uniform(wbits, abits))))

    def lowest(self) -> Genome:
        return tuple(min(self.gene_choices(i)) for i in range(self.length))

    def highest(self) -> Genome:
        return tuple(max(self.gene_choices(i)) for i in range(self.length))

    def random(self, rng: random.Random) -> Genome:
        return tuple(rng.choice(self.gene_choices(i)) for i in range(self.length))

    def check_budget(self, budget: Budget) -> None:
        """A budget below the cheapest policy is an error that names the smallest reachable value."""
        floor = budget.value(self.cost(self.lowest()))
        if not budget.within(floor):
            raise ConfigError(f"no policy meets {budget.kind} <= {budget.limit:g}: the smallest reachable is {floor:g} "
                              f"(every searchable layer at its lowest bits, first/last at {EDGE_BITS})")

    def repair(self, genome: Genome, budget: Budget, rng: random.Random) -> Genome:
        """Lower random genes one step until the genome fits the budget (the lowest genome always fits)."""
        g = list(genome)
        while not budget.fits(self.cost(tuple(g))):
            lowerable = [i for i in range(self.length) if g[i] > min(self.gene_choices(i))]
            i = rng.choice(lowerable)
            ch = self.gene_choices(i)
            g[i] = ch[ch.index(g[i]) - 1]
        return tuple(g)

