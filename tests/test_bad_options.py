"""Hostile options: each is refused in one line naming the option, before any work (no data read, no run folder),
through the CLI and through the configs the Python API builds."""

import dataclasses
import json
from typing import ClassVar

import pytest
from typer.testing import CliRunner

from metaaug.cli.app import app
from metaaug.config_check import check_config, coerce
from metaaug.errors import ConfigError
from metaaug.methods import QDropConfig, method_config
from metaaug.methods.metaaug_config import MetaAugConfig
from metaaug.qat.config import QATConfig
from metaaug.qat.fewshot import EpisodeConfig
from metaaug.quant.policy import Policy
from metaaug.recon.config import ReconConfig
from metaaug.search.genetic import GAConfig
from metaaug.search.job import SearchConfig
from metaaug.search.metaquant import MetaQuantConfig
from metaaug.synth.fdda import FDDAConfig

runner = CliRunner()
NO_DATA = "/nonexistent/data"  # had the command read data before refusing, it would fail on this folder instead


def refused(args: list[str], message: str, out) -> None:
    """Exit code 2, `message` in one line, no traceback, and nothing written at `out`."""
    res = runner.invoke(app, args)
    text = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert message in text, res.output
    assert "Traceback" not in res.output and len([line for line in res.output.splitlines() if line.strip()]) == 1, res.output
    assert not out.exists(), "a refused command must not create its output"


@pytest.mark.parametrize(("extra", "message"), [
    (["--set", "lr_round=-1"], "lr_round must be > 0, got -1.0"),
    (["--set", "lr_act=0"], "lr_act must be > 0"),
    (["--set", "lr_weight_scale=-0.1"], "lr_weight_scale must be >= 0"),
    (["--set", "iters=abc"], "--set iters=abc: use --iters"),
    (["--set", "iters=5"], "--set iters=5: use --iters"),
    (["--set", "round_weight=abc"], "--set round_weight=abc: round_weight must be a finite number or null"),
    (["--set", "round_weight=-1"], "round_weight must be >= 0"),
    (["--set", "beta_start=nan"], "--set beta_start=nan: beta_start must be a finite number"),
    (["--set", "beta_end=0"], "beta_end must be > 0"),
    (["--set", "cache_device=tpu"], "cache_device must be cpu, cuda or cuda:N"),
    (["--set", "cache_device=auto"], "cache_device must be cpu, cuda or cuda:N"),
    (["--set", "quant_prob=0"], "quant_prob must be in (0, 1]"),
    (["--set", "warmup=1"], "warmup must be in [0, 1)"),
    (["--set", "batch_size=0"], "batch_size must be >= 1"),
    (["--set", "batch_size=2.5"], "--set batch_size=2.5: batch_size must be an integer"),
    (["--set", "units=foo"], "units must be one of block, layer"),
    (["--set", "learn_rounding=maybe"], "--set learn_rounding=maybe: learn_rounding must be true or false"),
    (["--set", "aug_views=-1"], "aug_views must be >= 0"),
    (["--set", "scale_schedule=linear"], "scale_schedule must be one of constant, cosine"),
    (["--set", "nokey"], "--set expects key=value"),
    (["--fast", "--set", "compute_dtype=float32"], "--fast sets compute_dtype: drop --set compute_dtype=float32 or --fast"),
    (["--fast", "--set", "compile_fake_quant=false"], "--fast sets compile_fake_quant"),
    (["--set", "=3"], "--set expects key=value"),
    (["--set", "lr_act=1e-4", "--set", "lr_act=1e-3"], "--set lr_act is given twice"),
    (["--set", "bogus=1"], "qdrop has no option 'bogus'"),
    (["--method", "metaaug", "--meta-iters", "3", "--set", "meta_iters=5"], "--set meta_iters=5: use --meta-iters"),
    (["--method", "metaaug", "--meta-iters", "-1"], "meta_iters must be >= 0"),
    (["--method", "metaaug", "--set", "inner_optimizer=lbfgs"], "inner_optimizer must be one of sgd, adam_fresh"),
    (["--method", "metaaug", "--set", "terms=kl+typo"], "unknown MetaAug loss term(s) ['typo']"),
    (["--method", "metaaug", "--set", "lr_t=0"], "lr_t must be > 0"),
    (["--method", "metaaug", "--set", "inner_steps=0"], "inner_steps must be >= 1"),
    (["--method", "metaaug", "--set", "temperature=-4"], "temperature must be > 0"),
    (["--iters", "-1"], "iters must be >= 0, got -1"),
    (["--holdout", "1"], "holdout must be in [0, 1)"),
    (["--holdout", "-0.1"], "holdout must be in [0, 1)"),
    (["--holdout", "nan"], "holdout must be a finite number"),
    (["--seed", "-1"], "seed must be in [0, 4294967295]"),
    (["--mixed-synth", "-1"], "mixed_synth must be >= 0"),
    (["--calib-size", "0"], "calib_size: calibration size must be positive"),
])
def test_quantize_refuses(tmp_path, extra, message):
    out = tmp_path / "run"
    refused(["quantize", "--calib-size", "32", "--iters", "1", "--data-dir", NO_DATA, "--out", str(out), *extra], message, out)


