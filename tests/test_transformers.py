"""Vision transformers and modern blocks: capture (fx and torch.export), LayerNorm, decomposed attention, quantized
activation-activation matmuls, units from the residual adds, the output rule, and every reconstruction method."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import fx, nn
from typer.testing import CliRunner

import metaaug
from metaaug.errors import ModelError
from metaaug.methods.registry import method_config
from metaaug.quant.attention import DecomposedMHA, sdpa_math
from metaaug.quant.capture import output_logits
from metaaug.quant.graph_ops import MATMULS, _target_in, data_nodes
from metaaug.quant.layers import QuantMatmul
from metaaug.quant.prepare import QuantSpec, prepare
from transformer_models import MODELS, MHANet, SDPANet, hf_convnext, hf_deit, hf_vit, small_vit

runner = CliRunner()


def images(n: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[name]().eval()


def unquantized_matmuls(qmodel) -> list[str]:
    """Matmuls between two activations left in any unit's graph (each should have become a QuantMatmul)."""
    left = []
    for unit in qmodel.units():
        act = data_nodes(unit.graph.nodes)
        for node in unit.graph.nodes:
            if _target_in(node, MATMULS) and all(isinstance(a, fx.Node) and a in act for a in node.args[:2]):
                left.append(node.name)
    return left


@pytest.mark.parametrize("name", sorted(MODELS))
def test_prepare_keeps_fp_and_quantizes_every_activation_matmul(name):
    net, x = build(name), images(8)
    qm = prepare(net, QuantSpec(4, 4))
    with torch.no_grad():
        assert torch.allclose(qm(x), output_logits(net(x)), atol=1e-5)  # quantization off: the same function
    assert unquantized_matmuls(qm) == []
    mms = list(qm.matmuls())
    if name != "convnext":
        assert {m.role for m in mms} == {"qk", "av"} and len(mms) == 4
        assert all(m.qa.bits == 4 and m.qb.bits == 4 for m in mms)


def test_vit_blocks_are_units_found_from_the_residual_adds():
    qm = prepare(small_vit().eval(), QuantSpec(4, 4))
    plan = [(p.name, p.found, len(p.layers)) for p in qm.unit_plans]
    assert plan == [("patch_embed", "layer", 1), ("blocks.0", "residual", 4), ("blocks.1", "residual", 4), ("head", "layer", 1)]
    assert [m.path for m in qm.matmuls()][:2] == ["blocks.0.attn.qk_matmul", "blocks.0.attn.av_matmul"]
    mha = prepare(build("mha"), QuantSpec(4, 4))
    assert [p.name for p in mha.unit_plans if p.found == "residual"] == ["blocks.0", "blocks.1"]


@pytest.mark.parametrize("name", sorted(MODELS))
def test_w8a8_rtn_is_close_to_fp_and_w4a4_further(name):
    """Quantizers sit in the right places with the right scales: 8 bits barely move the logits, 4 bits move them more."""
    net, x = build(name), images(64)
    with torch.no_grad():
        ref = output_logits(net(x))
        err8 = float((metaaug.quantize(net, x, "rtn", QuantSpec(8, 8, softmax_grid="uniform"))(x) - ref).norm() / ref.norm())
        err4 = float((metaaug.quantize(net, x, "rtn", QuantSpec(4, 4))(x) - ref).norm() / ref.norm())
    assert err8 < 0.05, err8
    assert err4 > 2 * err8


@pytest.mark.parametrize("method", ["adaround", "brecq", "qdrop", "metaaug"])
@pytest.mark.parametrize("name", ["vit", "mha", "sdpa", "convnext"])
def test_every_method_runs_on_transformer_blocks(name, method):
    if method in ("adaround", "metaaug") and name in ("mha", "convnext"):
        pytest.skip("one model per layout is enough for these two methods")
    net, x = build(name), images(32)
    cfg = method_config(method)
    over = {k: v for k, v in {"iters": 4, "meta_iters": 1, "batch_size": 8}.items() if hasattr(cfg, k)}
    qm = metaaug.quantize(net, x, dataclasses.replace(cfg, **over), QuantSpec(4, 4))
    with torch.no_grad():
        out = qm(x)
    assert torch.isfinite(out).all() and not torch.allclose(out, output_logits(net(x)), atol=1e-4)
    assert all(bool(aq.initialized) for aq in qm.act_quantizers())  # every quantizer (matmul inputs too) was calibrated


