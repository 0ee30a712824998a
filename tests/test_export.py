"""Deployable export: bit-packing, the packed format without the FP checkpoint, QDQ ONNX checked in onnxruntime."""

from __future__ import annotations

import builtins
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import metaaug
from metaaug.cli.app import app
from metaaug.data import load_dataset
from metaaug.data.datasets import ImageDataset
from metaaug.evaluate import logits_of, top1
from metaaug.export.pack import load_quantized, pack_bits, packed_size, read_metadata, unpack_bits
from metaaug.pipeline import RunConfig, run_job


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("count", [1, 7, 13, 1001])
def test_pack_unpack_bit_exact(bits: int, signed: bool, count: int) -> None:
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    g = torch.Generator().manual_seed(bits * 100 + count)
    values = torch.randint(lo, hi + 1, (count,), generator=g)
    values[0] = lo if count > 1 else hi
    packed = pack_bits(values, bits, signed)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_size(count, bits)
    out = unpack_bits(packed, bits, count, signed)
    assert out.dtype == (torch.int8 if signed else torch.uint8)
    assert torch.equal(out.long(), values)


def test_pack_odd_channel_shape_and_layout() -> None:
    w = torch.randint(0, 8, (5, 3, 3, 3))  # 135 values at 3 bits: the stream does not end on a byte
    assert torch.equal(unpack_bits(pack_bits(w, 3), 3, w.numel()).view(w.shape).long(), w)
    # low nibble first, as ONNX stores int4 pairs
    assert pack_bits(torch.tensor([1, 15, 2]), 4).tolist() == [0xF1, 0x02]


def test_pack_rejects_out_of_range() -> None:
    with pytest.raises(ValueError, match="range"):
        pack_bits(torch.tensor([0, 4]), 2)
    with pytest.raises(ValueError, match="range"):
        pack_bits(torch.tensor([-3]), 2, signed=True)


@pytest.fixture(scope="module")
def rtn_run(tmp_path_factory: pytest.TempPathFactory, small_data: Path) -> Path:
    """A short RTN W4A4 resnet20 run folder (as `metaaug quantize --method rtn --iters 0 --calib-size 64`)."""
    out = tmp_path_factory.mktemp("rtn_run")
    run_job(RunConfig(method="rtn", wbits=4, abits=4, calib_size=64, iters=0, data_dir=str(small_data)), out, device="cpu")
    return out


def test_load_quantized_reproduces_run_without_fp_checkpoint(rtn_run: Path, tmp_path: Path, monkeypatch) -> None:
    from metaaug.export.jobs import export_packed_run

    res = export_packed_run(rtn_run, tmp_path / "m.mq.safetensors", limit=200)
    assert res["packed_max_abs_logit_diff"] == 0.0
    assert res["compression_vs_checkpoint"] > 7 and res["compression_weights"] > 7.5
    meta = read_metadata(tmp_path / "m.mq.safetensors")
    assert meta["model"] == "resnet20" and meta["method"] == "rtn" and meta["fold_bn"] is True
    assert set(meta["bits"].values()) == {4, 8}

    def no_checkpoint(*args, **kwargs):
        raise AssertionError("load_quantized must not read the FP checkpoint")

    monkeypatch.setattr("metaaug.models.registry.load_weights", no_checkpoint)
    monkeypatch.setattr("metaaug.models.registry.read_state_dict", no_checkpoint)
    qmodel = metaaug.load_quantized(tmp_path / "m.mq.safetensors")
    report = json.loads((rtn_run / "report.json").read_text())
    test = load_dataset(meta["extra"]["data_dir"], "test")
    assert len(test) == 1000
    assert round(top1(qmodel, test), 2) == report["quant_top1"]


def test_eval_quantized_cli(rtn_run: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["export", "--run", str(rtn_run), "--format", "packed", "--out", str(tmp_path / "m.mq.safetensors"),
                              "--limit", "100"])
    assert res.exit_code == 0, res.output
    assert "smaller than the FP checkpoint" in res.output
    res = runner.invoke(app, ["eval", "--quantized", str(tmp_path / "m.mq.safetensors"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output.strip().splitlines()[-1])["reproduced"] is True
    res = runner.invoke(app, ["eval"])
    assert res.exit_code == 2 and "exactly one of --run or --quantized" in res.output


def test_onnx_export_matches_torch_cli(rtn_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    res = CliRunner().invoke(app, ["export", "--run", str(rtn_run), "--format", "onnx", "--out", str(out), "--limit", "300"])
    assert res.exit_code == 0, res.output
    record = json.loads((rtn_run / "export.json").read_text())
    for key in ("onnx_top1", "torch_top1", "max_abs_logit_diff"):
        assert key in record
    assert abs(record["onnx_top1"] - record["torch_top1"]) <= 0.1
    assert record["max_abs_logit_diff"] < 0.5

    import onnx

    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Gemm"} <= ops


@pytest.mark.parametrize("act_int4", [True, False])
def test_onnx_sub8bit_signed_acts_exact(act_int4: bool, calib256: ImageDataset, fmnist_test_small: ImageDataset, tmp_path: Path) -> None:
    """MobileNetV2 at W3A3: 3-bit weights in uint4 initializers, signed and unsigned 3-bit activations via Clip + QDQ."""
    pytest.importorskip("onnxruntime")
    from metaaug.export.onnx_export import export_onnx, onnx_logits
    from metaaug.models.registry import build_model

    torch.manual_seed(0)
    qmodel = metaaug.quantize(build_model("mobilenetv2"), calib256.images[:64], "rtn", metaaug.QuantSpec(3, 3), device="cpu")
    assert any(bool(aq.signed) for aq in qmodel.act_quantizers())
    x = fmnist_test_small.images[:200]
    export_onnx(qmodel, tmp_path / "m.onnx", x[:1], act_int4=act_int4)
    ref, got = logits_of(qmodel, x), onnx_logits(tmp_path / "m.onnx", x)
    # only rounding ties flipped by a different float summation order may differ
    close = (got - ref).abs().amax(1) < 1e-3
    assert close.float().mean() > 0.97
    assert (got.argmax(1) == ref.argmax(1)).float().mean() > 0.98


def test_onnx_missing_gives_install_hint(rtn_run: Path, tmp_path: Path, monkeypatch) -> None:
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.split(".")[0] in ("onnx", "onnxruntime"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    res = CliRunner().invoke(app, ["export", "--run", str(rtn_run), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    assert res.exit_code == 2
    assert "pip install 'metaaug[onnx]'" in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "m.onnx").exists()


def test_export_rejects_unknown_format(rtn_run: Path) -> None:
    res = CliRunner().invoke(app, ["export", "--run", str(rtn_run), "--format", "tflite"])
    assert res.exit_code == 2 and "unknown export format" in res.output


def test_packed_file_is_checked(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(metaaug.ModelError, match="not a metaaug packed model"):
        load_quantized(tmp_path / "plain.safetensors")
    with pytest.raises(metaaug.ConfigError, match="does not exist"):
        load_quantized(tmp_path / "missing.safetensors")

