"""The sensitivity baseline (HAWQ-style): per layer, Fisher trace x quantization error predicts the loss increase
of each weight bit-width; a multiple-choice knapsack picks the bits with the least predicted increase under the
budget. No search, no meta network: what a mixed-precision search has to beat.

Fisher: squared gradients of the cross-entropy against the FP model's own predictions (label-free), summed over
the calibration images. Error: `||Q_b(w) - w||^2` with the Lp-searched round-to-nearest quantizer at `b` bits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metaaug.errors import ConfigError
from metaaug.quant.prepare import QuantModel
from metaaug.quant.quantizers import lp_search_channel
from metaaug.search.space import Budget, Genome, SearchSpace

BINS = 4000


def fisher_traces(qmodel: QuantModel, images: torch.Tensor, batch: int = 64) -> dict[str, float]:
    """Empirical Fisher trace of each quantized layer's weight (FP model, predicted labels)."""
    qmodel.set_quant(False, False)
    layers = {ql.path: ql for ql in qmodel.quant_layers()}
    for ql in layers.values():
        ql.layer.weight.requires_grad_(True)
    dev = next(qmodel.parameters()).device
    traces = dict.fromkeys(layers, 0.0)
    try:
        for i in range(0, len(images), batch):
            x = images[i:i + batch].to(dev)
            for j in range(len(x)):  # per-image gradients: the Fisher is a sum of squared per-sample gradients
                logits = qmodel(x[j:j + 1])
                loss = F.cross_entropy(logits, logits.argmax(1))
                grads = torch.autograd.grad(loss, [ql.layer.weight for ql in layers.values()])
                for name, g in zip(layers, grads, strict=True):
                    traces[name] += float(g.pow(2).sum())
    finally:
        for ql in layers.values():
            ql.layer.weight.requires_grad_(False)
    return {k: v / len(images) for k, v in traces.items()}


def quant_errors(qmodel: QuantModel, bits: tuple[int, ...]) -> dict[str, dict[int, float]]:
    """`||Q_b(w) - w||^2` per layer and bit-width (round-to-nearest, Lp-searched per-channel steps)."""
    out: dict[str, dict[int, float]] = {}
    for ql in qmodel.quant_layers():
        w = ql.weight.detach()
        w2 = w.reshape(w.shape[0], -1)
        out[ql.path] = {}
        for b in bits:
            s, z = lp_search_channel(w, b)
            q = ((w2 / s[:, None]).round() + z[:, None]).clamp(0, 2**b - 1)
            out[ql.path][b] = float((((q - z[:, None]) * s[:, None]) - w2).pow(2).sum())
    return out


def sensitivity_genome(space: SearchSpace, budget: Budget, traces: dict[str, float], errors: dict[str, dict[int, float]]) -> Genome:
    """Weight bits minimising the summed predicted loss increase `0.5 * F_l * err_l(b)` within the budget.

    Exact multiple-choice knapsack by dynamic programming over the budgeted cost, discretised into BINS steps
    (each layer's cost rounded up, so the result never exceeds the budget). Weight bits only.
    """
    if space.achoices:
        raise ConfigError("the sensitivity baseline allocates weight bits only; search activation bits with the GA")
    base = space.lowest()
    zero = budget.value(space.cost(space.uniform(min(space.wchoices))))
    # marginal cost of each (gene, choice) over the all-lowest genome; costs are additive per layer for every budget
    # kind when activation bits are fixed
    marg = []
    for i in range(space.length):
        row = []
        for b in space.wchoices:
            g = list(base)
            g[i] = b
            row.append(budget.value(space.cost(tuple(g))) - zero)
        marg.append(row)
    room = budget.limit - zero
    if room < 0:
        space.check_budget(budget)
    unit = max(room, 1e-12) / BINS
    INF = float("inf")
    best = [0.0] + [INF] * BINS  # best[c]: least loss with discretised cost exactly c
    choice: list[list[int]] = []
    for i, name in enumerate(space.wgenes):
        loss = [0.5 * traces[name] * errors[name][b] for b in space.wchoices]
        cost = [int(-(-m // unit)) if m > 0 else 0 for m in marg[i]]  # ceil: never over budget
        new, pick = [INF] * (BINS + 1), [-1] * (BINS + 1)
        for c in range(BINS + 1):
            if best[c] == INF:
                continue
            for k in range(len(space.wchoices)):
                cc = c + cost[k]
                if cc <= BINS and best[c] + loss[k] < new[cc]:
                    new[cc], pick[cc] = best[c] + loss[k], k
        choice.append(pick)
        best = new
    c = min(range(BINS + 1), key=lambda j: best[j])  # walk back from the least-loss end state
    genome = [0] * space.length
    for i in range(space.length - 1, -1, -1):
        k = choice[i][c]
        genome[i] = space.wchoices[k]
        c -= int(-(-marg[i][k] // unit)) if marg[i][k] > 0 else 0
    return tuple(genome)