def test_decomposed_mha_matches_torch():
    torch.manual_seed(0)
    for batch_first in (True, False):
        mha = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
        dec = DecomposedMHA(mha).eval()
        q = torch.randn(3, 5, 16)
        kv = torch.randn(3, 7, 16)
        pad = torch.zeros(3 if batch_first else 5, 7, dtype=torch.bool)
        pad[:, -2:] = True
        if not batch_first:
            q, kv, pad = q.transpose(0, 1), kv.transpose(0, 1), torch.zeros(5, 7, dtype=torch.bool)
            pad = pad[:3]
        mask = torch.randn(5, 7)
        for kwargs in ({}, {"key_padding_mask": pad}, {"attn_mask": mask}, {"average_attn_weights": False}):
            want, wgt = mha(q, kv, kv, **kwargs)
            got, ggt = dec(q, kv, kv, **kwargs)
            assert torch.allclose(got, want, atol=1e-5), kwargs
            assert torch.allclose(ggt, wgt, atol=1e-5), kwargs


def test_sdpa_math_matches_torch():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    bool_mask = torch.rand(5, 6) > 0.3
    bool_mask[:, 0] = True
    for kwargs in ({}, {"attn_mask": torch.randn(5, 6)}, {"attn_mask": bool_mask}, {"scale": 0.2}):
        assert torch.allclose(sdpa_math(q, k, v, **kwargs), F.scaled_dot_product_attention(q, k, v, **kwargs), atol=1e-5), kwargs
    qs = torch.randn(2, 3, 6, 8)
    assert torch.allclose(sdpa_math(qs, k, v, is_causal=True), F.scaled_dot_product_attention(qs, k, v, is_causal=True), atol=1e-5)


@pytest.mark.parametrize("output", ["dict", "tuple"])
def test_dict_and_tuple_outputs_give_their_logits(output):
    torch.manual_seed(0)
    net, x = SDPANet(output=output).eval(), images(8)
    logits = net(x)["logits"] if output == "dict" else net(x)[0]
    qm = metaaug.quantize(net, x, dataclasses.replace(method_config("qdrop"), iters=2), QuantSpec(8, 8))
    with torch.no_grad():
        assert qm(x).shape == logits.shape
        assert torch.allclose(prepare(net, QuantSpec(4, 4))(x), logits, atol=1e-5)


def test_an_output_without_logits_is_one_line():
    with pytest.raises(ModelError, match=r"returned str; the model's forward must return a logits tensor") as err:
        prepare(SDPANet(output="string").eval(), QuantSpec(4, 4))
    assert "\n" not in str(err.value)


def test_untraceable_model_needs_an_example_and_says_so():
    class Gate(nn.Module):  # data-dependent control flow: fx refuses, torch.export (with the example) cannot either
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(784, 10)

        def forward(self, x):
            return self.fc(x.flatten(1)) if x.sum() > 0 else -self.fc(x.flatten(1))

    with pytest.raises(ModelError, match="pass example="):
        prepare(Gate(), QuantSpec(4, 4))
    with pytest.raises(ModelError, match="nor by torch"):
        prepare(Gate(), QuantSpec(4, 4), example=images(2))


def test_cost_counts_attention_matmul_bops():
    qm = prepare(small_vit().eval(), QuantSpec(4, 4))
    from metaaug.quant.cost import model_cost

    cost = model_cost(qm, images(2))
    mms = cost["matmuls"]
    assert [m["name"] for m in mms][:2] == ["blocks.0.attn.qk_matmul", "blocks.0.attn.av_matmul"]
    # QK^T: heads x tokens x tokens x head_dim MACs per image = 2 x 50 x 50 x 16
    assert mms[0]["macs"] == 2 * 50 * 50 * 16 and mms[0]["bops"] == mms[0]["macs"] * 16
    assert cost["bops"] == sum(r["bops"] for r in cost["layers"]) + sum(m["bops"] for m in mms)


# ---- Hugging Face transformers (optional extra: metaaug[hf]) ----------------------------------------------------

HF = {"vit": hf_vit, "deit": hf_deit, "convnext": hf_convnext}


@pytest.mark.parametrize("name", sorted(HF))
def test_hugging_face_models_quantize_through_the_api(name):
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    net, x = HF[name](), images(32)
    ref = net(x).logits
    qm = prepare(net, QuantSpec(4, 4), example=x)  # fx cannot trace these: torch.export captures them
    with torch.no_grad():
        assert torch.allclose(qm(x), ref, atol=1e-5)
    assert unquantized_matmuls(qm) == []
    if name != "convnext":
        assert [p.found for p in qm.unit_plans] == ["layer", "residual", "residual", "layer"]
        assert len(list(qm.matmuls())) == 4
    q = metaaug.quantize(net, x, dataclasses.replace(method_config("qdrop"), iters=3, batch_size=8), QuantSpec(4, 4))
    with torch.no_grad():
        out = q(x)
    assert torch.isfinite(out).all() and out.shape == ref.shape


