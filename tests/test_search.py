"""Mixed-precision search: MetaQuantNet starts at round-to-nearest, the GA respects its budget and is reproducible
and resumable, and `search` then `quantize --policy` runs end to end."""

import json
import random

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from conftest import TinyNet, randomize_bn
from metaaug.cli.app import app
from metaaug.errors import ConfigError
from metaaug.models.resnet import resnet20
from metaaug.quant import QuantSpec, prepare
from metaaug.runs import Checkpoints
from metaaug.search import Budget, GAConfig, MetaQuantConfig, MetaQuantNet, SearchSpace, genetic_search
from metaaug.search.genetic import best_genome
from metaaug.search.job import _load_state, _save_state

runner = CliRunner()


def space_for(model, wchoices=(2, 3, 4), achoices=None):
    q = prepare(randomize_bn(model), QuantSpec(8, 8), "layer")
    return q, SearchSpace(q, torch.randn(8, 1, 28, 28), wchoices, achoices)


def test_metaquantnet_at_start_is_round_to_nearest():
    torch.manual_seed(0)
    model = resnet20()
    q, space = space_for(model)
    net = MetaQuantNet(q, torch.randn(64, 1, 28, 28), space.wchoices, (4,), space.wgenes, MetaQuantConfig())
    for bits in (2, 3, 4):
        rtn = prepare(model, QuantSpec(bits, 4), "layer")
        for ql in rtn.quant_layers():
            if ql.path in space.wgenes:
                assert torch.allclose(net.weight(ql.path, bits), ql.wq(ql.weight), atol=1e-6), (ql.path, bits)


def fake_fitness(genomes):
    """More bits score higher, with a per-gene twist so the optimum is not trivial."""
    return [{"fitness": float(sum(b * (1 + 0.1 * (i % 3)) for i, b in enumerate(g)))} for g in genomes]


def test_ga_respects_budget_and_is_reproducible_by_seed():
    _, space = space_for(TinyNet(), achoices=(2, 4))
    budget = Budget("avg_wbits", 3.0)
    cfg = GAConfig(population=12, generations=4)
    a = genetic_search(space, budget, cfg, fake_fitness, seed=1)
    b = genetic_search(space, budget, cfg, fake_fitness, seed=1)
    c = genetic_search(space, budget, cfg, fake_fitness, seed=2)
    assert a.scores.keys() == b.scores.keys() and a.history == b.history
    assert a.scores.keys() != c.scores.keys()
    assert all(space.cost(g)["avg_wbits"] <= 3.0 for g in a.scores)  # no candidate over budget is ever scored
    best = best_genome(a, budget)
    assert a.scores[best]["fitness"] >= max(r["fitness"] for r in fake_fitness([space.repair(space.random(random.Random(s)), budget,
                                                                                          random.Random(s)) for s in range(20)]))
    assert [h["best_fitness"] for h in a.history] == sorted(h["best_fitness"] for h in a.history)  # elitism


def test_ga_resumes_to_the_uninterrupted_result(tmp_path):
    _, space = space_for(TinyNet())
    budget, cfg = Budget("avg_wbits", 3.0), GAConfig(population=10, generations=4)
    full = genetic_search(space, budget, cfg, fake_fitness, seed=3)

    class Stop(Exception):
        pass

    def stop_after_two(state):
        _save_state(tmp_path / "s.json", state, seconds=1.5 * state.generation)
        if state.generation == 2:
            raise Stop

    with pytest.raises(Stop):
        genetic_search(space, budget, cfg, fake_fitness, seed=3, on_generation=stop_after_two)
    saved, seconds = _load_state(tmp_path / "s.json")
    assert seconds == 3.0  # the time spent before the interruption travels with the state
    resumed = genetic_search(space, budget, cfg, fake_fitness, seed=3, state=saved)
    assert resumed.scores.keys() == full.scores.keys() and resumed.history == full.history
    assert resumed.population == full.population


