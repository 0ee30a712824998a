"""Mixed-precision search benchmark: policies from MetaQuantNet + GA against uniform bits (those in the budget that
no other uniform policy in it dominates), random search (same proxy, same number of evaluations), the GA with a
round-to-nearest proxy and the Fisher-sensitivity knapsack (its proxy column is the round-to-nearest score: it needs
no meta network), every policy finished by the same QDrop reconstruction; and the proxy's rank correlation with finished accuracy.

    python bench/search.py --out bench/search --models resnet20 --budget avg_wbits=2.5 --seeds 0,1,2 --iters 2000

Searches run once (seed 0; their folders resume), finishing runs per seed. `--tau N` also samples N random policies
within the budget, scores them with both proxies and finishes each (`--tau-seeds`, default the first seed): Kendall
tau per proxy against the mean over those seeds (MetaQuantNet, round-to-nearest, the sensitivity baseline's
diagonal-Fisher loss estimate, and the budgeted cost alone: what any proxy must beat), and with two or more seeds
the tau between seeds (the ceiling any proxy can reach when the finished accuracies differ by little more than seed
noise). `--prior FILE` adds the finishing runs of an earlier invocation of the same cell (its results.json) for
the seeds this one does not run, after checking that its settings and the policies its searches found are the
same: a cell gains a seed without redoing the seeds it has (the earlier tau, if this run has none, is kept).
Finishing runs go `--jobs N` at once, each policy's as soon as it is known: the tau policies' and the uniform
policies' first, then each search's as it finishes, while the next search runs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import sys
from dataclasses import asdict
from pathlib import Path

import metaaug  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads OpenMP)

# isort: split

import torch

from grid import SET_HELP, Runner, parse_options
from metaaug.data import calibration_split, load_dataset
from metaaug.models.registry import build_model
from metaaug.pipeline import RunConfig
from metaaug.quant import QuantSpec, prepare
from metaaug.search import GAConfig, MetaQuantConfig, SearchConfig, SearchSpace, run_search
from metaaug.search.job import NET_FILE
from metaaug.search.sensitivity import predicted_losses
from metaaug.search.space import cost_value
from tables import mean_std, write_results


def kendall_tau(a: list[float], b: list[float]) -> float:
    """Kendall's tau-b (ties counted in neither concordant nor discordant pairs)."""
    conc = disc = ties_a = ties_b = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            da, db = a[i] - a[j], b[i] - b[j]
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif (da > 0) == (db > 0):
                conc += 1
            else:
                disc += 1
    denom = ((conc + disc + ties_a) * (conc + disc + ties_b)) ** 0.5
    return (conc - disc) / denom if denom else 0.0


def dominates(a: list[int], b: list[int]) -> bool:
    """Policy a has at least b's bits everywhere and more somewhere: finishing b as well tells nothing new."""
    return a != b and all(x >= y for x, y in zip(a, b, strict=True))


SAME_CELL = ("models", "budget", "wbits_choices", "abits_choices", "abits", "iters", "set", "meta_steps", "generations", "population")


def load_prior(path: Path, a: argparse.Namespace) -> dict:
    """An earlier invocation's results.json, refused unless it measured the same cell."""
    if not path.is_file():
        sys.exit(f"--prior {path}: no such file")
    prior = json.loads(path.read_text())
    diff = [k for k in SAME_CELL if prior["settings"].get(k) != getattr(a, k)]
    if diff:
        sys.exit(f"--prior {path} measured another cell (differs in: {', '.join(diff)})")
    return {**prior, "path": str(path), "seeds": [int(v) for v in prior["settings"]["seeds"].split(",")]}


