"""Genetic search over bit-width genomes under a budget (MetaPruning's evolutionary loop, seed 002's GA).

Per generation: the top `parents` genomes (by fitness) are kept (elitism), `mutants` are drawn from them with
each gene redrawn with probability `mutate_prob`, and `crossovers` mix two parents gene by gene. A child over
the budget is repaired (random genes lowered until it fits), so no candidate over budget is ever scored.
Every evaluation is cached by genome; the RNG is seeded, so the same seed gives the same search.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

from metaaug.config_check import Ranges, check_config
from metaaug.search.space import Budget, Genome, SearchSpace


@dataclass
class GAConfig:
    """MetaPruning's settings (population 50, top 10 parents, 25 mutants with p = 0.1, 25 crossovers, 20 generations)."""

    RANGES: ClassVar[Ranges] = {"population": ">= 2", "generations": ">= 1", "parents": ">= 1", "mutate_prob": "[0, 1]"}
    population: int = 50
    generations: int = 20
    parents: int = 10
    mutate_prob: float = 0.1

    def __post_init__(self) -> None:
        check_config(self)
        self.parents = min(self.parents, self.population // 2)  # the default 10 is more than a small population has


@dataclass
class GAState:
    """Everything a resumed search needs: the generation reached, the population, all scores, the RNG."""

    generation: int = 0
    population: list[Genome] = field(default_factory=list)
    scores: dict[Genome, dict] = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    rng_state: object = None


Evaluate = Callable[[list[Genome]], list[dict]]  # each result holds at least "fitness"


def _score_new(state: GAState, genomes: list[Genome], space: SearchSpace, budget: Budget, evaluate: Evaluate) -> None:
    """Score the genomes not scored yet (the cache), recording the generation and the budgeted cost."""
    new = [g for g in dict.fromkeys(genomes) if g not in state.scores]
    for g, r in zip(new, evaluate(new), strict=True):
        state.scores[g] = {**r, "generation": state.generation, "cost": budget.value(space.cost(g))}


def _fitness(result: dict) -> float:
    return result["fitness"]


def genetic_search(space: SearchSpace, budget: Budget, cfg: GAConfig, evaluate: Evaluate, seed: int,
                   state: GAState | None = None, on_generation: Callable[[GAState], None] | None = None,
                   seeds: list[Genome] | None = None) -> GAState:
    """Run (or resume) the search; `evaluate` scores a batch of new genomes (serially or as Ray tasks)."""
    rng = random.Random(seed)
    state = state or GAState()
    if state.rng_state is not None:
        rng.setstate(state.rng_state)
    if not state.population:
        pop = [space.repair(g, budget, rng) for g in (seeds or [])]
        while len(pop) < cfg.population:
            pop.append(space.repair(space.random(rng), budget, rng))
        state.population = list(dict.fromkeys(pop))
    while state.generation < cfg.generations:
        _score_new(state, state.population, space, budget, evaluate)
        ranked = sorted(dict.fromkeys(state.population), key=lambda g: _fitness(state.scores[g]), reverse=True)
        best = ranked[0]
        state.history.append({"generation": state.generation, "best_fitness": _fitness(state.scores[best]),
                              "mean_fitness": sum(_fitness(state.scores[g]) for g in ranked) / len(ranked),
                              "best_cost": state.scores[best]["cost"], "evaluated": len(state.scores)})
        parents = ranked[: cfg.parents]
        children: list[Genome] = []
        n_mut = (cfg.population - len(parents)) // 2
        for _ in range(n_mut):
            p = rng.choice(parents)
            child = tuple(rng.choice(space.gene_choices(i)) if rng.random() < cfg.mutate_prob else v for i, v in enumerate(p))
            children.append(space.repair(child, budget, rng))
        while len(parents) + len(children) < cfg.population:
            a, b = rng.choice(parents), rng.choice(parents)
            children.append(space.repair(tuple(x if rng.random() < 0.5 else y for x, y in zip(a, b, strict=True)), budget, rng))
        state.population = parents + children
        state.generation += 1
        state.rng_state = rng.getstate()
        if on_generation is not None:
            on_generation(state)
    _score_new(state, state.population, space, budget, evaluate)
    return state


def best_genome(state: GAState, budget: Budget) -> Genome:
    """The best-scoring genome ever evaluated within the budget."""
    fits = [g for g, r in state.scores.items() if budget.within(r["cost"])]
    return max(fits, key=lambda g: _fitness(state.scores[g]))


def random_search(space: SearchSpace, budget: Budget, evaluations: int, batch: int, evaluate: Evaluate, seed: int,
                  state: GAState | None = None, on_generation: Callable[[GAState], None] | None = None) -> GAState:
    """The baseline with the same proxy: `evaluations` distinct random genomes within the budget, in batches of
    `batch` (one 'generation' each, so it saves and resumes like the GA)."""
    rng = random.Random(seed)
    state = state or GAState()
    if state.rng_state is not None:
        rng.setstate(state.rng_state)
    tries = 0
    while len(state.scores) < evaluations and tries < 100 * evaluations:
        new: list[Genome] = []
        while len(new) < min(batch, evaluations - len(state.scores)) and tries < 100 * evaluations:
            tries += 1
            g = space.repair(space.random(rng), budget, rng)
            if g not in state.scores and g not in new:
                new.append(g)
        _score_new(state, new, space, budget, evaluate)
        best = max(state.scores, key=lambda g: _fitness(state.scores[g]))
        state.history.append({"generation": state.generation, "best_fitness": _fitness(state.scores[best]),
                              "mean_fitness": sum(_fitness(state.scores[g]) for g in new) / max(1, len(new)),
                              "best_cost": state.scores[best]["cost"], "evaluated": len(state.scores)})
        state.population = new
        state.generation += 1
        state.rng_state = rng.getstate()
        if on_generation is not None:
            on_generation(state)
    return state