@pytest.mark.parametrize(("extra", "message"), [
    (["--steps", "0"], "steps must be >= 1, got 0"),
    (["--per-class", "0"], "per_class must be >= 1"),
    (["--real-per-class", "-1"], "real_per_class must be >= 0"),
    (["--seed", "-2"], "seed must be in [0, 4294967295]"),
    (["--set", "steps=5"], "--set steps=5: use --steps"),
    (["--set", "seed=1"], "--set seed=1: use --seed"),
    (["--set", "lr=0"], "lr must be > 0"),
    (["--set", "w_ce=nan"], "--set w_ce=nan: w_ce must be a finite number"),
    (["--set", "w_global=-1"], "w_global must be >= 0"),
    (["--set", "class_layer_fraction=0"], "class_layer_fraction must be in (0, 1]"),
    (["--set", "batch_size=abc"], "--set batch_size=abc: batch_size must be an integer"),
    (["--set", "image_shape=3,32"], "--set image_shape=3,32: image_shape must be a list of 3 integers or null"),
    (["--set", "image_shape=[3,0,32]"], "image_shape must each be >= 1"),
    (["--set", "value_range=[2,-2]"], "value_range must be [low, high] with low < high"),
    (["--set", "bogus=1"], "FDDA has no option 'bogus'"),
])
def test_synth_refuses(tmp_path, extra, message):
    out = tmp_path / "synth"
    refused(["synth", "--steps", "2", "--per-class", "1", "--data-dir", NO_DATA, "--out", str(out), *extra], message, out)


@pytest.mark.parametrize(("extra", "message"), [
    (["--strategy", "random", "--evaluations", "0"], "evaluations must be >= 1, got 0"),
    (["--strategy", "random", "--evaluations", "-3"], "evaluations must be >= 1, got -3"),
    (["--generations", "0"], "generations must be >= 1"),
    (["--population", "1"], "population must be >= 2"),
    (["--meta-steps", "-1"], "--meta-steps must be >= 0"),
    (["--calib-size", "0"], "calib_size must be >= 1"),
    (["--meta-images", "-1"], "meta_images must be >= 0"),
    (["--holdout", "0"], "--holdout must be in (0, 1)"),
    (["--seed", "-1"], "seed must be in [0, 4294967295]"),
    (["--abits-choices", ""], "--abits-choices is empty"),
    (["--wbits-choices", ""], "--wbits-choices is empty"),
    (["--wbits-choices", "2,x"], "--wbits-choices must be comma-separated integers"),
    (["--wbits-choices", "2,9"], "--wbits-choices must be an integer in 2..8, got 9"),
    (["--abits-choices", "1,4"], "--abits-choices must be an integer in 2..8, got 1"),
    (["--abits", "9"], "abits must be an integer in 2..8"),
    (["--ray-address", "127.0.0.1:1"], "--ray-address 127.0.0.1:1: nothing answers at 127.0.0.1:1"),
    (["--ray-address", "nonsense"], "--ray-address must be host:port"),
    (["--ray-address", "127.0.0.1:99999"], "--ray-address must be host:port"),
])
def test_search_refuses(tmp_path, extra, message):
    out = tmp_path / "search"
    refused(["search", "--avg-wbits", "3", "--data-dir", NO_DATA, "--out", str(out), *extra], message, out)