def test_hugging_face_vit_through_the_cli(tmp_path, tiny_data_dir):
    pytest.importorskip("transformers")
    factory = tmp_path / "hf_model.py"
    factory.write_text(f"import sys\nsys.path.insert(0, {str(_tests_dir())!r})\nfrom transformer_models import hf_vit\n")
    torch.manual_seed(0)
    save_file(hf_vit().state_dict(), str(tmp_path / "w.safetensors"))
    out = tmp_path / "run"
    from metaaug.cli.app import app

    res = runner.invoke(app, ["quantize", "--model", f"{factory}:hf_vit", "--weights", str(tmp_path / "w.safetensors"), "--method", "qdrop",
                              "--wbits", "4", "--abits", "4", "--calib-size", "32", "--iters", "2", "--data-dir", str(tiny_data_dir),
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert [m["role"] for m in report["cost"]["matmuls"]] == ["qk", "av", "qk", "av"]
    assert [p["found"] for p in report["unit_plan"]] == ["layer", "residual", "residual", "layer"]
    res = runner.invoke(app, ["eval", "--run", str(out), "--data-dir", str(tiny_data_dir)])
    assert res.exit_code == 0, res.output


def _tests_dir():
    from pathlib import Path

    return Path(__file__).parent


def test_quant_matmul_is_a_module_with_two_quantizers():
    qm = prepare(MHANet().eval(), QuantSpec(4, 4))
    mm = next(qm.matmuls())
    assert isinstance(mm, QuantMatmul) and mm.qa.consumers == [mm.path] == mm.qb.consumers


@pytest.fixture
def small_vit_files(tmp_path):
    """`--model file.py:factory` and `--weights` for the small ViT."""
    factory = tmp_path / "vit_model.py"
    factory.write_text(f"import sys\nsys.path.insert(0, {str(_tests_dir())!r})\nfrom transformer_models import small_vit\n")
    torch.manual_seed(0)
    save_file(small_vit().state_dict(), str(tmp_path / "vit.safetensors"))
    return f"{factory}:small_vit", str(tmp_path / "vit.safetensors")


def test_fdda_on_a_model_without_batchnorm_is_one_line(small_vit_files, tmp_path, tiny_data_dir):
    from metaaug.cli.app import app

    model, weights = small_vit_files
    res = runner.invoke(app, ["synth", "--model", model, "--weights", weights, "--out", str(tmp_path / "s"), "--steps", "1",
                              "--per-class", "1", "--data-dir", str(tiny_data_dir)])
    text = " ".join(res.output.split())
    assert res.exit_code == 2 and "Traceback" not in res.output and text.count("error:") == 1, res.output
    assert "has no BatchNorm layers: FDDA needs" in text
    assert not (tmp_path / "s").exists()


def test_layernorm_reparam_is_exact_in_fp_and_evens_the_channels():
    torch.manual_seed(0)
    net, x = small_vit().eval(), images(64)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight[:3] *= 30.0  # a few outlier channels, as trained ViTs have
    ref = net(x)

    def spread(qm):
        """max/min of the per-channel ranges of the tensor the first qkv layer reads."""
        seen = {}
        layer = next(q for q in qm.quant_layers() if q.path.endswith("attn.qkv"))
        h = layer.register_forward_pre_hook(lambda _m, args: seen.setdefault("x", args[0]))
        with torch.no_grad():
            out = qm(x)
        h.remove()
        r = seen["x"].abs().flatten(0, -2).amax(0)
        return out, float(r.max() / r.min())

    plain, plain_spread = spread(prepare(net, QuantSpec(4, 8)))
    evened, evened_spread = spread(prepare(net, QuantSpec(4, 8, ln_reparam=True), example=x))
    assert torch.allclose(plain, ref, atol=1e-5) and torch.allclose(evened, ref, atol=1e-4)  # the same function in FP
    assert evened_spread < 0.6 * plain_spread  # alpha = 0.5: the square root of the spread is left, at most
    with pytest.raises(Exception, match="ln_reparam measures LayerNorm outputs"):
        prepare(net, QuantSpec(4, 8, ln_reparam=True))


def test_mebqat_trains_a_vit_and_search_searches_one(small_vit_files, tmp_path, tiny_data_dir):
    """`metaaug qat` (MEBQAT) and `metaaug search` run on a ViT through the CLI; attention matmuls keep their
    quantizers in every width and their BOPs count in the search's cost."""
    from metaaug.cli.app import app

    model, weights = small_vit_files
    res = runner.invoke(app, ["qat", "--model", model, "--weights", weights, "--steps", "2", "--batch", "8", "--bits", "4,8",
                              "--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "qat")])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["eval", "--run", str(tmp_path / "qat"), "--bits", "4", "--data-dir", str(tiny_data_dir)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["search", "--model", model, "--weights", weights, "--avg-wbits", "3", "--wbits-choices", "2,4",
                              "--meta-steps", "2", "--generations", "1", "--population", "4", "--calib-size", "32",
                              "--data-dir", str(tiny_data_dir), "--out", str(tmp_path / "search")])
    assert res.exit_code == 0, res.output
    policy = json.loads((tmp_path / "search" / "policy.json").read_text())
    assert "blocks.0.attn.qkv" in json.dumps(policy) and "qk_matmul" not in json.dumps(policy)  # matmuls are not genes
    assert (tmp_path / "search" / "search.json").is_file()


class SharedPos(nn.Module):
    """A position embedding added in every block: one parameter read by several units."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 7, 7)
        self.pos = nn.Parameter(torch.randn(1, 16, 16) * 0.1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(16), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 16)) for _ in range(2))
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)
        for b in self.blocks:
            x = x + b(x + self.pos)
        return self.head(x.mean(1))


def test_a_parameter_read_in_several_units_saves_and_loads_once(tmp_path):
    from safetensors.torch import load_file

    torch.manual_seed(0)
    net, x = SharedPos().eval(), images(16)
    qm = metaaug.quantize(net, x, dataclasses.replace(method_config("qdrop"), iters=2), QuantSpec(4, 4))
    copies = [n for n, m in qm.named_modules(remove_duplicate=False) if n.endswith("param_pos")]
    assert len(copies) == 2  # the parameter sits in both block units
    state = qm.state_dict()
    assert sum(k.endswith("param_pos.value") for k in state) == 1
    save_file(state, str(tmp_path / "q.safetensors"))  # refuses tensors that share memory
    fresh = prepare(net, QuantSpec(4, 4))
    with torch.no_grad():
        for m in fresh.modules():
            if hasattr(m, "value") and m.value is not None:
                m.value.zero_()
    fresh.load_state_dict(load_file(str(tmp_path / "q.safetensors")), strict=False)
    assert all(torch.equal(m.value, net.pos) for m in fresh.modules() if type(m).__name__ == "ParamRef")


class TorchEncoder(nn.Module):
    """`nn.TransformerEncoder` (its eval fast path and control flow: torch.export captures it)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = PatchEmbed()
        layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.stem(x)).mean(1))