def test_a_resumed_search_reports_the_training_time_of_every_attempt(tmp_path, small_data, monkeypatch):
    """MetaQuantNet interrupted after its first save, then resumed: `seconds` counts both attempts' training, as a
    resumed quantize run's report does (before, only the time after the resume was reported)."""
    import time

    from metaaug.search import job

    class SlowSteps:  # each training step takes at least 0.5 s; the first attempt stops in its third step
        def __init__(self, stop_at: int | None) -> None:
            self.stop_at, self.steps, self.started, self.last = stop_at, 0, 0.0, 0.0

        def phase(self, name: str, total: int) -> None:
            self.training = name == "MetaQuantNet"
            if self.training:
                self.started = time.perf_counter()

        def advance(self, steps: int, info: str) -> None:
            if self.training and info.startswith("KL"):
                self.steps += 1
                if self.steps == self.stop_at:
                    raise KeyboardInterrupt
                time.sleep(0.5)
                self.last = time.perf_counter()

    monkeypatch.setattr(job, "SAVE_EVERY", 2)
    cfg = job.SearchConfig(wbits_choices=(2, 4), budget=3.0, calib_size=64, data_dir=str(small_data),
                           meta=MetaQuantConfig(steps=4, batch_size=8), ga=GAConfig(population=4, generations=1))
    with pytest.raises(KeyboardInterrupt):
        job.run_search(cfg, tmp_path, "cpu", SlowSteps(stop_at=3))
    first = Checkpoints(tmp_path).load(job.NET_PROGRESS).info
    assert first["step"] == 2 and first["seconds"] >= 1.0
    second = SlowSteps(stop_at=None)
    summary = job.run_search(cfg, tmp_path, "cpu", second)
    wall = second.last - second.started  # the resumed attempt's two training steps
    # below: the first attempt is missing (>= 1 s); above: it is counted twice. The slack is loading and FP logits.
    assert first["seconds"] + wall - 0.3 <= summary["seconds"]["metaquant"] <= first["seconds"] + wall + 1.0
    assert summary["seconds"]["total"] >= summary["seconds"]["metaquant"] + summary["seconds"]["search"]
    assert summary["seconds"]["metaquant_reused"] is False


def test_unreachable_budget_names_the_smallest_reachable():
    _, space = space_for(TinyNet())
    with pytest.raises(ConfigError, match=r"no policy meets avg_wbits <= 1\.5: the smallest reachable is"):
        space.check_budget(Budget("avg_wbits", 1.5))


def test_budget_named_by_a_uniform_policy_is_its_cost():
    _, space = space_for(resnet20(), achoices=(2, 3, 4))
    w3a3, w2 = space.cost(space.uniform(3, 3)), space.cost(space.uniform(2, 2))
    assert space.budget("bops", "W3A3") == Budget("bops", w3a3["bops"])
    assert space.budget("weight_kb", "1.1xW2").limit == pytest.approx(1.1 * w2["weight_kb"])
    assert space.budget("avg_wbits", "2.5") == Budget("avg_wbits", 2.5)
    assert space.cost(space.uniform(2, 4))["bops"] < space.budget("bops", "W3A3").limit < space.cost(space.uniform(4, 4))["bops"]
    kb = space.budget("weight_kb", "1.1xW2")  # a budget admits the policy it is the cost of, and nothing above it
    exact = Budget("weight_kb", w2["weight_kb"] * 1.1 / 1.1)
    assert exact.fits(w2) and kb.fits(w2) and not kb.fits(space.cost(space.uniform(3, 2)))
    assert space.budget("bops", "W3A3").fits(w3a3) and not Budget("bops", w3a3["bops"] - 1).fits(w3a3)
    with pytest.raises(ConfigError, match="needs the activation bits"):
        space.budget("bops", "W3")
    with pytest.raises(ConfigError, match=r"give a number or a uniform policy such as W3A3"):
        space.budget("bops", "three")


