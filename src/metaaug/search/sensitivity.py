"""The sensitivity baseline (HAWQ-style): per layer, Fisher trace x quantization error predicts the loss increase
of each weight bit-width; a multiple-choice knapsack picks the bits with the least predicted increase under the
budget. No search, no meta network: what a mixed-precision search has to beat.

Fisher: squared gradients of the cross-entropy against the FP model's own predictions (label-free), summed over
the calibration images. Error: `||Q_b(w) - w||^2` with the Lp-searched round-to-nearest quantizer at `b` bits.

When activation bits are searched too, a BOPs budget multiplies weight and activation bits, so costs are no longer
additive per gene and the knapsack does not apply: a greedy allocation (from all-highest, lower the gene that adds
the least predicted loss per unit of cost saved until the budget fits, then raise where room is left) takes its
place, with the diagonal-Fisher estimate `0.5 * sum_i F_ii * delta_i^2` for weights and activations alike so that
the two kinds of gene are on one scale.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metaaug.errors import ConfigError
from metaaug.quant.grids import rtn_fake_quant
from metaaug.quant.lp import lp_search_channel
from metaaug.quant.observe import observing
from metaaug.quant.prepare import QuantModel
from metaaug.quant.quantizers import ActQuantizer
from metaaug.search.space import Budget, Genome, SearchSpace

BINS = 4000


def fisher_diagonals(qmodel: QuantModel, images: torch.Tensor, batch: int = 64) -> dict[str, torch.Tensor]:
    """Empirical Fisher diagonal of each quantized layer's weight (FP model, predicted labels), mean per image."""
    qmodel.set_quant(False, False)
    layers = {ql.path: ql for ql in qmodel.quant_layers()}
    for ql in layers.values():
        ql.layer.weight.requires_grad_(True)
    dev = next(qmodel.parameters()).device
    diag = {name: torch.zeros_like(ql.layer.weight, dtype=torch.float64) for name, ql in layers.items()}
    try:
        for i in range(0, len(images), batch):
            x = images[i:i + batch].to(dev)
            for j in range(len(x)):  # per-image gradients: the Fisher is a sum of squared per-sample gradients
                logits = qmodel(x[j:j + 1])
                loss = F.cross_entropy(logits, logits.argmax(1))
                grads = torch.autograd.grad(loss, [ql.layer.weight for ql in layers.values()])
                for name, g in zip(layers, grads, strict=True):
                    diag[name] += g.double().pow(2)
    finally:
        for ql in layers.values():
            ql.layer.weight.requires_grad_(False)
    return {k: v / len(images) for k, v in diag.items()}


def fisher_traces(qmodel: QuantModel, images: torch.Tensor, batch: int = 64) -> dict[str, float]:
    """Empirical Fisher trace of each quantized layer's weight (FP model, predicted labels)."""
    return {k: float(v.sum()) for k, v in fisher_diagonals(qmodel, images, batch).items()}


def _rtn_delta(w: torch.Tensor, bits: int) -> torch.Tensor:
    """`Q_b(w) - w` (round-to-nearest, Lp-searched per-channel steps), shaped like `w`."""
    w2 = w.reshape(w.shape[0], -1)
    s, z = lp_search_channel(w, bits)
    return (rtn_fake_quant(w2, s[:, None], z[:, None], bits) - w2).reshape(w.shape)


def quant_errors(qmodel: QuantModel, bits: tuple[int, ...]) -> dict[str, dict[int, float]]:
    """`||Q_b(w) - w||^2` per layer and bit-width (round-to-nearest, Lp-searched per-channel steps)."""
    return {ql.path: {b: float(_rtn_delta(ql.weight.detach(), b).pow(2).sum()) for b in bits} for ql in qmodel.quant_layers()}


def weight_losses(qmodel: QuantModel, images: torch.Tensor, bits: tuple[int, ...]) -> dict[str, dict[int, float]]:
    """Predicted loss increase `0.5 * sum_i F_ii * (Q_b(w) - w)_i^2` per layer and weight bit-width."""
    diag = fisher_diagonals(qmodel, images)
    layers = {ql.path: ql for ql in qmodel.quant_layers()}
    return {name: {b: 0.5 * float((d * _rtn_delta(layers[name].weight.detach(), b).double().pow(2)).sum()) for b in bits}
            for name, d in diag.items()}