class PatchEmbed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, 16, 7, 7)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def test_torch_transformer_encoder_is_captured_and_its_attention_quantized():
    torch.manual_seed(0)
    net, x = TorchEncoder().eval(), images(8)
    qm = prepare(net, QuantSpec(4, 4), example=x)
    with torch.no_grad():
        assert torch.allclose(qm(x), net(x), atol=1e-5)
    assert len(list(qm.matmuls())) == 4 and unquantized_matmuls(qm) == []


def test_sdpa_masks_broadcast_as_torch_does():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    per_head = torch.randn(3, 5, 6)  # (H, L, S): broadcast over the batch, not reshaped
    assert torch.allclose(sdpa_math(q, k, v, attn_mask=per_head), F.scaled_dot_product_attention(q, k, v, attn_mask=per_head), atol=1e-5)
    q3, k3, v3, m3 = torch.randn(2, 5, 8), torch.randn(2, 6, 8), torch.randn(2, 6, 8), torch.randn(2, 5, 6)
    assert torch.allclose(sdpa_math(q3, k3, v3, attn_mask=m3), F.scaled_dot_product_attention(q3, k3, v3, attn_mask=m3), atol=1e-5)


def test_bundled_vit_quantizes_through_the_cli_and_reports_its_matmuls(tmp_path, tiny_data_dir):
    from metaaug.cli.app import app

    res = runner.invoke(app, ["models"])
    assert "vit" in res.output
    out = tmp_path / "vit"
    res = runner.invoke(app, ["quantize", "--model", "vit", "--method", "qdrop", "--wbits", "4", "--abits", "4", "--calib-size", "16",
                              "--iters", "2", "--data-dir", str(tiny_data_dir), "--out", str(out)])
    assert res.exit_code == 0, res.output
    report = json.loads((out / "report.json").read_text())
    assert [m["name"] for m in report["cost"]["matmuls"]][:2] == ["blocks.0.attn.qk_matmul", "blocks.0.attn.av_matmul"]
    assert [p["name"] for p in report["unit_plan"]] == ["patch_embed", *(f"blocks.{i}" for i in range(6)), "head"]
    assert report["fp_top1"] > 80  # the shipped checkpoint, on the first 200 test images
