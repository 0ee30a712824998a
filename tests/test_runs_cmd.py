"""`metaaug runs`: run folders of every kind, finished, unfinished and damaged, listed side by side; the plot of
top-1 against weight memory or BOPs. The folders are written by hand with the fields the jobs write, except in the
last test, which runs a real (tiny) quantize job."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from metaaug.cli.app import app
from metaaug.cli.runs_cmd import PLOT_MARK

runner = CliRunner()
CONFIG_QUANTIZE = {"weights": None, "calib_size": 1024, "iters": 2000, "seed": 0, "data_dir": None, "fold_bn": True, "holdout": 0.0,
                   "units": None, "options": {}, "calib_source": "real", "synth": None, "mixed_synth": None}


def _write(folder: Path, name: str, data: Any) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _cost(kb: float, gbops: float, avg_wbits: float) -> dict[str, Any]:
    """A `policy_cost` dict as `model_cost` writes it (a few layers are enough for the reader)."""
    return {"weight_bits": int(kb * 8 * 1024), "weight_kb": kb, "bops": int(gbops * 1e9), "gbops": gbops, "avg_wbits": avg_wbits,
            "weight_vs_fp32": round(kb / 1060.164, 4), "weight_vs_w8a8": round(kb / 271.244, 4), "bops_vs_fp32": round(gbops / 31.7665, 6),
            "bops_vs_w8a8": round(gbops / 1.9854, 4), "fp32_weight_kb": 1060.164, "w8a8_weight_kb": 271.244, "fp32_gbops": 31.7665,
            "w8a8_gbops": 1.9854, "layers": [{"name": "conv1", "params": 144, "out_channels": 16, "bias": 16, "macs": 112896,
                                               "reads_image": True, "wbits": 8, "abits": None, "weight_bits": 2304, "bops": 7225344}]}


def quantize_run(folder: Path, method: str, wbits: int, abits: int, top1: float, kb: float, gbops: float,
                 policy: dict | None = None, resumed: int = 0, with_kind: bool = True) -> None:
    config = {**({"kind": "quantize"} if with_kind else {}), "model": "resnet20", "method": method, "wbits": wbits, "abits": abits,
              **CONFIG_QUANTIZE, "policy": policy, "method_config": {"iters": 2000}}
    _write(folder, "config.json", config)
    report = {"model": "resnet20", "method": method, "wbits": wbits, "abits": abits, "calib_size": 1024, "iters": 2000, "seed": 0,
              "method_config": {"iters": 2000}, "calib_source": "real", "synth": None, "mixed_synth": None, "calib_images": 1024,
              "fp_top1": 94.03, "quant_top1": top1, "calib_top1": top1 + 3, "cost": _cost(kb, gbops, 3.02 if policy else wbits + 0.02),
              "seconds": 321.4, "resumed_units": resumed, "recon_seconds": 300.1, "units": [], "unit_plan": [], "device": "cpu"}
    if policy is not None:
        report["policy"] = policy
    _write(folder, "report.json", report)


POLICY = {"layers": {"conv1": {"wbits": 8, "abits": 8}, "layer1.0.conv1": {"wbits": 2, "abits": 4}, "fc": {"wbits": 8, "abits": 8}}}
QAT_CONFIG = {"method": "mebqat", "bits": [2, 4, 8], "abits": None, "tasks": 3, "distill": 1.0, "epochs": 2, "steps": None, "batch": 128,
              "lr": 1e-4, "quant_lr": 5e-3, "weight_decay": 5e-5, "grad_clamp": 10.0, "share_quantizers": False, "inner_steps": 1,
              "inner_lr": 0.01, "calib_size": 1024, "classes": None, "eval_size": 2000, "save_every": 100}


def qat_run(folder: Path, widths: dict[str, float], unseen: dict[str, float] | None = None, bits: list[int] | None = None,
            abits: list[int] | None = None) -> None:
    qat = {**QAT_CONFIG, "bits": bits or QAT_CONFIG["bits"], "abits": abits}
    _write(folder, "config.json", {"kind": "qat", "model": "resnet20", "weights": None, "data_dir": None, "seed": 0, "qat": qat})
    _write(folder, "report.json", {
        "kind": "qat", "model": "resnet20", "method": "mebqat", "widths": list(widths), "fp_top1_before": 94.03,
        "top1": {"fp": 93.5, **widths}, "unseen_top1": unseen or {}, "test_images": 10000, "steps": 938,
        "batchnorm": "running statistics re-estimated per width on 1024 train images", "train_seconds": 1800.2, "seconds": 1850.7,
        "history": [], "config": qat, "command": "metaaug qat", "plot": "accuracy.png"})


def search_run(folder: Path) -> None:
    _write(folder, "config.json", {"kind": "search", "model": "resnet20", "weights": None, "wbits_choices": [2, 3, 4, 8], "abits_choices": None,
                                   "abits": 4, "budget_kind": "avg_wbits", "budget": 3.0, "calib_size": 1024, "holdout": 0.2, "seed": 0,
                                   "data_dir": None, "proxy": "metaquant", "meta_images": 0, "fitness": "kl", "strategy": "ga",
                                   "evaluations": None, "meta": {"steps": 1000}, "ga": {"population": 50, "generations": 20}})
    best = {"genome": [3, 2, 4, 3], "fitness": -0.12, "kl": 0.12, "top1": 87.5, "generation": 17, "cost": _cost(82.5, 0.41, 2.98)}
    _write(folder, "search.json", {
        "best": best, "budget": {"kind": "avg_wbits", "limit": 3.0, "spec": 3.0},
        "uniform": {"W2A4": {"genome": [2, 2, 2, 2], "fitness": -0.5, "kl": 0.5, "top1": 70.1, "cost": _cost(73.6, 0.25, 2.02), "fits_budget": True}},
        "candidates": [], "history": [], "meta_curve": [], "strategy": "ga", "evaluated": 600, "genes": {"wbits": [], "abits": []},
        "seconds": {"metaquant": 400.0, "search": 150.3, "total": 560.9, "metaquant_reused": False}, "calib_images": 820,
        "holdout_images": 204, "metaquant_images": 820, "plots": ["pareto.png", "generations.png"]})
    _write(folder, "policy.json", POLICY)


def synth_run(folder: Path) -> None:
    _write(folder, "config.json", {"kind": "synth", "model": "resnet20", "weights": None, "data_dir": None, "fdda": {"per_class": 10}})
    _write(folder, "report.json", {"method": "fdda", "classes": [str(i) for i in range(10)], "images": 100, "per_class": 10,
                                   "fp_accuracy": 97.0, "seconds": 52.3, "model": "resnet20", "weights": None, "data_dir": None,
                                   "files": ["images.safetensors", "report.json"]})


def in_progress_run(folder: Path) -> None:
    _write(folder, "config.json", {"kind": "quantize", "model": "resnet20", "method": "brecq", "wbits": 3, "abits": 3, **CONFIG_QUANTIZE,
                                   "policy": None})
    _write(folder, "progress.json", {"units_done": 3, "units": [], "elapsed": 41.5, "checkpoint": {
        "generation": 3, "parts": {"state": "progress-000003.state.safetensors"}, "sha256": {"progress-000003.state.safetensors": "0" * 64}}})


@pytest.fixture
def runs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `runs/` folder with one run of each kind, relative to the working directory as users type it."""
    monkeypatch.chdir(tmp_path)
    runs = Path("runs")
    quantize_run(runs / "q-qdrop-w2a4", "qdrop", 2, 4, 85.41, 73.6, 0.2545)
    quantize_run(runs / "q-rtn-w4a4", "rtn", 4, 4, 90.12, 136.4, 0.5091, resumed=2, with_kind=False)  # stored before kinds
    quantize_run(runs / "q-qdrop-policy", "qdrop", 2, 4, 88.03, 84.2, 0.33, policy=POLICY)
    qat_run(runs / "qat", {"w2a2": 80.5, "w4a4": 91.2, "w8a8": 93.4}, unseen={"w5a5": 92.0, "w6a6": 92.8})
    search_run(runs / "search")
    synth_run(runs / "synth")
    in_progress_run(runs / "unfinished")
    return runs


