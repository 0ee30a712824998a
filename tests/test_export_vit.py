"""Export of quantized vision transformers: QDQ ONNX checked in onnxruntime, and the packed format rebuilt exactly.

Models (small, random weights): metaaug's ViT (explicit matmuls), one with `nn.MultiheadAttention`, one calling
`F.scaled_dot_product_attention`, and a Hugging Face ViT (captured by torch.export); plus a CNN with a MaxPool after
a 4-bit ReLU, whose activations onnxruntime refuses in a 4-bit container.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from typer.testing import CliRunner

import metaaug
from metaaug.cli.app import app
from metaaug.export.jobs import onnx_agreement
from metaaug.export.pack import load_quantized, read_metadata, save_packed
from metaaug.methods.registry import method_config
from metaaug.models import registry
from metaaug.models.vit import ViT
from metaaug.quant.prepare import QuantModel, QuantSpec

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from metaaug.export.onnx_export import export_onnx, onnx_logits  # noqa: E402  (after the skip: needs onnx)

MODELS_PY = textwrap.dedent('''
    """Factories of the models under test, as a user's `file.py:factory` (the packed file rebuilds them from it)."""
    import torch
    import torch.nn.functional as F
    from torch import nn


    class MHANet(nn.Module):
        def __init__(self, dim=32, heads=2):
            super().__init__()
            self.embed = nn.Conv2d(1, dim, 7, 7)
            self.norm = nn.LayerNorm(dim)
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(dim, 64), nn.GELU(approximate="tanh"), nn.Linear(64, dim))
            self.head = nn.Linear(dim, 10)

        def forward(self, x):
            x = self.embed(x).flatten(2).transpose(1, 2)
            h = self.norm(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return self.head((x + self.mlp(x)).mean(dim=1))


    class SDPANet(nn.Module):
        def __init__(self, dim=32, heads=2):
            super().__init__()
            self.heads = heads
            self.embed = nn.Conv2d(1, dim, 7, 7)
            self.pos = nn.Parameter(torch.randn(1, 16, dim) * 0.02)
            self.norm = nn.LayerNorm(dim)
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)
            self.fc, self.out = nn.Linear(dim, 64), nn.Linear(64, dim)
            self.head = nn.Linear(dim, 10)

        def forward(self, x):
            x = self.embed(x).flatten(2).transpose(1, 2) + self.pos
            b, n, d = x.shape
            q, k, v = self.qkv(self.norm(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v)
            x = x + self.proj(a.transpose(1, 2).reshape(b, n, d))
            x = x + self.out(F.gelu(self.fc(x)))
            return self.head(x[:, 0])


    def mha():
        return MHANet()


    def sdpa():
        return SDPANet()


    def hf_vit():
        from transformers import ViTConfig, ViTForImageClassification

        return ViTForImageClassification(ViTConfig(image_size=28, patch_size=7, num_channels=1, hidden_size=32,
                                                   num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                                   num_labels=10))
''')


def small_vit() -> ViT:
    return ViT(dim=32, depth=1, heads=2)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("user_models") / "vit_models.py"
    path.write_text(MODELS_PY)
    return path


@pytest.fixture()
def small_bundled_vit(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bundled name 'vit' builds the small ViT, so that a packed file naming it rebuilds it fast."""
    monkeypatch.setitem(registry.BUNDLED, "vit", small_vit)


def _factory(model_file: Path, name: str) -> Callable[[], nn.Module]:
    spec = importlib.util.spec_from_file_location("vit_models_under_test", model_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, name)


def images(n: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _source(model_file: Path, name: str) -> tuple[str, nn.Module]:
    """(the packed file's model name, the model with random weights)."""
    if name == "vit":
        torch.manual_seed(0)
        return "vit", small_vit()
    if name == "hf":
        pytest.importorskip("transformers")
        name = "hf_vit"
    torch.manual_seed(0)
    return f"{model_file}:{name}", _factory(model_file, name)()


def _check_onnx(qmodel: QuantModel, path: Path, x: torch.Tensor) -> float:
    """Export, run in onnxruntime at a batch size the export never saw, and pass the export's own agreement check."""
    export_onnx(qmodel, path, x[:1])
    got = onnx_logits(path, x)
    with torch.no_grad():
        ref = qmodel(x)
    labels = torch.randint(0, 10, (len(x),), generator=torch.Generator().manual_seed(1))
    check, ok = onnx_agreement(ref, got, labels)
    assert ok, check
    return check["max_abs_logit_diff"]


def _qdq_matmuls(path: Path) -> int:
    """MatMul nodes whose two inputs both come from activation QDQ pairs (DequantizeLinear of a QuantizeLinear)."""
    graph = onnx.load(str(path)).graph
    producer = {o: n for n in graph.node for o in n.output}

    def from_act_dq(name: str) -> bool:
        n = producer.get(name)
        return n is not None and n.op_type == "DequantizeLinear" and getattr(producer.get(n.input[0]), "op_type", None) == "QuantizeLinear"

    return sum(1 for n in graph.node if n.op_type == "MatMul" and all(from_act_dq(i) for i in n.input))


def _check_packed(qmodel: QuantModel, path: Path, model: str, spec: QuantSpec, method: str, x: torch.Tensor) -> QuantModel:
    save_packed(qmodel, path, {"model": model, "method": method, "spec": dataclasses.asdict(spec),
                               "units": method_config(method).units})
    rebuilt = load_quantized(path)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), qmodel(x))
    return rebuilt


@pytest.mark.parametrize("name", ["vit", "mha", "sdpa", "hf"])
def test_transformer_exports_onnx_and_packed(name: str, model_file: Path, small_bundled_vit: None, tmp_path: Path) -> None:
    model, net = _source(model_file, name)
    spec = QuantSpec(4, 4)
    qmodel = metaaug.quantize(net.eval(), images(), "rtn", spec, device="cpu")
    matmuls = list(qmodel.matmuls())
    assert len(matmuls) == 2  # QK^T and attn.V of the one block
    x = images(24, seed=2)
    diff = _check_onnx(qmodel, tmp_path / "m.onnx", x)
    assert diff < 1e-4
    assert _qdq_matmuls(tmp_path / "m.onnx") == len(matmuls)
    _check_packed(qmodel, tmp_path / "m.mq.safetensors", model, spec, "rtn", x)
    meta = read_metadata(tmp_path / "m.mq.safetensors")
    assert meta["input_shape"] == ([1, 28, 28] if name == "hf" else None)  # torch.export needs an example on load


def test_qdrop_vit_with_log2_softmax(small_bundled_vit: None, tmp_path: Path) -> None:
    """A few QDrop iterations (learned rounding, learned steps) and the log2 grid after the softmax, exported exactly."""
    spec = QuantSpec(4, 4, softmax_grid="log2")
    torch.manual_seed(0)
    qmodel = metaaug.quantize(small_vit().eval(), images(16), dataclasses.replace(method_config("qdrop"), iters=3), spec, device="cpu")
    assert [m.qa.grid for m in qmodel.matmuls() if m.role == "av"] == ["log2"]
    x = images(20, seed=3)
    assert _check_onnx(qmodel, tmp_path / "m.onnx", x) < 1e-4
    ops = {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}
    assert {"Log", "Round", "Pow", "Where"} <= ops
    rebuilt = _check_packed(qmodel, tmp_path / "m.mq.safetensors", "vit", spec, "qdrop", x)
    assert [m.qa.grid for m in rebuilt.matmuls() if m.role == "av"] == ["log2"]


def test_packed_file_without_new_fields_still_loads(model_file: Path, tmp_path: Path) -> None:
    """Files written before ViT support have no input_shape and [name, bits] activation entries."""
    model, net = _source(model_file, "mha")
    spec = QuantSpec(4, 4)
    qmodel = metaaug.quantize(net.eval(), images(16), "rtn", spec, device="cpu")
    path = tmp_path / "m.mq.safetensors"
    save_packed(qmodel, path, {"model": model, "method": "rtn", "spec": dataclasses.asdict(spec), "units": "block"})
    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata())
    header.pop("input_shape", None)
    header["acts"] = json.dumps([entry[:2] for entry in json.loads(header["acts"])])
    save_file(load_file(str(path)), str(path), metadata=header)
    with torch.no_grad():
        assert torch.equal(load_quantized(path)(images(8, seed=4)), qmodel(images(8, seed=4)))


class MaskedNet(nn.Module):
    """GroupNorm, and a causal mask: a boolean `attn_mask` buffer for nn.MultiheadAttention, or SDPA's `is_causal`."""

    def __init__(self, sdpa: bool) -> None:
        super().__init__()
        self.sdpa = sdpa
        self.embed, self.norm = nn.Conv2d(1, 32, 7, 7), nn.GroupNorm(4, 32)
        self.attn = nn.MultiheadAttention(32, 2, batch_first=True)
        self.register_buffer("mask", torch.ones(16, 16, dtype=torch.bool).triu(1))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.embed(x)).flatten(2).transpose(1, 2)
        if self.sdpa:
            q = x.view(x.shape[0], 16, 2, 16).transpose(1, 2)
            a = nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True).transpose(1, 2).reshape(x.shape[0], 16, 32)
        else:
            a = self.attn(x, x, x, attn_mask=self.mask, need_weights=False)[0]
        return self.head((x + a).mean(1))


@pytest.mark.parametrize("sdpa", [False, True])
def test_causal_masks_and_group_norm_export(sdpa: bool, tmp_path: Path) -> None:
    torch.manual_seed(0)
    qmodel = metaaug.quantize(MaskedNet(sdpa).eval(), images(16), "rtn", QuantSpec(4, 4), device="cpu", units="layer")
    assert _check_onnx(qmodel, tmp_path / "m.onnx", images(12, seed=6)) < 1e-4
    assert "GroupNormalization" in {n.op_type for n in onnx.load(str(tmp_path / "m.onnx")).graph.node}


class PoolNet(nn.Module):
    """Conv -> BN -> ReLU -> MaxPool -> Conv -> ReLU -> Conv: the 4-bit quantizer after the MaxPool is the one
    onnxruntime refuses in a uint4 container (it moves the QuantizeLinear before the MaxPool, then has no uint4
    MaxPool); the one after the second ReLU can stay in uint4."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.conv1, self.conv2 = nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(self.stem(x)))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def test_4bit_activation_before_maxpool_exports(tmp_path: Path) -> None:
    torch.manual_seed(0)
    qmodel = metaaug.quantize(PoolNet().eval(), images(32), "rtn", QuantSpec(4, 4), device="cpu", units="layer")
    x = images(16, seed=5)
    assert _check_onnx(qmodel, tmp_path / "auto.onnx", x) < 1e-4
    graph = onnx.load(str(tmp_path / "auto.onnx")).graph
    producer = {o: n.op_type for n in graph.node for o in n.output}
    zp_types = {i.name: i.data_type for i in graph.initializer}
    after_pool = [n for n in graph.node if n.op_type == "QuantizeLinear" and producer.get(n.input[0]) == "Clip"]
    assert len(after_pool) == 1 and zp_types[after_pool[0].input[2]] == onnx.TensorProto.UINT8  # 4 bits in a uint8 pair
    assert onnx.TensorProto.UINT4 in {zp_types[n.input[2]] for n in graph.node if n.op_type == "QuantizeLinear"}  # others stay 4-bit

    export_onnx(qmodel, tmp_path / "int4.onnx", x[:1], act_container="int4")  # the bug, kept reachable on purpose
    with pytest.raises(Exception, match="uint4"):
        onnx_logits(tmp_path / "int4.onnx", x)
    export_onnx(qmodel, tmp_path / "int8.onnx", x[:1], act_container="int8")
    assert (onnx_logits(tmp_path / "int8.onnx", x) - onnx_logits(tmp_path / "auto.onnx", x)).abs().max() < 1e-5
    with pytest.raises(metaaug.ConfigError, match="activation container"):
        export_onnx(qmodel, tmp_path / "bad.onnx", x[:1], act_container="int2")


def test_cli_act_container_is_checked(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["export", "--run", str(tmp_path), "--act-container", "int2"])
    assert res.exit_code == 2 and "activation container must be one of auto, int4, int8" in res.output


class SinNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(784, 16), nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.sin(self.fc1(x.flatten(1))))


def test_unsupported_op_is_one_line(tmp_path: Path) -> None:
    qmodel = metaaug.quantize(SinNet().eval(), images(16), "rtn", QuantSpec(4, 4), device="cpu", units="layer")
    with pytest.raises(metaaug.ModelError) as err:
        export_onnx(qmodel, tmp_path / "m.onnx", images(1))
    message = str(err.value)
    assert "\n" not in message and message.startswith("ONNX export: function sin at ") and message.endswith("is not supported")
    assert not (tmp_path / "m.onnx").exists()
