"""Careless and hostile input through the CLI, one test per kind of failure: exit code 2, one line naming the
problem, no traceback, and the files of an existing run folder byte-identical afterwards."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from metaaug.cli.app import app
from metaaug.qat import QATConfig
from metaaug.qat.job import QATJob
from metaaug.runs import RunFolder

runner = CliRunner()


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(res, message: str) -> None:
    text = " ".join(res.output.split())
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and text.count("error:") == 1, res.output
    assert message in text, res.output


@pytest.fixture(scope="module")
def finished_run(tiny_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("hostile") / "rtn"
    res = runner.invoke(app, ["quantize", "--method", "rtn", "--calib-size", "16", "--iters", "0", "--data-dir", str(tiny_data_dir),
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture
def run(finished_run, tmp_path):
    """A private copy of the finished run: a test may corrupt it."""
    return shutil.copytree(finished_run, tmp_path / "run")


@pytest.mark.parametrize(("args", "message"), [
    (["synth", "--out", "{run}", "--steps", "1", "--per-class", "1"], "is a quantize run folder (written by `metaaug quantize`), not a synth one"),
    (["export", "--run", "{run}", "--format", "packed", "--out", "{run}/quantized.safetensors"], "run that `metaaug export` did not write"),
    (["export", "--run", "{run}", "--format", "packed", "--out", "{run}/report.json", "--force"], "run that `metaaug export` did not write"),
    (["export", "--run", "{run}", "--format", "packed", "--out", "{other}/m.safetensors"], "inside another job's run folder"),
    (["search", "--out", "{run}", "--avg-wbits", "3", "--meta-steps", "0"], "(written by `metaaug quantize`), not a search one"),
    (["qat", "--out", "{run}", "--steps", "1"], "is a quantize run folder (written by `metaaug quantize`), not a qat one"),
    (["quantize", "--out", "{run}", "--method", "rtn", "--wbits", "3", "--calib-size", "16"], "holds a run with a different config"),
    (["fewshot", "--run", "{run}"], "is a quantize run folder; fewshot needs a run written by `metaaug qat`"),
    (["eval", "--run", "{run}", "--bits", "4"], "is not a QAT run"),
    (["export", "--run", "{run}", "--bits", "4"], "is not a QAT run"),
    (["cost", "--write-policy", "{run}/report.json"], "inside another job's run folder"),
])
def test_no_command_writes_into_or_over_an_existing_run(run, tmp_path, args, message):
    other = tmp_path / "other"
    RunFolder.claim(other, "qat", {"x": 1})
    before, before_other = snapshot(run), snapshot(other)
    res = runner.invoke(app, [a.format(run=run, other=other) for a in args])
    one_line_error(res, message)
    assert snapshot(run) == before and snapshot(other) == before_other


@pytest.mark.parametrize(("args", "message"), [
    (["quantize", "--out", "{file}", "--method", "rtn"], "is a file, not a run folder"),
    (["quantize", "--out", "{file}/sub/run", "--method", "rtn"], "user.txt is a file, not a folder"),
    (["quantize", "--out", "/proc/metaaug-run", "--method", "rtn"], "is not writable"),
    (["search", "--out", "{file}", "--avg-wbits", "3", "--meta-steps", "0"], "is a file, not a run folder"),
    (["qat", "--out", "{file}/run", "--steps", "1"], "user.txt is a file, not a folder"),
    (["synth", "--out", "{file}", "--steps", "1"], "is a file, not a run folder"),
    (["synth", "--out", "{foreign}", "--steps", "1"], "holds files no metaaug synth job writes (e.g. cat.png)"),
    (["cost", "--write-policy", "{tmp}/no/such/policy.json"], "does not exist"),
    (["cost", "--write-policy", "{file}"], "exists and was not written by `metaaug cost`; --force overwrites it"),
    (["cost", "--write-policy", "/proc/policy.json"], "is not writable"),
    (["export", "--run", "{run}", "--out", "{tmp}/no/such/model.onnx"], "does not exist"),
    (["export", "--run", "{run}", "--format", "packed", "--out", "{file}"], "exists and was not written by `metaaug export`"),
    (["export", "--run", "{tmp}", "--format", "packed"], "is not a run folder (config.json missing)"),
])
def test_bad_output_paths_are_refused_before_any_work(run, tmp_path, args, message):
    file, foreign = tmp_path / "user.txt", tmp_path / "images"
    file.write_text("the user's own file")
    foreign.mkdir()
    (foreign / "cat.png").write_bytes(b"not ours")
    before = snapshot(tmp_path)
    res = runner.invoke(app, [a.format(run=run, file=file, tmp=tmp_path, foreign=foreign) for a in args])
    one_line_error(res, message)
    assert snapshot(tmp_path) == before


def test_cost_overwrites_only_its_own_policy_file_unless_forced(tmp_path):
    path = tmp_path / "policy.json"
    path.write_text("my notes")
    assert runner.invoke(app, ["cost", "--write-policy", str(path)]).exit_code == 2
    assert path.read_text() == "my notes"
    res = runner.invoke(app, ["cost", "--write-policy", str(path), "--force"])
    assert res.exit_code == 0, res.output
    first = json.loads(path.read_text())
    assert first["written_by"] == "metaaug cost" and "layer1.0.conv1" in first["layers"]
    res = runner.invoke(app, ["cost", "--write-policy", str(path), "--wbits", "3"])  # its own file: no --force needed
    assert res.exit_code == 0, res.output
    assert json.loads(path.read_text())["layers"]["layer1.0.conv1"]["wbits"] == 3
    assert runner.invoke(app, ["cost", "--policy", str(path)]).exit_code == 0  # the mark does not stop it being a policy


@pytest.mark.parametrize(("name", "content", "args", "message"), [
    ("config.json", b'{"kind": "quantize", "mod', ["eval", "--run", "{run}"], "config.json cannot be read as a run config"),
    ("report.json", b'{"quant_top1": 8', ["eval", "--run", "{run}"], "report.json cannot be read as a run report"),
    ("quantized.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{", ["eval", "--run", "{run}"],
     "quantized.safetensors cannot be read as quantized weights"),
    ("config.json", b'{"kind": "quantize", "bogus": 1}', ["eval", "--run", "{run}"], "is not a quantize run config"),
    ("report.json", b'{"quant_top1": 8', ["export", "--run", "{run}", "--format", "packed"], "report.json cannot be read as a run report"),
])
def test_a_truncated_or_foreign_file_in_a_run_folder_is_named(run, name, content, args, message):
    (run / name).write_bytes(content)
    before = snapshot(run)
    res = runner.invoke(app, [a.format(run=run) for a in args])
    one_line_error(res, message)
    assert "--restart" in " ".join(res.output.split()) or "not a quantize run config" in message
    assert snapshot(run) == before


def test_a_truncated_checkpoint_is_named_and_restart_starts_over(tiny_data_dir, tmp_path):
    out = tmp_path / "r"
    args = ["quantize", "--method", "qdrop", "--calib-size", "16", "--iters", "1", "--data-dir", str(tiny_data_dir), "--out", str(out)]
    RunFolder.claim(out, "quantize", {"placeholder": 1})  # a folder with a quantize config of its own ...
    res = runner.invoke(app, args)
    one_line_error(res, "holds a run with a different config")
    res = runner.invoke(app, [*args, "--restart"])  # ... is taken over only when asked
    assert res.exit_code == 0, res.output
    (out / "progress.json").write_text('{"units_done": 3, "chec')
    res = runner.invoke(app, args)
    one_line_error(res, "progress.json cannot be read as a checkpoint manifest")
    assert "--restart" in res.output
    assert runner.invoke(app, [*args, "--restart"]).exit_code == 0


@pytest.fixture
def qat_run(tiny_data_dir, tmp_path):
    """A QAT run folder whose weights are corrupt: enough to reach the loading of its files."""
    job = QATJob(data_dir=str(tiny_data_dir), qat=QATConfig(bits=(2, 4), steps=1))
    run = RunFolder.claim(tmp_path / "qat", "qat", job.identity())
    run.write_json("report.json", {"kind": "qat", "top1": {"w4a4": 10.0}})
    run.file("qat.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    run.file("bn_stats.safetensors").write_bytes(b"garbage")
    return run.path


@pytest.mark.parametrize(("args", "message"), [
    (["eval", "--run", "{run}", "--bits", "4"], "qat.safetensors cannot be read as QAT weights"),
    (["eval", "--run", "{run}", "--bits", "9"], "--bits weight width must be an integer in 2..8, got 9"),
    (["eval", "--run", "{run}", "--bits", "abc"], "--bits 'abc' is not an integer"),
    (["eval", "--run", "{run}"], "is a QAT run: give the width with --bits"),
    (["export", "--run", "{run}", "--bits", "1,4"], "--bits weight width must be an integer in 2..8, got 1"),
    (["fewshot", "--run", "{run}", "--bits", "fp,4"], "qat.safetensors cannot be read as QAT weights"),
])
def test_qat_run_problems_are_one_line(qat_run, args, message):
    before = snapshot(qat_run)
    res = runner.invoke(app, [a.format(run=qat_run) for a in args])
    one_line_error(res, message)
    assert snapshot(qat_run) == before


def test_a_search_folder_is_not_evaluated_as_a_quantized_run(tmp_path):
    RunFolder.claim(tmp_path / "s", "search", {"x": 1})
    one_line_error(runner.invoke(app, ["eval", "--run", str(tmp_path / "s")]),
                   "is a search run folder; eval needs a run written by `metaaug quantize` or `metaaug qat`")