def table(output: str) -> dict[str, list[list[str]]]:
    """Table rows by folder: the cells of each line that starts with a folder name."""
    rows: dict[str, list[list[str]]] = {}
    for line in output.splitlines():
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if len(cells) == 10 and cells[0] and cells[0] != "folder":
            rows.setdefault(cells[0], []).append(cells)
    return rows


def run_cmd(args: list[str], code: int = 0):
    res = runner.invoke(app, ["runs", *args])
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    return res


def test_table_lists_each_run(runs_dir: Path) -> None:
    rows = table(run_cmd([str(runs_dir)]).stdout)
    assert set(rows) == {f"runs/{n}" for n in ("q-qdrop-w2a4", "q-rtn-w4a4", "q-qdrop-policy", "qat", "search", "synth", "unfinished")}
    _, kind, model, method, top1, kb, gbops, seconds, resumed, note = rows["runs/q-qdrop-w2a4"][0]
    assert (kind, model, method, top1, kb, gbops, seconds, resumed, note) == \
        ("quantize", "resnet20", "qdrop W2A4", "85.41", "73.6", "0.2545", "321.4", "no", "")
    assert rows["runs/q-rtn-w4a4"][0][1:9] == ["quantize", "resnet20", "rtn W4A4", "90.12", "136.4", "0.5091", "321.4", "yes"]
    assert rows["runs/q-qdrop-policy"][0][3:6] == ["qdrop policy", "88.03", "84.2"]
    search = rows["runs/search"][0]
    assert search[1:7] == ["search", "resnet20", "metaquant-ga policy", "87.50*", "82.5", "0.41"]
    assert "held-out" in search[9] and search[7] == "560.9"
    synth = rows["runs/synth"][0]
    assert synth[1:5] == ["synth", "resnet20", "fdda", "-"] and "100 synthetic images" in synth[9]