def run_name(model: str, policy: str, budget: str, seed: int) -> str:
    return f"{model}-{policy.replace(' ', '-')}-{budget}-s{seed}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--models", default="resnet20")
    p.add_argument("--budget", default="avg_wbits=2.5", help="KIND=LIMIT (avg_wbits, weight_kb, weight_vs_w8, bops, bops_vs_w8a8)")
    p.add_argument("--wbits-choices", default="2,3,4")
    p.add_argument("--abits-choices", default=None)
    p.add_argument("--abits", type=int, default=4)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--set", default="", help=SET_HELP)
    p.add_argument("--meta-steps", type=int, default=1000)
    p.add_argument("--generations", type=int, default=20)
    p.add_argument("--population", type=int, default=50)
    p.add_argument("--tau", type=int, default=0)
    p.add_argument("--tau-seeds", default="", help="seeds for the tau policies' finishing runs (default: the first of --seeds)")
    p.add_argument("--tau-meta-steps", default="", help="also tau for MetaQuantNets trained this many steps, e.g. 50,200")
    p.add_argument("--jobs", type=int, default=1, help="finishing runs at once (worker processes)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--prior", type=Path, action="append", default=[], help="results.json of an earlier run of this cell: its seeds join")
    a = p.parse_args()
    priors = [load_prior(path, a) for path in a.prior]
    command = "python bench/search.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    kind, _, limit = a.budget.partition("=")
    a.tau_meta_steps = [int(v) for v in a.tau_meta_steps.split(",") if v]
    seeds = [int(s) for s in a.seeds.split(",")]
    tau_seeds = [int(s) for s in a.tau_seeds.split(",")] if a.tau_seeds else seeds[:1]
    wch = tuple(int(v) for v in a.wbits_choices.split(","))
    ach = tuple(int(v) for v in a.abits_choices.split(",")) if a.abits_choices else None
    rows, payload = [], {"searches": {}, "finished": {}, "tau": {}}
    shared = ["ga-metaquant", "random-metaquant", f"tau{a.tau}-metaquant"]  # trained at --meta-steps: one net serves all

    def done(i: int, run_dir: str, r: dict, seconds: float) -> None:
        payload["finished"][Path(run_dir).name] = {k: r.get(k) for k in ("quant_top1", "calib_top1", "fp_top1", "seconds", "device")}
        print(f"  [{i + 1}] {Path(run_dir).name}: {r['quant_top1']} ({seconds:.0f}s)", flush=True)

    for model in a.models.split(","):
        def search(name: str, model: str = model, steps: int = a.meta_steps, **kw) -> dict:
            cfg = SearchConfig(model=model, wbits_choices=wch, abits_choices=ach, abits=a.abits, budget_kind=kind,
                               budget=limit, meta=MetaQuantConfig(steps=steps),
                               ga=GAConfig(population=a.population, generations=a.generations), **kw)
            folder = a.out / "searches" / f"{model}-{kind}{limit}-{name}"
            nets = [a.out / "searches" / f"{model}-{kind}{limit}-{other}" / NET_FILE for other in shared]
            trained = next((net for net in nets if net.exists()), None)
            if name in shared and trained is not None and not (folder / NET_FILE).exists():
                folder.mkdir(parents=True, exist_ok=True)  # MetaQuantNet is trained once per model: the others reuse it
                shutil.copy(trained, folder / NET_FILE)
            finished = folder / "search.json"
            summary = json.loads(finished.read_text()) if finished.exists() else run_search(cfg, folder, a.device)
            print(f"{model} {name}: proxy top-1 {summary['best']['top1']} ({summary['seconds']})", flush=True)
            payload["searches"][f"{model}-{name}"] = {k: summary[k] for k in ("best", "seconds", "evaluated", "strategy")}
            return summary

        space_model = prepare(build_model(model), QuantSpec(8, 8), "layer")
        space = SearchSpace(space_model, torch.zeros(1, 1, 28, 28), wch, ach, a.abits)

        def finish(run: str, genome: list[int], seed: int, model: str = model, space: SearchSpace = space) -> tuple[str, RunConfig]:
            return str(a.out / "runs" / run), RunConfig(model=model, method="qdrop", calib_size=1024, iters=a.iters, seed=seed,
                                                        policy=space.policy(tuple(genome)).to_dict(), options=parse_options(a.set))

        runner = Runner(a.jobs, a.device, done)
        if a.tau:  # first: its finishing runs start while the searches below run
            mq = search(f"tau{a.tau}-metaquant", strategy="random", evaluations=a.tau)
            rt = search(f"tau{a.tau}-rtn-proxy", strategy="random", evaluations=a.tau, proxy="rtn")
            tau_runs = {seed: [finish(f"{model}-tau-{i}-{kind}{limit}-s{seed}", c["genome"], seed) for i, c in enumerate(mq["candidates"])]
                        for seed in tau_seeds}
            runner.submit([job for runs in tau_runs.values() for job in runs])
        budget = space.budget(kind, limit)
        fits = {k: g for k, g in space.uniform_policies().items() if budget.fits(space.cost(g))}
        entries = {f"uniform {k}": (list(g), space.cost(g)) for k, g in fits.items()
                   if not any(dominates(v, g) for v in fits.values())}
        finals: dict[str, list[tuple[str, RunConfig]]] = {}

        def runs_of(name: str, genome: list[int], model: str = model, finish=finish) -> list[tuple[str, RunConfig]]:
            return [finish(run_name(model, name, f"{kind}{limit}", seed), genome, seed) for seed in seeds]

        for name, (genome, _) in entries.items():  # each policy's runs start as soon as it is known: these first
            finals[name] = runs_of(name, genome)
            runner.submit(finals[name])
        candidates: dict[str, dict] = {}
        for name, kw in (("ga-metaquant", {}), ("ga-rtn-proxy", {"proxy": "rtn"}), ("random-metaquant", {"strategy": "random"}),
                         ("sensitivity", {"strategy": "sensitivity", "proxy": "rtn"})):
            if name == "random-metaquant":
                kw["evaluations"] = candidates["ga-metaquant"]["evaluated"]
            s = candidates[name] = search(name, **kw)
            for prior in priors:
                if prior["searches"][f"{model}-{name}"]["best"]["genome"] != s["best"]["genome"]:
                    sys.exit(f"--prior {prior['path']}: its {name} search found another policy; its seeds cannot join")
            entries[name] = (s["best"]["genome"], s["best"]["cost"])
            finals[name] = runs_of(name, s["best"]["genome"])
            runner.submit(finals[name])  # while the next search runs
        entries = {name: entries[name] for name in [*candidates, *(k for k in entries if k not in candidates)]}  # table order
        others = {steps: search(f"tau{a.tau}-metaquant{steps}", steps=steps, strategy="random", evaluations=a.tau)
                  for steps in (a.tau_meta_steps if a.tau else [])}  # the proxy's quality against MetaQuantNet's training length
        reports = runner.results()
        for name, (genome, cost) in entries.items():
            reps = [reports[run_dir] for run_dir, _ in finals[name]]
            for prior in priors:  # the same policy's runs on the seeds this invocation does not run
                reps += [prior["finished"][run_name(model, name, f"{kind}{limit}", seed)] for seed in prior["seeds"] if seed not in seeds]
            abits = statistics.mean(genome[len(space.wgenes):]) if ach else a.abits  # unweighted, over the searched tensors
            rows.append({"model": model, "budget": f"{kind} <= {limit}", "policy": name, "avg_wbits": cost["avg_wbits"],
                         "avg_abits": round(abits, 2),
                         "weight_kb": cost["weight_kb"], "gbops": cost["gbops"], "seeds": len(reps),
                         "quant_top1": mean_std([r["quant_top1"] for r in reps]),
                         "proxy": f"{candidates[name]['best']['top1']:.2f} / {candidates[name]['best']['kl']:.4f}" if name in candidates else "-",
                         "search_seconds": candidates[name]["seconds"]["total"] if name in candidates else "-"})
        if a.tau:
            by_genome = {tuple(c["genome"]): c for c in rt["candidates"]}
            by_seed = {seed: [reports[run_dir]["quant_top1"] for run_dir, _ in runs] for seed, runs in tau_runs.items()}
            top1s = [round(statistics.mean(vals), 3) for vals in zip(*by_seed.values(), strict=True)]
            fit_mq = [c["fitness"] for c in mq["candidates"]]
            fit_rt = [by_genome[tuple(c["genome"])]["fitness"] for c in mq["candidates"]]
            genomes = [tuple(c["genome"]) for c in mq["candidates"]]
            calib = calibration_split(load_dataset(None, "train"), 1024, 0, SearchConfig().holdout)[0].images[:256]
            fisher = predicted_losses(space, space_model, calib, genomes)  # the sensitivity baseline's estimate
            payload["tau"][model] = {"policies": len(top1s), "metaquant": round(kendall_tau(fit_mq, top1s), 3),
                                     "rtn_proxy": round(kendall_tau(fit_rt, top1s), 3),
                                     "fisher_proxy": round(kendall_tau([-v for v in fisher], top1s), 3),
                                     "cost_only": round(kendall_tau([cost_value(kind, space.cost(g)) for g in genomes], top1s), 3),
                                     "final_top1": top1s,
                                     "final_spread": round(max(top1s) - min(top1s), 2),
                                     "final_std": round(statistics.pstdev(top1s), 3), "seeds": tau_seeds}
            if len(tau_seeds) > 1:
                pairs = [(x, y) for i, x in enumerate(tau_seeds) for y in tau_seeds[i + 1:]]
                payload["tau"][model]["between_seeds"] = round(statistics.mean(
                    kendall_tau(by_seed[x], by_seed[y]) for x, y in pairs), 3)
                payload["tau"][model]["final_top1_by_seed"] = by_seed
            for steps, other in others.items():
                fits = {tuple(c["genome"]): c["fitness"] for c in other["candidates"]}
                payload["tau"][model][f"metaquant_{steps}_steps"] = round(
                    kendall_tau([fits[tuple(c["genome"])] for c in mq["candidates"]], top1s), 3)
            print(f"{model} Kendall tau: {payload['tau'][model]}", flush=True)
        elif model in (taus := {m: {**t, "from": prior["path"]} for prior in priors for m, t in prior["tau"].items()}):
            payload["tau"][model] = taus[model]
        joined = f" (with those of {', '.join(map(str, a.prior))})" if a.prior else ""
        legend = (f"Every policy finished by QDrop ({a.iters} iterations per unit, 1024 images); quant_top1: test top-1, mean ± std "
                  f"over seeds{joined}. avg_abits: mean bits of the searchable activation tensors (unweighted). proxy: the search's "
                  f"own held-out top-1 / KL with its proxy weights. Searches: "
                  f"{a.meta_steps} MetaQuantNet steps, GA {a.population} x {a.generations}. Kendall tau (proxy fitness vs "
                  f"finished top-1 of random policies) in results.json: {json.dumps(payload['tau'])}")
        write_results(a.out, command, rows, {**payload, "settings": {**vars(a), "out": str(a.out), "prior": list(map(str, a.prior))},
                                             "search_config": asdict(SearchConfig())}, legend)


if __name__ == "__main__":
    main()