def act_losses(qmodel: QuantModel, images: torch.Tensor, bits: tuple[int, ...], batch: int = 64) -> dict[tuple[str, ...], dict[int, float]]:
    """Predicted loss increase `0.5 * E_x[sum_i g_i^2 * (Q_b(a) - a)_i^2]` per quantized activation tensor `a` (keyed
    by the layers reading it) and bit-width; `Q_b` is round-to-nearest with an Lp-searched step, `g` the per-image
    gradient of the FP model's cross-entropy against its own prediction (one image's loss reaches only its own
    activations, so a batched backward gives per-image gradients)."""
    qmodel.set_quant(False, False)
    aqs = {name: aq for name, aq in qmodel.named_modules() if isinstance(aq, ActQuantizer) and aq.consumers}
    seen: dict[str, torch.Tensor] = {}
    hooks = [aq.register_forward_pre_hook(lambda _m, args, n=n: seen.__setitem__(n, args[0])) for n, aq in aqs.items()]
    dev = next(qmodel.parameters()).device
    try:
        with torch.no_grad(), observing(aqs.values(), init=False) as samples:
            qmodel(images[:256].to(dev))
        quant: dict[tuple[str, int], ActQuantizer] = {}
        for n, aq in aqs.items():
            for b in bits:
                q = ActQuantizer(b, grid=aq.grid).to(dev)
                q.init_from(samples[aq])
                q.enabled = True
                quant[n, b] = q
        total = dict.fromkeys(quant, 0.0)
        for i in range(0, len(images), batch):
            x = images[i:i + batch].to(dev).requires_grad_(True)
            logits = qmodel(x)
            acts = [seen[n] for n in aqs]
            grads = torch.autograd.grad(F.cross_entropy(logits, logits.argmax(1), reduction="sum"), acts)
            with torch.no_grad():
                for n, a, g in zip(aqs, acts, grads, strict=True):
                    for b in bits:
                        total[n, b] += float((g.pow(2) * (quant[n, b](a) - a).pow(2)).sum())
    finally:
        for h in hooks:
            h.remove()
    return {tuple(aq.consumers): {b: 0.5 * total[n, b] / len(images) for b in bits} for n, aq in aqs.items()}


def sensitivity_search(space: SearchSpace, budget: Budget, qmodel: QuantModel, images: torch.Tensor) -> Genome:
    """The baseline's policy: the knapsack over weight bits, or with activation bits searched, the greedy allocation."""
    if not space.achoices:
        return sensitivity_genome(space, budget, fisher_traces(qmodel, images), quant_errors(qmodel, space.wchoices))
    return greedy_genome(space, budget, weight_losses(qmodel, images, space.wchoices), act_losses(qmodel, images, space.achoices))


def gene_losses(space: SearchSpace, wloss: dict[str, dict[int, float]],
                aloss: dict[tuple[str, ...], dict[int, float]]) -> list[dict[int, float]]:
    """Per gene, the predicted loss increase of each of its bit-widths."""
    keys = [*space.wgenes, *(tuple(g) for g in space.agroups)] if space.achoices else list(space.wgenes)
    return [wloss[k] if i < len(space.wgenes) else aloss[k] for i, k in enumerate(keys)]


def predicted_losses(space: SearchSpace, qmodel: QuantModel, images: torch.Tensor, genomes: list[Genome]) -> list[float]:
    """The diagonal-Fisher estimate of each genome's loss increase, summed over genes: a proxy with no training."""
    aloss = act_losses(qmodel, images, space.achoices) if space.achoices else {}
    table = gene_losses(space, weight_losses(qmodel, images, space.wchoices), aloss)
    return [sum(t[b] for t, b in zip(table, g, strict=True)) for g in genomes]


def greedy_genome(space: SearchSpace, budget: Budget, wloss: dict[str, dict[int, float]],
                  aloss: dict[tuple[str, ...], dict[int, float]]) -> Genome:
    """From all-highest, lower the gene with the least predicted loss added per unit of cost saved until the budget
    fits; then raise the gene with the most loss removed per unit of cost added while it still fits."""
    table = gene_losses(space, wloss, aloss)

    def value(g: list[int]) -> float:
        return budget.value(space.cost(tuple(g)))

    def moves(g: list[int], step: int) -> list[tuple[float, list[int], float]]:
        """(predicted loss change per unit of cost change, genome, its cost) for every one-step move of one gene."""
        here, out = value(g), []
        for i in range(space.length):
            ch = space.gene_choices(i)
            k = ch.index(g[i]) + step
            if 0 <= k < len(ch):
                h = [*g[:i], ch[k], *g[i + 1:]]
                cost = value(h)
                if cost != here:
                    out.append(((table[i][ch[k]] - table[i][g[i]]) / abs(cost - here), h, cost))
        return out

    g = list(space.highest())
    while not budget.within(value(g)):
        options = moves(g, -1)
        if not options:
            space.check_budget(budget)
        g = min(options, key=lambda m: m[0])[1]
    while True:
        options = [m for m in moves(g, +1) if budget.within(m[2]) and m[0] < 0]
        if not options:
            return tuple(g)
        g = min(options, key=lambda m: m[0])[1]


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