def test_qat_gives_one_row_per_width(runs_dir: Path) -> None:
    rows = table(run_cmd([str(runs_dir / "qat")]).stdout)["runs/qat"]
    assert [r[3] for r in rows] == ["mebqat w2a2", "mebqat w4a4", "mebqat w8a8", "mebqat w5a5", "mebqat w6a6"]
    assert [r[4] for r in rows] == ["80.50", "91.20", "93.40", "92.00", "92.80"]
    assert all(r[1] == "qat" for r in rows) and "unseen" in rows[3][9]
    kb = [float(r[5]) for r in rows[:3]]  # the cost model's figure for each uniform width: more bits, more memory
    assert kb[0] < kb[1] < kb[2]
    gbops = [float(r[6]) for r in rows[:3]]
    assert gbops[0] < gbops[1] < gbops[2]


def test_unfinished_run_is_in_progress(runs_dir: Path) -> None:
    row = table(run_cmd([str(runs_dir)]).stdout)["runs/unfinished"][0]
    assert row[1:5] == ["quantize", "resnet20", "brecq W3A3", "-"]
    assert row[9] == "in progress: 3 units done"


def test_unfinished_qat_and_search_say_how_far(runs_dir: Path) -> None:
    qat, search = runs_dir / "qat", runs_dir / "search"
    (qat / "report.json").unlink()
    _write(qat, "qat_progress.json", {"step": 300, "seconds": 250.0, "history": [{"epoch": 1, "step": 469, "seconds": 200.0, "top1": {}}],
                                      "checkpoint": {"generation": 3, "parts": {}, "sha256": {}}})
    (search / "search.json").unlink()
    _write(search, "search_state.json", {"generation": 5, "population": [], "scores": {}, "history": [], "rng_state": None, "seconds": 80.0})
    rows = table(run_cmd([str(runs_dir)]).stdout)
    assert [r[3] for r in rows["runs/qat"]] == ["mebqat bits 2,4,8"]
    assert rows["runs/qat"][0][9] == "in progress: step 300, 1/2 epochs done"
    assert rows["runs/search"][0][9] == "in progress: generation 5/20"


