"""A whole mixed-precision search: train MetaQuantNet once, run the genetic search under a budget with fitness on a
held-out split of the calibration images, write `policy.json`, `search.json` and plots. Resumable.

`proxy='rtn'` skips MetaQuantNet training: candidates are then scored with round-to-nearest weights and
Lp-searched steps (MetaQuantNet at its start is exactly that), the baseline that shows what the meta network buys.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from metaaug.data import calibration_split, load_dataset, stratified_indices
from metaaug.data.checks import check_model_fits_data
from metaaug.environment import environment, resolve_device, threads
from metaaug.errors import ConfigError
from metaaug.evaluate import accuracy, logits_of
from metaaug.models.registry import build_model
from metaaug.progress import PhaseProgress, QuietPhases
from metaaug.quant.prepare import QuantSpec, prepare
from metaaug.runs import files
from metaaug.runs.files import RESTART_HINT, CorruptFileError
from metaaug.runs.folder import Checkpoints, RunFolder
from metaaug.search.genetic import GAConfig, GAState, best_genome, genetic_search, random_search
from metaaug.search.metaquant import MetaQuantConfig, MetaQuantNet, train_step
from metaaug.search.space import Budget, Genome, SearchSpace, budget_number

PROXIES = ("metaquant", "rtn")
FITNESS = ("kl", "top1")
STRATEGIES = ("ga", "random", "sensitivity")
NET_FILE, NET_PROGRESS, STATE_FILE = "metaquant.pt", "metaquant_progress", "search_state.json"
SAVE_EVERY = 100


@dataclass
class SearchConfig:
    """A search job (Wang et al. 2020's MetaQuantNet + GA); stored as the run folder's config.json."""

    model: str = "resnet20"
    weights: str | None = None
    wbits_choices: tuple[int, ...] = (2, 3, 4, 8)
    abits_choices: tuple[int, ...] | None = None  # None: weights only, every activation at `abits`
    abits: int = 4
    budget_kind: str = "avg_wbits"
    budget: float | str = 3.0  # a number, or a uniform policy's cost: "W3A3", "1.1xW2"
    calib_size: int = 1024
    holdout: float = 0.2
    seed: int = 0
    data_dir: str | None = None
    proxy: str = "metaquant"
    meta_images: int = 0  # extra unlabeled train images (never calibration or held-out ones) for MetaQuantNet; 0 = PTQ's set
    fitness: str = "kl"  # kl: -KL to the FP logits (label-free, continuous); top1: held-out accuracy, KL breaking ties
    strategy: str = "ga"  # ga; random (same proxy, `evaluations` candidates); sensitivity (Fisher x error knapsack, greedy with activation bits)
    evaluations: int | None = None  # random search: candidates to score (default population x generations)
    meta: MetaQuantConfig = field(default_factory=MetaQuantConfig)
    ga: GAConfig = field(default_factory=GAConfig)

    def __post_init__(self) -> None:
        from metaaug.config_check import SEED, check_config
        from metaaug.runs.sources import absolutize
        from metaaug.search.space import _choices

        absolutize(self)

        if isinstance(self.meta, dict):
            self.meta = MetaQuantConfig(**self.meta)
        if isinstance(self.ga, dict):
            self.ga = GAConfig(**self.ga)
        check_config(self, {"abits": "bits", "calib_size": ">= 1", "meta_images": ">= 0", "seed": SEED, "evaluations": ">= 1"})
        _choices(self.wbits_choices, "--wbits-choices")  # an empty list of activation choices is not "weights only"
        if self.abits_choices is not None:
            _choices(self.abits_choices, "--abits-choices")
        if self.proxy not in PROXIES:
            raise ConfigError(f"unknown proxy {self.proxy!r}; use one of {', '.join(PROXIES)}")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {self.strategy!r}; use one of {', '.join(STRATEGIES)}")
        if self.fitness not in FITNESS:
            raise ConfigError(f"unknown fitness {self.fitness!r}; use one of {', '.join(FITNESS)}")
        if not 0 < self.holdout < 1:
            raise ConfigError(f"the search scores candidates on a held-out split: --holdout must be in (0, 1), got {self.holdout}")
        number = budget_number(self.budget)
        if number is not None and not math.isfinite(number):
            raise ConfigError(f"budget {self.budget_kind} must be a finite number, got {self.budget!r}")
        self.budget = self.budget if number is None else number
        Budget(self.budget_kind, 1.0 if number is None else number)


def _genome_key(g: Genome) -> str:
    return ",".join(map(str, g))


def _save_state(path: Path, state: GAState, seconds: float) -> None:
    """`seconds`: the search's time so far, over every attempt, so that a resumed search reports all of it."""
    rng = state.rng_state
    data = {"generation": state.generation, "population": [list(g) for g in state.population],
            "scores": {_genome_key(g): r for g, r in state.scores.items()}, "history": state.history,
            "rng_state": [rng[0], list(rng[1]), rng[2]] if rng else None, "seconds": round(seconds, 3)}
    files.write_json(path, data, indent=None)


def _load_state(path: Path) -> tuple[GAState | None, float]:
    """The saved search state and the seconds spent reaching it (none and 0 for a fresh search)."""
    if not path.exists():
        return None, 0.0
    d = files.read_json(path, "a search state")
    try:
        rng = d["rng_state"]
        return GAState(d["generation"], [tuple(g) for g in d["population"]],
                       {tuple(int(v) for v in k.split(",")): r for k, r in d["scores"].items()}, d["history"],
                       (rng[0], tuple(rng[1]), rng[2]) if rng else None), float(d.get("seconds", 0.0))
    except (KeyError, TypeError, ValueError, AttributeError):
        raise CorruptFileError(f"{path} is not a search state; {RESTART_HINT}") from None


def train_metaquant(net: MetaQuantNet, space: SearchSpace, images: torch.Tensor, cfg: SearchConfig, out: Path,
                    progress: PhaseProgress) -> tuple[list[dict], float]:
    """Train once: per step a random policy (plus the all-lowest and all-highest ones), KL to the FP logits.
    Saves progress every SAVE_EVERY steps; a rerun continues from there and ends where an uninterrupted run would.
    Returns the training curve and the training seconds over every attempt."""
    mcfg, dev = cfg.meta, next(net.parameters()).device
    opt = torch.optim.Adam(net.parameters(), lr=mcfg.lr)
    rng, gen = random.Random(cfg.seed + 17), torch.Generator().manual_seed(cfg.seed + 19)
    start, curve, prior, t0 = 0, [], 0.0, time.perf_counter()
    checkpoints = Checkpoints(out)
    saved = checkpoints.load_training(NET_PROGRESS, net, {"opt": opt}, str(dev), "this search")
    if saved is not None:
        info, extra = saved
        gen.set_state(extra["gen"])
        rng.setstate((extra["rng"][0], tuple(extra["rng"][1]), extra["rng"][2]))
        start, curve, prior = int(info["step"]), info["curve"], float(info["seconds"])
    with torch.no_grad():
        targets = logits_of(net.fp_logits, images, 256, dev).to(dev)
    progress.phase("MetaQuantNet", mcfg.steps)
    progress.advance(start, "resumed" if start else "")
    low, high = space.policy(space.lowest()), space.policy(space.highest())
    for step in range(start, mcfg.steps):
        idx = torch.randint(len(images), (mcfg.batch_size,), generator=gen)
        policies = [space.policy(space.random(rng))] + ([low, high] if mcfg.sandwich else [])
        loss = train_step(net, opt, images[idx].to(dev), targets[idx.to(dev)], policies)
        if step % 10 == 0 or step == mcfg.steps - 1:
            curve.append({"step": step, "loss": round(loss, 6)})
        progress.advance(1, f"KL {loss:.4f}")
        if (step + 1) % SAVE_EVERY == 0 and step + 1 < mcfg.steps:
            checkpoints.save_training(NET_PROGRESS, {"step": step + 1, "curve": curve, "seconds": prior + time.perf_counter() - t0},
                                      net, {"opt": opt}, {"gen": gen.get_state(),
                                                          "rng": [rng.getstate()[0], list(rng.getstate()[1]), rng.getstate()[2]]})
    return curve, prior + time.perf_counter() - t0


@torch.no_grad()
def score(net: MetaQuantNet, space: SearchSpace, images: torch.Tensor, labels: torch.Tensor, fp: torch.Tensor,
          genomes: list[Genome], fitness: str = "kl") -> list[dict]:
    """Fitness of each genome on the held-out images with generated weights (-KL to the FP model, or top-1 in %
    with KL breaking ties), with both measures reported."""
    dev = next(net.parameters()).device
    out = []
    for g in genomes:
        pol = space.policy(g)
        with threads(1):  # one thread everywhere: serial and Ray workers then compute bit-identical scores
            logits = logits_of(lambda x, pol=pol: net(x, pol), images, 512, dev)
        top1 = accuracy(logits, labels)
        kl = float(torch.nn.functional.kl_div(logits.log_softmax(1), fp.log_softmax(1), log_target=True, reduction="batchmean"))
        fit = -kl if fitness == "kl" else top1 - 1e-3 * kl
        out.append({"fitness": round(fit, 6), "top1": round(top1, 2), "kl": round(kl, 6)})
    return out


def _rebuild_and_score(recipe: tuple, genomes: list[Genome]) -> list[dict]:
    """In a Ray worker: prepare the FP model again, load MetaQuantNet's state, score `genomes`.
    (FX graph modules do not pickle, so the recipe ships the FP model and the state instead of the network.)"""
    model, wchoices, achoices, searchable, mcfg, state, space, images, labels, fp, fitness = recipe
    qmodel = prepare(model, QuantSpec(8, 8), "layer", images)
    net = MetaQuantNet(qmodel, images[:8], wchoices, achoices, searchable, mcfg, space.abits)
    net.load_state_dict(state)
    return score(net.eval(), space, images, labels, fp, genomes, fitness)


def check_ray_address(address: str | None, timeout: float = 3.0) -> None:
    """That `--ray` can run, checked before any work: ray is installed and something answers at `address` (a TCP
    connect of at most `timeout` s), since `ray.init` on an address nobody listens at retries for many minutes.
    None, "auto" and "local" name no address to try."""
    import importlib.util
    import socket

    if importlib.util.find_spec("ray") is None:
        raise ConfigError("--ray needs ray: pip install 'metaaug[ray]'")
    if address is None or address in ("auto", "local"):
        return
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"--ray-address must be host:port, ray://host:port, auto or local, got {address!r}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        raise ConfigError(f"--ray-address {address}: nothing answers at {host}:{port} ({reason})") from None


def _ray_scorer(model, net: MetaQuantNet, space: SearchSpace, hold, fp: torch.Tensor, fitness: str, address: str | None):
    """Score genomes as Ray tasks (a local Ray started here, or the cluster at `address`), in one chunk per CPU."""
    check_ray_address(address)
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs ray: pip install 'metaaug[ray]'") from None
    try:
        ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    except Exception as err:  # ray raises ConnectionError, RuntimeError, ValueError, ... for an unusable cluster
        where = f"--ray-address {address}" if address else "--ray (starting a local Ray)"
        detail = (str(err).strip().splitlines() or [""])[0]
        raise ConfigError(f"{where}: ray.init failed: {type(err).__name__}: {detail}") from None
    state = {k: v.cpu() for k, v in net.state_dict().items()}
    recipe = ray.put((model.cpu(), net.wchoices, net.achoices, net.searchable, net.cfg, state, space, hold.images,
                      hold.labels, fp.cpu(), fitness))
    task = ray.remote(_rebuild_and_score)
    workers = max(1, int(ray.available_resources().get("CPU", 1)))

    def evaluate(genomes: list[Genome]) -> list[dict]:
        chunks = [genomes[i::workers] for i in range(workers)]
        results = ray.get([task.remote(recipe, c) for c in chunks if c])
        by_genome = {g: r for c, rs in zip([c for c in chunks if c], results, strict=True) for g, r in zip(c, rs, strict=True)}
        return [by_genome[g] for g in genomes]
    return evaluate


def run_search(cfg: SearchConfig, out: str | Path, device: str = "auto", progress: PhaseProgress | None = None,
               ray: bool = False, ray_address: str | None = None, restart: bool = False) -> dict[str, Any]:
    """Search per `cfg`; writes policy.json, search.json and PNGs into `out` and returns the summary (resuming what
    is there; `restart` starts over). `ray` scores the candidates as Ray tasks; the result is the same as the
    serial run's."""
    t0 = time.perf_counter()
    progress = progress or QuietPhases()
    out, dev = Path(out), resolve_device(device)
    identity = {"kind": "search", **dataclasses.asdict(cfg)}
    RunFolder.check(out, "search", identity, restart=restart)
    model = build_model(cfg.model, cfg.weights)
    train = load_dataset(cfg.data_dir, "train")
    check_model_fits_data(model, cfg.data_dir, train=train)
    calib, hold = calibration_split(train, cfg.calib_size, cfg.seed, cfg.holdout)
    meta_images = calib.images
    if cfg.meta_images:  # more unlabeled images for MetaQuantNet only, drawn outside the calibration pool
        outside = torch.ones(len(train), dtype=torch.bool)
        outside[stratified_indices(train.labels, cfg.calib_size, cfg.seed)] = False  # the pool calibration_split drew from
        rest = torch.nonzero(outside).flatten()
        if cfg.meta_images > len(rest):
            raise ConfigError(f"--meta-images {cfg.meta_images} exceeds the {len(rest)} train images outside the calibration set")
        pick = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(cfg.seed + 23))[: cfg.meta_images]]
        meta_images = torch.cat([calib.images, train.images[pick]])
    qmodel = prepare(model, QuantSpec(8, 8), "layer", calib.images).to(dev)
    space = SearchSpace(qmodel, calib.images, cfg.wbits_choices, cfg.abits_choices, cfg.abits)
    budget = space.budget(cfg.budget_kind, cfg.budget)
    space.check_budget(budget)
    run = RunFolder.claim(out, "search", identity, restart=restart)
    torch.manual_seed(cfg.seed)
    net = MetaQuantNet(qmodel, calib.images, space.wchoices, space.achoices or (cfg.abits,), space.wgenes, cfg.meta,
                       space.abits).to(dev)
    curve: list[dict] = []
    meta_seconds, earlier, reused = 0.0, 0.0, False  # training time; of it, earlier attempts'; net trained elsewhere
    if cfg.proxy == "metaquant":
        if (out / NET_FILE).exists():
            saved = files.load_object(out / NET_FILE, "a trained MetaQuantNet")
            try:
                net.load_state_dict(saved["net"])
                curve, meta_seconds = json.loads(saved["curve"]), float(saved.get("seconds", 0.0))
            except (KeyError, TypeError, ValueError, RuntimeError) as err:
                raise CorruptFileError(f"{out / NET_FILE} is not this search's MetaQuantNet ({type(err).__name__}); "
                                       f"{RESTART_HINT}") from None
            reused = saved.get("trained_in", out.name) != out.name  # a copy: its training is another folder's time
            earlier = 0.0 if reused else meta_seconds
        else:
            t_meta = time.perf_counter()
            curve, meta_seconds = train_metaquant(net, space, meta_images, cfg, out, progress)
            earlier = max(0.0, meta_seconds - (time.perf_counter() - t_meta))
            files.save_object(out / NET_FILE, {"net": net.state_dict(), "curve": json.dumps(curve), "seconds": meta_seconds,
                                               "trained_in": out.name})
            Checkpoints(out).clear(NET_PROGRESS)
    net.eval()
    fp = logits_of(net.fp_logits, hold.images, 512, dev)

    def evaluate(genomes: list[Genome]) -> list[dict]:
        return score(net, space, hold.images, hold.labels, fp, genomes, cfg.fitness)
    if ray:
        evaluate = _ray_scorer(model, net, space, hold, fp, cfg.fitness, ray_address)

    uniform = space.uniform_policies()
    uniform_scores = dict(zip(uniform, evaluate(list(uniform.values())), strict=True))
    fits = [g for g in uniform.values() if budget.fits(space.cost(g))]

    def on_generation(state: GAState) -> None:
        _save_state(out / STATE_FILE, state, ga_prior + time.perf_counter() - t_ga)
        h = state.history[-1]
        progress.advance(1, f"best {h['best_fitness']:.2f} at {cfg.budget_kind} {h['best_cost']:.4g}/{budget.limit:g}")

    t_ga = time.perf_counter()
    state, ga_prior = _load_state(out / STATE_FILE)
    if cfg.strategy == "ga":
        progress.phase("genetic search", cfg.ga.generations)
        progress.advance(state.generation if state else 0, "resumed" if state else "")
        state = genetic_search(space, budget, cfg.ga, evaluate, cfg.seed, state, on_generation, seeds=fits)
    elif cfg.strategy == "random":
        n = cfg.evaluations or cfg.ga.population * cfg.ga.generations
        progress.phase("random search", -(-n // cfg.ga.population))
        progress.advance(state.generation if state else 0, "resumed" if state else "")
        state = random_search(space, budget, n, cfg.ga.population, evaluate, cfg.seed, state, on_generation)
    else:
        from metaaug.search.sensitivity import sensitivity_search

        g = sensitivity_search(space, budget, qmodel, calib.images[:256])
        ga_prior = 0.0  # computed again in full, not resumed
        state = GAState(scores={g: {**evaluate([g])[0], "generation": 0, "cost": budget.value(space.cost(g))}})
    ga_seconds = ga_prior + time.perf_counter() - t_ga
    _save_state(out / STATE_FILE, state, ga_seconds)
    best = best_genome(state, budget)
    policy = space.policy(best)
    files.write_json(out / "policy.json", policy.to_dict())
    cost = space.cost(best)
    summary = {
        "best": {"genome": list(best), **state.scores[best], "cost": cost},
        "budget": {"kind": cfg.budget_kind, "limit": budget.limit, "spec": cfg.budget},
        "uniform": {k: {"genome": list(g), **uniform_scores[k], "cost": space.cost(g),
                        "fits_budget": budget.fits(space.cost(g))} for k, g in uniform.items()},
        "candidates": [{"genome": list(g), **r, "avg_wbits": space.cost(g)["avg_wbits"]} for g, r in state.scores.items()],
        "history": state.history, "meta_curve": curve, "strategy": cfg.strategy, "evaluated": len(state.scores),
        "genes": {"wbits": space.wgenes, "abits": space.agroups if space.achoices else []},
        "seconds": {"metaquant": round(meta_seconds, 1), "search": round(ga_seconds, 1),  # every attempt's, as for runs
                    "total": round(time.perf_counter() - t0 + earlier + ga_prior, 1), "metaquant_reused": reused},
        "calib_images": len(calib), "holdout_images": len(hold), "metaquant_images": len(meta_images), **environment(dev),
    }
    from metaaug.viz import save_search_plots

    summary["plots"] = save_search_plots(out, summary, cfg.budget_kind)
    run.write_json("search.json", summary, indent=1)
    return summary
