"""The run folder: kind and config guarded before anything is written, checkpoints that never pair a new part with
an old manifest, corrupt files named in one line, --restart taking a folder over."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from metaaug.errors import ConfigError
from metaaug.runs import Checkpoints, CorruptFileError, RunFolder
from metaaug.runs import files as run_files
from metaaug.runs.outputs import check_output_file


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_folder_of_another_kind_or_config_is_refused_before_anything_is_written(tmp_path):
    RunFolder.claim(tmp_path / "q", "quantize", {"wbits": 2})
    before = snapshot(tmp_path / "q")
    with pytest.raises(ConfigError, match=r"is a quantize run folder .* not a synth one"):
        RunFolder.claim(tmp_path / "q", "synth", {"wbits": 2})
    with pytest.raises(ConfigError, match=r"different config \(differs in: wbits\)"):
        RunFolder.claim(tmp_path / "q", "quantize", {"wbits": 3})
    with pytest.raises(ConfigError, match="not a synth one"):  # --restart/--force never take over another kind
        RunFolder.claim(tmp_path / "q", "synth", {}, restart=True)
    assert snapshot(tmp_path / "q") == before
    run = RunFolder.claim(tmp_path / "q", "quantize", {"wbits": 3}, restart=True)
    assert json.loads(run.file("config.json").read_text()) == {"kind": "quantize", "wbits": 3}


def test_a_legacy_quantize_folder_without_kind_is_a_quantize_run(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"wbits": 2}))
    assert RunFolder.open(tmp_path).kind == "quantize"
    RunFolder.claim(tmp_path, "quantize", {"wbits": 2})
    with pytest.raises(ConfigError, match="is a quantize run folder; this needs a run written by `metaaug qat`"):
        RunFolder.open(tmp_path, ("qat",), "this")


@pytest.mark.parametrize("setup", ["file", "foreign", "missing_parent", "read_only"])
def test_bad_output_folders_are_one_line(tmp_path, setup):
    target = tmp_path / "run"
    message = {"file": "is a file, not a run folder", "foreign": "holds files no metaaug quantize job writes (e.g. notes.txt)",
               "missing_parent": "its parent folder", "read_only": "is not writable"}[setup]
    if setup == "file":
        target.write_text("x")
    elif setup == "foreign":
        target.mkdir()
        (target / "notes.txt").write_text("mine")
    elif setup == "missing_parent":
        target = tmp_path / "no" / "such" / "run"
    else:
        target = Path("/proc/metaaug-run")  # a folder no one can write to, root included (chmod does not stop root)
    with pytest.raises(ConfigError, match=re.escape(message)):
        RunFolder.claim(target, "quantize", {"x": 1}, make_parents=False)
    if setup == "foreign":
        assert snapshot(target) == {"notes.txt": b"mine"}
    RunFolder.claim(tmp_path / "new" / "deep", "quantize", {"x": 1}, make_parents=True)  # a default folder may be made


def test_a_checkpoint_is_one_generation_whatever_was_killed(tmp_path):
    ck = Checkpoints(tmp_path)
    ck.save("p", {"step": 1}, tensors={"w": {"a": torch.ones(3)}}, objects={"opt": {"lr": 0.1}})
    ck.save("p", {"step": 2}, tensors={"w": {"a": torch.full((3,), 2.0)}}, objects={"opt": {"lr": 0.2}})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p-000002.opt.pt", "p-000002.w.safetensors", "p.json"]
    # a kill after the next generation's tensor part was written, before its manifest: the manifest still names gen 2
    run_files.save_tensors(tmp_path / "p-000003.w.safetensors", {"a": torch.full((3,), 3.0)})
    got = ck.load("p")
    assert got.info["step"] == 2 and torch.equal(got.tensors("w")["a"], torch.full((3,), 2.0)) and got.object("opt") == {"lr": 0.2}
    (tmp_path / "p-000002.w.safetensors").write_bytes(b"\x00" * 10)  # truncated or edited after the manifest
    with pytest.raises(CorruptFileError, match=r"p-000002\.w\.safetensors is missing or does not match p\.json .*--restart"):
        ck.load("p")
    (tmp_path / "p.json").write_text('{"step": 2, "checkp')
    with pytest.raises(CorruptFileError, match=r"p\.json cannot be read as a checkpoint manifest"):
        ck.load("p")


def test_restart_wipes_only_what_the_kind_writes(tmp_path):
    run = RunFolder.claim(tmp_path, "quantize", {"x": 1})
    run.checkpoints.save("progress", {"units_done": 1}, tensors={"state": {"a": torch.zeros(1)}})
    run.write_json("report.json", {"quant_top1": 1.0})
    (tmp_path / "my_notes.txt").write_text("keep")
    RunFolder.claim(tmp_path, "quantize", {"x": 2}, restart=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "my_notes.txt"]


def test_a_truncated_config_is_named_and_restart_recovers(tmp_path):
    RunFolder.claim(tmp_path, "quantize", {"x": 1})
    (tmp_path / "config.json").write_text('{"kind": "quan')
    with pytest.raises(CorruptFileError, match=r"config\.json cannot be read as a run config .*--restart"):
        RunFolder.claim(tmp_path, "quantize", {"x": 1})
    RunFolder.claim(tmp_path, "quantize", {"x": 1}, restart=True)


def test_atomic_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "f.json"
    run_files.write_json(path, {"v": 1})
    with pytest.raises(RuntimeError), run_files.atomic_path(path) as tmp:
        tmp.write_text('{"v": 2, "half')
        raise RuntimeError("killed mid-write")
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_an_output_file_is_never_written_over_a_file_it_did_not_write(tmp_path):
    run = RunFolder.claim(tmp_path / "run", "quantize", {"x": 1})
    run_files.save_tensors(run.file("quantized.safetensors"), {"a": torch.zeros(1)})
    ours, theirs = tmp_path / "ours.bin", tmp_path / "theirs.bin"
    ours.write_text("ours")
    theirs.write_text("theirs")

    def mine(p):
        return p.read_text() == "ours"
    assert check_output_file(ours, "--out", "cmd", mine) == ours
    with pytest.raises(ConfigError, match="exists and was not written by `cmd`; --force overwrites it"):
        check_output_file(theirs, "--out", "cmd", mine)
    assert check_output_file(theirs, "--out", "cmd", mine, force=True) == theirs
    with pytest.raises(ConfigError, match="is a file of the quantize run that `cmd` did not write; give another --out"):
        check_output_file(run.file("quantized.safetensors"), "--out", "cmd", mine, force=True, own_run=run)
    assert check_output_file(run.file("model.onnx"), "--out", "cmd", mine, own_run=run)
    other = RunFolder.claim(tmp_path / "other", "qat", {"x": 1})
    with pytest.raises(ConfigError, match="inside another job's run folder"):
        check_output_file(other.file("x.onnx"), "--out", "cmd", mine, force=True, own_run=run)
    with pytest.raises(ConfigError, match="is a folder; give a file name"):
        check_output_file(tmp_path, "--out", "cmd", mine)
    with pytest.raises(ConfigError, match="does not exist"):
        check_output_file(tmp_path / "no" / "x.onnx", "--out", "cmd", mine)


def test_restart_never_takes_over_a_folder_holding_the_users_files(tmp_path):
    (tmp_path / "holiday.png").write_bytes(b"mine")
    with pytest.raises(ConfigError, match=r"holds files no metaaug search job writes \(e\.g\. holiday\.png\)"):
        RunFolder.claim(tmp_path, "search", {"x": 1}, restart=True)
    assert [p.name for p in tmp_path.iterdir()] == ["holiday.png"]


def test_a_folder_of_only_this_kinds_files_is_taken_as_its_own(tmp_path):
    """A synth folder written before config.json existed, or a search folder given a trained MetaQuantNet to reuse."""
    (tmp_path / "images.safetensors").write_bytes(b"x")
    (tmp_path / "class_0.png").write_bytes(b"x")
    RunFolder.claim(tmp_path, "synth", {"x": 1})
    reuse = _with(tmp_path / "q", "metaquant.pt")
    with pytest.raises(ConfigError, match="holds files no metaaug quantize job writes"):
        RunFolder.check(reuse, "quantize", {})
    RunFolder.claim(reuse, "search", {"x": 1})


def _with(folder: Path, name: str) -> Path:
    folder.mkdir()
    (folder / name).write_bytes(b"x")
    return folder


def test_progress_written_before_checkpoint_manifests_still_resumes(tmp_path):
    """A run folder of the previous layout (progress.json + progress.safetensors + progress_method.pt) resumes."""
    from conftest import TinyNet, randomize_bn
    from metaaug import QuantSpec, quantize
    from metaaug.methods.metaaug import MetaAugConfig
    from metaaug.runs.store import RunStore
    from test_end_to_end import Interrupt, StopAfter, state_of

    torch.manual_seed(0)
    model, imgs = randomize_bn(TinyNet()), torch.randn(12, 1, 28, 28)
    cfg = MetaAugConfig(iters=4, meta_iters=2, meta_batch=4, lr_t=1e-2)
    full = quantize(model, imgs, cfg, QuantSpec(2, 2), seed=3, device="cpu")
    with pytest.raises(Interrupt):
        quantize(model, imgs, cfg, QuantSpec(2, 2), seed=3, device="cpu", store=RunStore(tmp_path, {"x": 1}), progress=StopAfter(2))
    manifest = json.loads((tmp_path / "progress.json").read_text())
    parts = manifest.pop("checkpoint")["parts"]
    (tmp_path / parts["state"]).rename(tmp_path / "progress.safetensors")
    (tmp_path / parts["method"]).rename(tmp_path / "progress_method.pt")
    (tmp_path / "progress.json").write_text(json.dumps(manifest))
    resumed = quantize(model, imgs, cfg, QuantSpec(2, 2), seed=3, device="cpu", store=RunStore(tmp_path, {"x": 1}))
    a, b = state_of(full), state_of(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "progress.safetensors").exists() and "checkpoint" in json.loads((tmp_path / "progress.json").read_text())