@pytest.mark.parametrize("budget", ["inf", "nan", "-1"])
def test_search_refuses_a_budget_that_is_no_limit(tmp_path, budget):
    out = tmp_path / "search"
    refused(["search", "--avg-wbits", budget, "--data-dir", NO_DATA, "--out", str(out)], "budget avg_wbits must be", out)


@pytest.mark.parametrize(("extra", "message"), [
    (["--epochs", "0"], "epochs must be >= 1"),
    (["--steps", "0"], "steps must be >= 1"),
    (["--tasks", "0"], "tasks must be >= 1"),
    (["--batch", "0"], "batch must be >= 1"),
    (["--lr", "0"], "lr must be > 0"),
    (["--lr", "nan"], "lr must be a finite number"),
    (["--classes", "-1,2"], "classes must each be >= 0"),
    (["--classes", ""], "--classes is empty"),
    (["--abits", "x"], "--abits must be comma-separated integers"),
])
def test_qat_refuses(tmp_path, extra, message):
    out = tmp_path / "qat"
    refused(["qat", "--data-dir", NO_DATA, "--out", str(out), *extra], message, out)


@pytest.mark.parametrize(("extra", "message"), [
    (["--ways", "1"], "ways must be >= 2"),
    (["--shots", "0,5"], "shots must each be >= 1"),
    (["--shots", ""], "--shots is empty"),
    (["--queries", "0"], "queries must be >= 1"),
    (["--episodes", "0"], "episodes must be >= 1"),
    (["--heads", "proto,knn"], "heads must each be one of proto, maml"),
    (["--heads", ","], "at least one K (--shots) and one head (--heads)"),
    (["--bits", "fp,abc"], "--bits must be comma-separated widths or fp"),
    (["--bits", ","], "--bits is empty"),
    (["--seed", "-1"], "seed must be in"),
])
def test_fewshot_refuses(tmp_path, extra, message):
    out = tmp_path / "fewshot.json"  # and the run folder does not exist: the options are refused before it is opened
    refused(["fewshot", "--run", str(tmp_path / "no-run"), "--out", str(out), *extra], message, out)


@pytest.mark.parametrize(("extra", "message"), [
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--epochs", "1", "--classes", "x"], "--classes must be comma-separated integers"),
    (["--epochs", "1", "--seed", "-1"], "--seed must be in"),
])
def test_train_refuses(tmp_path, extra, message):
    out = tmp_path / "weights"
    refused(["train", "--out", str(out), *extra], message, out)


def write(tmp_path, content: bytes | str):
    path = tmp_path / "policy.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


LAYERS = '{"conv1": {"wbits": 4, "abits": 4}}'
BAD_POLICIES = [
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe", "is not UTF-8 text"),
    ('{"layers": {}}'.encode("utf-16"), "is not UTF-8 text"),  # with its byte-order mark
    ("[" * 100000 + "]" * 100000, "nests too deeply"),
    ('{"layers": {"conv1": {"wbits": 4, "abits": 4}, "conv1": {"wbits": 8, "abits": 8}}}', "gives the key 'conv1' twice"),
    ('{"layers": {"conv1": {"wbits": 4, "wbits": 8, "abits": 4}}}', "gives the key 'wbits' twice"),
    (f'{{"layers": {LAYERS}, "layers": {LAYERS}}}', "gives the key 'layers' twice"),
    ('{"layers": {"x": 3}}', "policy entry for 'x' must be {\"wbits\": b, \"abits\": a}, got 3"),
    ('{"layers": {"x": [4, 4]}}', "policy entry for 'x' must be"),
    ('{"layers": {"x": {"wbits": true, "abits": 4}}}', "policy wbits of layer 'x' must be an integer in 2..8, got True"),
    ('{"layers": {"x": {"wbits": 4.0, "abits": 4}}}', "policy wbits of layer 'x' must be an integer in 2..8, got 4.0"),
    ('{"layers": {"x": {"wbits": 4, "abits": null}}}', "policy abits of layer 'x' must be an integer in 2..8, got None"),
    ('{"layers": {"x": {"wbits": 4, "abits": NaN}}}', "policy abits of layer 'x' must be an integer in 2..8"),
    (f'{{"layers": {LAYERS}, "comment": "mine"}}', "has an unknown key 'comment'"),
    (f'{{"layers": {LAYERS}, "written_by": 7}}', "\"written_by\" must be a string"),
    ('[1, 2]', "must be a JSON object"),
    ("", "is not valid JSON"),
]


