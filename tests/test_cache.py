"""Reconstruction caches under a memory budget: spilled to disk they give the same bits as in memory, the budget
is honoured and reported, and a smaller storage dtype halves the memory."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from typer.testing import CliRunner

import metaaug
from metaaug.cli.app import app
from metaaug.errors import ConfigError
from metaaug.methods.configs import QDropConfig
from metaaug.methods.registry import JobContext
from metaaug.quant.prepare import QuantSpec, prepare
from metaaug.recon.cache import CacheSettings, StoredRows, parse_size, take_rows
from metaaug.recon.engine import Reconstructor

runner = CliRunner()


def test_sizes_parse_with_any_suffix():
    assert parse_size("2GB") == 2 << 30 and parse_size("512MB") == 512 << 20 and parse_size("800KB") == 800 << 10
    assert parse_size("1.5g") == int(1.5 * (1 << 30)) and parse_size("4096") == 4096
    for bad in ("lots", "-1GB", "0", "2 XB"):
        with pytest.raises(ConfigError, match="--cache-budget"):
            parse_size(bad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("on_disk", [False, True])
def test_stored_rows_read_back_what_was_written(tmp_path, dtype, on_disk):
    x = torch.randn(10, 3, 4, 5)
    rows = StoredRows(tuple(x.shape), dtype, torch.float32, torch.device("cpu"), tmp_path / "r.bin" if on_disk else None)
    rows.write(0, x[:6])
    rows.write(6, x[6:])
    expect = x.to(dtype).float()
    assert torch.equal(rows[2:7], expect[2:7]) and rows[2:7].dtype == torch.float32
    idx = torch.tensor([9, 0, 3, 3])
    assert torch.equal(rows[idx], expect[idx]) and torch.equal(rows.to("cpu"), expect)
    assert rows.nbytes == x.numel() * torch.empty((), dtype=dtype).element_size()
    assert torch.equal(take_rows(rows, idx), expect[idx]) and torch.equal(take_rows(x, idx), x[idx])


def _reconstruct(model, images, cache, dtype="float32"):
    qm = prepare(copy.deepcopy(model), QuantSpec(2, 4), "block")
    cfg = QDropConfig(iters=4, cache_dtype=dtype)
    engine = Reconstructor(qm, cfg, seed=0, cache=cache)
    stats = engine.run(images)
    return qm, engine.cache.summary(), stats


@pytest.fixture(scope="module")
def in_memory(resnet20, calib256):
    """The reference: a short QDrop run with every cache in memory at float32."""
    return _reconstruct(resnet20, calib256.images[:64], CacheSettings())


def test_spilled_caches_give_the_same_bits_as_in_memory(resnet20, calib256, tmp_path, in_memory):
    images = calib256.images[:64]
    mem, mem_summary, _ = in_memory
    disk, disk_summary, _ = _reconstruct(resnet20, images, CacheSettings(budget="1KB", spill_dir=str(tmp_path / "spill")))
    assert mem_summary["where"] == "memory" and mem_summary["spilled_tensors"] == 0
    assert disk_summary["where"] in ("disk", "memory+disk") and disk_summary["spilled_tensors"] > 0
    assert disk_summary["budget"] == "1.00 KB" and disk_summary["budget_source"] == "--cache-budget"
    for (k, a), b in zip(mem.state_dict().items(), disk.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert not any((tmp_path / "spill").iterdir())  # the spilled files are gone after the run


def test_the_budget_is_honoured(resnet20, calib256, in_memory):
    images = calib256.images[:64]
    _, full, _ = in_memory
    peak = parse_size(full["peak_memory"].replace(" ", ""))
    budget = peak // 2
    _, half, _ = _reconstruct(resnet20, images, CacheSettings(budget=budget))
    assert half["spilled_tensors"] > 0
    assert parse_size(half["peak_memory"].replace(" ", "")) <= budget * 1.01  # the summary rounds to 2 decimals


def test_bfloat16_storage_halves_the_cache(resnet20, calib256, in_memory):
    images = calib256.images[:64]
    _, fp32, _ = in_memory
    qm, bf16, _ = _reconstruct(resnet20, images, CacheSettings(), "bfloat16")
    assert bf16["dtype"] == "bfloat16"
    images_bytes = images.numel() * 4  # the calibration images themselves stay float32
    ratio = (parse_size(bf16["peak_memory"].replace(" ", "")) - images_bytes) / (
        parse_size(fp32["peak_memory"].replace(" ", "")) - images_bytes)
    assert 0.45 < ratio < 0.55
    assert torch.isfinite(qm(images[:4])).all()


def test_api_takes_cache_settings(tiny_net, calib256):
    qm = metaaug.quantize(tiny_net, calib256.images[:32], QDropConfig(iters=2), QuantSpec(4, 4),
                          cache=CacheSettings(budget="1KB"))
    assert torch.isfinite(qm(calib256.images[:2])).all()
    assert JobContext(calib256.images).cache is None


def test_cli_cache_budget_is_accepted_and_reported(tiny_data_dir, tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["quantize", "--method", "qdrop", "--iters", "2", "--calib-size", "32", "--data-dir",
                              str(tiny_data_dir), "--cache-budget", "2GB", "--out", str(out)])
    assert res.exit_code == 0, res.output
    cache = json.loads((out / "report.json").read_text())["cache"]
    assert cache["budget"] == "2.00 GB" and cache["where"] == "memory"
    res = runner.invoke(app, ["quantize", "--method", "qdrop", "--iters", "2", "--calib-size", "32", "--data-dir",
                              str(tiny_data_dir), "--cache-budget", "lots", "--out", str(tmp_path / "bad")])
    assert res.exit_code == 2 and "error: --cache-budget 'lots'" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "bad").exists()