def test_uniform_policies_name_every_choice_and_meet_their_own_budget():
    _, space = space_for(resnet20(), achoices=(2, 4))
    policies = space.uniform_policies()
    assert list(policies) == ["W2A2", "W2A4", "W3A2", "W3A4", "W4A2", "W4A4"]
    assert policies["W3A2"] == space.uniform(3, 2)
    w3a2 = space.budget("bops", "W3A2")
    assert w3a2.value(space.cost(policies["W3A2"])) == pytest.approx(w3a2.limit)
    assert list(space_for(TinyNet())[1].uniform_policies()) == ["W2A4", "W3A4", "W4A4"]  # activations fixed at --abits


def test_search_refuses_a_malformed_budget(tmp_path):
    res = runner.invoke(app, ["search", "--bops", "W3Z3", "--out", str(tmp_path / "s")])
    assert res.exit_code == 2 and "'W3Z3': give a number or a uniform policy" in res.output


def test_search_then_quantize_with_the_policy(tmp_path, small_data):
    out = tmp_path / "search"
    args = ["search", "--model", "resnet20", "--avg-wbits", "2.5", "--wbits-choices", "2,3,4", "--abits", "4",
            "--generations", "2", "--population", "4", "--meta-steps", "3", "--calib-size", "64", "--meta-images", "16", "--seed", "0",
            "--data-dir", str(small_data), "--device", "cpu", "--out", str(out)]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    policy = json.loads((out / "policy.json").read_text())
    assert set(policy) == {"layers"} and all(set(v) == {"wbits", "abits"} for v in policy["layers"].values())
    summary = json.loads((out / "search.json").read_text())
    assert summary["best"]["cost"]["avg_wbits"] <= 2.5
    assert (summary["calib_images"], summary["holdout_images"], summary["metaquant_images"]) == (51, 13, 51 + 16)
    assert all({"genome", "fitness", "cost", "top1", "kl"} <= set(c) for c in summary["candidates"])
    assert all(c["cost"] <= 2.5 for c in summary["candidates"])
    assert (out / "pareto.png").exists() and (out / "generations.png").exists()
    assert runner.invoke(app, args).exit_code == 0  # a finished search re-runs from its saved state
    res = runner.invoke(app, [*args, "--seed", "1"])  # the last --seed wins: another config in the same folder
    assert res.exit_code == 2 and "different config" in res.output

    run = tmp_path / "run"
    res = runner.invoke(app, ["quantize", "--policy", str(out / "policy.json"), "--method", "rtn", "--calib-size", "32",
                              "--data-dir", str(small_data), "--out", str(run)])
    assert res.exit_code == 0, res.output
    report = json.loads((run / "report.json").read_text())
    assert report["policy"] == policy and report["cost"]["avg_wbits"] == summary["best"]["cost"]["avg_wbits"]


def test_search_needs_exactly_one_budget(tmp_path):
    res = runner.invoke(app, ["search", "--out", str(tmp_path / "s")])
    assert res.exit_code == 2 and "exactly one budget" in res.output


def test_random_search_scores_the_asked_number_within_budget():
    from metaaug.search.genetic import random_search

    _, space = space_for(TinyNet())
    budget = Budget("avg_wbits", 3.5)
    state = random_search(space, budget, 15, 4, fake_fitness, seed=0)
    assert len(state.scores) == 15 and all(space.cost(g)["avg_wbits"] <= 3.5 for g in state.scores)
    tight = random_search(space, Budget("avg_wbits", 3.0), 15, 4, fake_fitness, seed=0)
    assert len(tight.scores) == 5  # only five genomes fit: the search ends when the space is exhausted
    assert state.scores.keys() == random_search(space, budget, 15, 4, fake_fitness, seed=0).scores.keys()