@pytest.mark.parametrize(("content", "message"), BAD_POLICIES)
def test_policy_file_is_refused_in_one_line(tmp_path, content, message):
    path = write(tmp_path, content)
    with pytest.raises(ConfigError) as err:
        Policy.load(path)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("content", "message"), BAD_POLICIES[:7])
def test_quantize_refuses_a_bad_policy_file(tmp_path, content, message):
    out = tmp_path / "run"
    refused(["quantize", "--policy", str(write(tmp_path, content)), "--data-dir", NO_DATA, "--out", str(out)], message, out)


def test_policy_written_by_a_command_loads():
    policy = Policy.from_dict({"layers": json.loads(LAYERS), "written_by": "metaaug cost"})
    assert policy.layers["conv1"].wbits == 4


@pytest.mark.parametrize(("cls", "key", "raw", "expected"), [
    (ReconConfig, "iters", "200", 200),
    (ReconConfig, "iters", " 7 ", 7),
    (ReconConfig, "lr_round", "1e-3", 1e-3),
    (ReconConfig, "lr_round", "2", 2.0),
    (ReconConfig, "learn_rounding", "true", True),
    (ReconConfig, "learn_rounding", "False", False),
    (ReconConfig, "learn_rounding", "0", False),
    (ReconConfig, "round_weight", "0.1", 0.1),
    (ReconConfig, "round_weight", "null", None),
    (ReconConfig, "units", "layer", "layer"),
    (MetaAugConfig, "val_synth", "none", None),
    (MetaAugConfig, "val_synth", "synth/dir", "synth/dir"),
    (MetaAugConfig, "terms", "kl+pkt", ("kl", "pkt")),
    (MetaAugConfig, "terms", "kl,mse", ("kl", "mse")),
    (MetaAugConfig, "terms", '["kl"]', ("kl",)),
    (FDDAConfig, "image_shape", "[3,32,32]", (3, 32, 32)),
    (FDDAConfig, "image_shape", "3,32,32", (3, 32, 32)),
    (FDDAConfig, "value_range", "[-2,2]", (-2, 2)),
    (QATConfig, "classes", "0,1,2", (0, 1, 2)),
    (ReconConfig, "iters", 5, 5),  # already typed (bench/grid.py's options): as given
    (ReconConfig, "lr_round", 0.5, 0.5),
    (FDDAConfig, "image_shape", [1, 28, 28], [1, 28, 28]),
])
def test_coerce_parses_by_field_type(cls, key, raw, expected):
    value = coerce(cls, key, raw)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(("cls", "key", "raw", "message"), [
    (ReconConfig, "iters", "abc", "--set iters=abc: iters must be an integer"),
    (ReconConfig, "iters", "1.5", "--set iters=1.5: iters must be an integer"),
    (ReconConfig, "iters", "true", "--set iters=true: iters must be an integer"),
    (ReconConfig, "lr_round", "fast", "--set lr_round=fast: lr_round must be a finite number"),
    (ReconConfig, "lr_round", "inf", "--set lr_round=inf: lr_round must be a finite number"),
    (ReconConfig, "learn_rounding", "2", "--set learn_rounding=2: learn_rounding must be true or false"),
    (ReconConfig, "round_weight", "[0.1]", "--set round_weight=[0.1]: round_weight must be a finite number or null"),
    (FDDAConfig, "image_shape", "[3,32]", "image_shape must be a list of 3 integers or null"),
    (FDDAConfig, "image_shape", "[3,32,1.5]", "image_shape must be a list of 3 integers or null"),
    (FDDAConfig, "image_shape", "[" * 100000, "image_shape must be a list of 3 integers or null"),
    (QATConfig, "classes", "0,x", "--set classes=0,x: classes must be a list of integers or null"),
])
def test_coerce_names_the_option_in_one_line(cls, key, raw, message):
    with pytest.raises(ConfigError) as err:
        coerce(cls, key, raw)
    assert message in str(err.value) and len(str(err.value)) < 200