def test_qat_cost_unknown_when_its_model_cannot_be_built(runs_dir: Path) -> None:
    config = json.loads((runs_dir / "qat" / "config.json").read_text())
    _write(runs_dir / "qat", "config.json", {**config, "model": "gone/net.py:make", "weights": "gone/net.safetensors"})
    res = run_cmd([str(runs_dir), "--plot", "front.png"])
    rows = table(res.stdout)["runs/qat"]
    assert [r[4:7] for r in rows[:1]] == [["80.50", "-", "-"]]
    assert "plot: front.png (4 points)" in res.stdout  # the QAT widths stay out of the plot


def test_corrupt_report_is_one_row(runs_dir: Path) -> None:
    report = runs_dir / "q-qdrop-w2a4" / "report.json"
    report.write_text(report.read_text()[:80], encoding="utf-8")  # a kill mid-write from an older version
    (runs_dir / "search" / "search.json").write_text(json.dumps({"best": {"top1": "high"}}), encoding="utf-8")  # edited by hand
    res = run_cmd([str(runs_dir)])
    rows = table(res.stdout)
    assert rows["runs/q-qdrop-w2a4"][0][9] == "corrupt: report.json"
    assert rows["runs/search"][0][9] == "corrupt: search.json"
    assert rows["runs/q-rtn-w4a4"][0][4] == "90.12" and len(rows["runs/qat"]) == 5
    (runs_dir / "synth" / "config.json").write_bytes(b"\x00\xff")
    assert table(run_cmd([str(runs_dir)]).stdout)["runs/synth"][0][9] == "corrupt: config.json"


@pytest.mark.parametrize("make", ["missing", "empty", "file"])
def test_not_a_run_folder_is_one_line(tmp_path: Path, make: str) -> None:
    target = tmp_path / "nowhere"
    if make == "empty":
        (target / "sub").mkdir(parents=True)
    elif make == "file":
        target.write_text("x")
    res = run_cmd([str(target)], code=2)
    lines = [line for line in res.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and str(target.name) in lines[0], res.output


def _png_text(path: Path) -> dict[str, str]:
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size[0] > 400
        return dict(im.text)


def test_plot_writes_a_png_and_guards_foreign_files(runs_dir: Path) -> None:
    res = run_cmd([str(runs_dir), "--plot", "front.png"])
    assert "plot: front.png (9 points)" in res.stdout  # 3 quantize runs, 1 search, 5 QAT widths; no synth, no unfinished run
    assert _png_text(Path("front.png"))["Software"] == PLOT_MARK
    run_cmd([str(runs_dir), "--plot", "front.png", "--x", "bops"])  # its own file: replaced without --force
    Image.new("RGB", (4, 4)).save("photo.png")
    before = Path("photo.png").read_bytes()
    res = run_cmd([str(runs_dir), "--plot", "photo.png"], code=2)
    assert "--force" in res.output and len(res.output.strip().splitlines()) == 1
    assert Path("photo.png").read_bytes() == before
    run_cmd([str(runs_dir), "--plot", "photo.png", "--force"])
    assert _png_text(Path("photo.png"))["Software"] == PLOT_MARK
    for bad, message in [("missing/front.png", "does not exist"), ("front.txt", ".png"), ("runs/qat/front.png", "run folder")]:
        res = run_cmd([str(runs_dir), "--plot", bad], code=2)
        assert message in res.output and len(res.output.strip().splitlines()) == 1, res.output
    res = run_cmd([str(runs_dir), "--x", "area"], code=2)
    assert "--x" in res.output


def test_real_quantize_run(tmp_path: Path, small_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real rtn run is listed with its report's top-1; a QAT width at the same bits costs what the run measured."""
    monkeypatch.chdir(tmp_path)
    res = runner.invoke(app, ["quantize", "--method", "rtn", "--calib-size", "16", "--iters", "0", "--data-dir", str(small_data),
                              "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    qat_run(tmp_path / "qat", {"w2a4": 70.0}, bits=[2], abits=[4])
    rows = table(run_cmd(["r", "qat"]).stdout)
    row = rows["r"][0]
    assert row[1:4] == ["quantize", "resnet20", "rtn W2A4"]
    assert float(row[4]) == report["quant_top1"]
    assert float(row[5]) == round(report["cost"]["weight_kb"], 1)
    qat = rows["qat"][0]
    assert qat[3] == "mebqat w2a4" and qat[5:7] == row[5:7]  # the cost model's figure for uniform W2A4, as the run measured