def test_sensitivity_knapsack_respects_budget_and_protects_sensitive_layers():
    from metaaug.search.sensitivity import fisher_traces, quant_errors, sensitivity_genome

    torch.manual_seed(0)
    q, space = space_for(TinyNet(), wchoices=(2, 4, 8))
    budget = Budget("avg_wbits", 4.5)  # one of the four 144-weight convs at 8 bits (4.02) fits, two do not
    traces, errors = fisher_traces(q, torch.randn(16, 1, 28, 28)), quant_errors(q, space.wchoices)
    assert all(v > 0 for v in traces.values())
    assert all(errors[n][2] > errors[n][4] > errors[n][8] for n in errors)
    g = sensitivity_genome(space, budget, traces, errors)
    assert space.cost(g)["avg_wbits"] <= 4.5
    sensitive = space.wgenes[1]
    g = sensitivity_genome(space, budget, {**traces, sensitive: 1e9}, errors)
    assert g[1] == 8 and space.cost(g)["avg_wbits"] <= 4.5
    assert sensitivity_genome(space, budget, {n: 0.0 for n in traces}, errors) is not None


def test_sensitivity_greedy_with_activation_bits_respects_bops_and_protects_sensitive_tensors():
    from metaaug.search.sensitivity import act_losses, greedy_genome, weight_losses

    torch.manual_seed(0)
    q, space = space_for(TinyNet(), wchoices=(2, 4, 8), achoices=(2, 4, 8))
    images = torch.randn(16, 1, 28, 28)
    wl, al = weight_losses(q, images, space.wchoices), act_losses(q, images, space.achoices)
    assert {tuple(g) for g in space.agroups} <= set(al) and all(al[k][2] > al[k][4] > al[k][8] > 0 for k in al)
    assert all(wl[n][2] > wl[n][4] > wl[n][8] for n in space.wgenes)
    budget = space.budget("bops", "W4A4")
    g = greedy_genome(space, budget, wl, al)
    assert space.cost(g)["bops"] <= budget.limit
    raised = [h for i in range(space.length) for b in space.gene_choices(i) if b > g[i]
              for h in [(*g[:i], b, *g[i + 1:])] if space.cost(h)["bops"] <= budget.limit]
    assert not raised  # the room left is used: no gene can be raised within the budget
    sensitive = space.length - 1  # the last activation gene
    key = tuple(space.agroups[-1])
    g = greedy_genome(space, budget, wl, {**al, key: {2: 1e9, 4: 1e8, 8: 0.0}})
    assert g[sensitive] == 8 and space.cost(g)["bops"] <= budget.limit


def test_ray_scoring_gives_the_serial_result():
    pytest.importorskip("ray")
    import ray

    from metaaug.data.datasets import ImageDataset
    from metaaug.search.job import _ray_scorer, score

    torch.manual_seed(0)  # torch modules only: Ray workers cannot import the tests' own classes
    model = randomize_bn(nn.Sequential(nn.Conv2d(1, 4, 3, 2), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 8, 3, 2), nn.ReLU(),
                                       nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                       nn.Flatten(), nn.Linear(8, 10)))
    q, space = space_for(model, achoices=(2, 4))
    images = torch.randn(48, 1, 28, 28)
    net = MetaQuantNet(q, images, space.wchoices, space.achoices, space.wgenes, MetaQuantConfig())
    hold = ImageDataset(images[:24], torch.randint(0, 10, (24,)), [str(i) for i in range(10)])
    fp = net.fp_logits(hold.images)
    budget, cfg = Budget("avg_wbits", 3.5), GAConfig(population=6, generations=2)
    serial = genetic_search(space, budget, cfg, lambda gs: score(net, space, hold.images, hold.labels, fp, gs), seed=4)
    try:
        remote = genetic_search(space, budget, cfg, _ray_scorer(model, net, space, hold, fp, "kl", None), seed=4)
    finally:
        ray.shutdown()
    assert serial.scores == remote.scores and serial.population == remote.population