@pytest.mark.parametrize(("build", "message"), [
    (lambda: ReconConfig(iters=True), "iters must be an integer, got True"),
    (lambda: ReconConfig(iters="100"), "iters must be an integer, got '100'"),
    (lambda: ReconConfig(lr_round=float("inf")), "lr_round must be a finite number"),
    (lambda: ReconConfig(learn_rounding=1), "learn_rounding must be true or false"),
    (lambda: QDropConfig(quant_prob=1.5), "quant_prob must be in (0, 1]"),
    (lambda: method_config("qdrop", lr_round=-1), "lr_round must be > 0"),
    (lambda: method_config(QDropConfig(), bogus=1), "qdrop has no option 'bogus'"),
    (lambda: MetaAugConfig(clip=0), "clip must be > 0"),
    (lambda: FDDAConfig(steps=0), "steps must be >= 1"),
    (lambda: QATConfig(quant_lr=-1), "quant_lr must be > 0"),
    (lambda: QATConfig(bits=(2, True)), "bits must be a list of integers"),
    (lambda: EpisodeConfig(inner_lr=0), "inner_lr must be > 0"),
    (lambda: GAConfig(parents=0), "parents must be >= 1"),
    (lambda: GAConfig(mutate_prob=1.5), "mutate_prob must be in [0, 1]"),
    (lambda: MetaQuantConfig(lr=0), "lr must be > 0"),
    (lambda: MetaQuantConfig(steps=-1), "steps must be >= 0"),
    (lambda: SearchConfig(abits_choices=()), "--abits-choices must list at least one bit-width"),
    (lambda: SearchConfig(budget=float("inf")), "budget must be a finite number or a string, got inf"),
    (lambda: SearchConfig(budget="inf"), "budget avg_wbits must be a finite number"),
    (lambda: SearchConfig(evaluations=0), "evaluations must be >= 1"),
])
def test_python_api_configs_are_checked_like_the_cli(build, message):
    with pytest.raises(ConfigError) as err:
        build()
    assert message in str(err.value)


def test_defaults_pass_and_json_lists_become_tuples():
    for cls in (ReconConfig, QDropConfig, MetaAugConfig, FDDAConfig, QATConfig, EpisodeConfig, GAConfig, MetaQuantConfig, SearchConfig):
        cls()
    assert QATConfig(bits=[2, 4], classes=[0, 1]).bits == (2, 4)  # frozen: a stored config.json's lists
    assert EpisodeConfig(shots=[1]).shots == (1,)
    assert FDDAConfig(image_shape=[1, 28, 28]).image_shape == (1, 28, 28)
    assert GAConfig(population=4).parents == 2
    assert method_config("metaaug", terms="kl+pkt", meta_iters="5").meta_iters == 5


def test_a_range_for_no_field_is_a_bug_not_a_user_error():
    @dataclasses.dataclass
    class Typo:
        RANGES: ClassVar[dict] = {"iter": ">= 0"}
        iters: int = 0

    with pytest.raises(TypeError, match="'iter'"):
        check_config(Typo())


def test_a_failing_ray_init_is_one_line(monkeypatch):
    ray = pytest.importorskip("ray")
    from metaaug.search.job import _ray_scorer

    def fail(**kwargs):
        raise ConnectionError("could not reach the GCS\nretrying for 600 s")

    monkeypatch.setattr(ray, "init", fail)
    with pytest.raises(ConfigError, match=r"^--ray \(starting a local Ray\): ray.init failed: ConnectionError: could not reach the GCS$"):
        _ray_scorer(None, None, None, None, None, "kl", None)
