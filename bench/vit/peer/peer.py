"""Peer-toolkit comparison: the bundled ViT quantized by Brevitas' own post-training recipe.

Two steps, two interpreters (see run.sh):

    prepare   (project venv)  builds the bundled ViT and draws the project's calibration sets and test split, and
                              saves them as tensors with the model's state dict into one file;
    quantize  (Brevitas venv) quantizes the model with Brevitas (layerwise_quantize, calibration_mode,
                              bias_correction_mode, gptq_mode), evaluates top-1 and writes results.json/results.md.

The quantize step needs only torch, Brevitas and the plain-torch model definition `src/metaaug/models/vit.py`
(imported by path, so metaaug itself need not be importable there).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
VIT_FILE = ROOT / "src" / "metaaug" / "models" / "vit.py"


# --------------------------------------------------------------------------------------------------- prepare (project)

def prepare(a: argparse.Namespace) -> None:
    from metaaug.data import calibration_split, load_dataset
    from metaaug.evaluate import top1
    from metaaug.models.registry import build_model

    torch.set_num_threads(1)
    model = build_model("vit")
    train, test = load_dataset(a.data_dir, "train"), load_dataset(a.data_dir, "test")
    if a.test_limit:
        test = test.subset(torch.arange(min(a.test_limit, len(test))))
    seeds = [int(s) for s in a.seeds.split(",")]
    calib = {}
    for seed in seeds:
        c, _ = calibration_split(train, a.calib_size, seed)
        calib[seed] = {"images": c.images.clone(), "labels": c.labels.clone()}
    fp = top1(model, test)
    torch.save({"state_dict": model.state_dict(), "calib": calib, "test_images": test.images.clone(),
                "test_labels": test.labels.clone(), "calib_size": a.calib_size, "data_dir": str(a.data_dir),
                "metaaug_fp_top1": round(fp, 2)}, a.out)
    print(f"prepared {a.out}: {len(test)} test images, calibration {a.calib_size} x seeds {seeds}, "
          f"FP top-1 by metaaug.evaluate.top1 = {fp:.2f}")


# -------------------------------------------------------------------------------------------------- quantize (Brevitas)

def _load_vit_module():
    spec = importlib.util.spec_from_file_location("peer_vit", VIT_FILE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def build_fp(state_dict: dict, attention: str):
    """The bundled ViT in float. attention='sdpa': the same network with each attention's two matmuls routed through
    a `brevitas.nn.ScaledDotProductAttention` submodule (softmax(q k^T * scale) v, the scale unchanged), the form
    Brevitas can quantize; 'float': the model exactly as defined (its functional matmuls are invisible to
    layerwise_quantize)."""
    import brevitas.nn as qnn

    vit = _load_vit_module()
    model = vit.vit()
    model.load_state_dict(state_dict)
    model.eval()
    if attention == "sdpa":
        class SDPAAttention(vit.Attention):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                b, n, d = x.shape
                q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
                return self.proj(self.sdpa(q, k, v, scale=self.scale).transpose(1, 2).reshape(b, n, d))

        for m in model.modules():
            if type(m) is vit.Attention:
                m.__class__ = SDPAAttention
                m.sdpa = qnn.ScaledDotProductAttention()
    elif attention != "float":
        raise ValueError(f"attention must be 'float' or 'sdpa', got {attention!r}")
    return model


def layer_map(wbits: int, abits: int) -> dict:
    """Brevitas' layerwise map: weights signed symmetric per output channel (max-abs stats), every layer input
    signed symmetric per tensor (99.999th-percentile stats, the ImageNet PTQ example's default), biases float; the
    attention's q*scale, k^T and v signed per tensor and its softmax output unsigned per tensor."""
    import brevitas.nn as qnn
    from brevitas.core.scaling.standalone import ParameterFromStatsFromParameterScaling
    from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat, Uint8ActPerTensorFloat
    from torch import nn

    # as the ImageNet PTQ example builds it: the per-channel scale a parameter initialised from the weight's stats
    # (with the stock runtime-stats scale gptq_mode's column-sliced quant_weight() would take the max of each single
    # column, quantize it exactly, and so change nothing), full range [-2^(b-1), 2^(b-1) - 1] (weight_narrow_range off)
    wq = Int8WeightPerChannelFloat.let(bit_width=wbits, narrow_range=False, scaling_impl=ParameterFromStatsFromParameterScaling)
    aq = Int8ActPerTensorFloat.let(bit_width=abits, high_percentile_q=99.999)
    uq = Uint8ActPerTensorFloat.let(bit_width=abits, high_percentile_q=99.999)
    wbiol = {"weight_quant": wq, "input_quant": aq, "bias_quant": None, "return_quant_tensor": False}
    sdpa = {"softmax_input_quant": None, "attn_output_weights_quant": uq, "q_scaled_quant": aq,
            "k_transposed_quant": aq, "v_quant": aq, "sdpa_output_quant": None}
    return {nn.Linear: (qnn.QuantLinear, wbiol), nn.Conv2d: (qnn.QuantConv2d, wbiol),
            qnn.ScaledDotProductAttention: (qnn.QuantScaledDotProductAttention, sdpa)}


EDGE = ["patch_embed", "head"]  # first and last layer: kept at 8 bits (weights and input), as the project does


def quantize_model(fp_model, wbits: int, abits: int, first_batch: torch.Tensor, edge_bits: int = 8):
    import copy

    from brevitas.graph.quantize import layerwise_quantize

    model = copy.deepcopy(fp_model)
    model = layerwise_quantize(model, layer_map(wbits, abits), name_blacklist=EDGE)
    model = layerwise_quantize(model, layer_map(edge_bits, edge_bits), name_blacklist=["blocks"])
    model.eval()
    with torch.no_grad():  # one forward pass initialises the weight scales (the example does the same)
        model(first_batch)
    return model


def _batches(images: torch.Tensor, size: int):
    for i in range(0, len(images), size):
        yield images[i : i + size]


@torch.no_grad()
def calibrate(model, images, batch):
    from brevitas.graph.calibrate import calibration_mode
    with calibration_mode(model):
        for x in _batches(images, batch):
            model(x)


@torch.no_grad()
def bias_correct(model, images, batch):
    from brevitas.graph.calibrate import bias_correction_mode
    with bias_correction_mode(model):
        for x in _batches(images, batch):
            model(x)


@torch.no_grad()
def gptq(model, images, batch):
    from brevitas.graph.gptq import gptq_mode
    # the ImageNet PTQ example's defaults: no act-order, float activations while collecting the Hessians
    with gptq_mode(model, act_order=False, use_quant_activations=False, create_weight_orig=True) as g:
        for _ in range(g.num_layers):
            for x in _batches(images, batch):
                g.model(x)
            g.update()


@torch.no_grad()
def top1(model, images, labels, batch=250) -> float:
    correct = sum(int((model(x).argmax(1) == labels[i : i + batch]).sum()) for i, x in
                  zip(range(0, len(images), batch), _batches(images, batch), strict=True))
    return 100.0 * correct / len(labels)


def count_quantizers(model) -> dict:
    import brevitas.nn as qnn
    return {"QuantLinear": sum(isinstance(m, qnn.QuantLinear) for m in model.modules()),
            "QuantConv2d": sum(isinstance(m, qnn.QuantConv2d) for m in model.modules()),
            "QuantSDPA": sum(isinstance(m, qnn.QuantScaledDotProductAttention) for m in model.modules())}


CHAINS = {  # variant -> the PTQ steps after layerwise_quantize, in the ImageNet PTQ example's order
    "brevitas_calib": ["calibrate"],
    "brevitas_calib_bc": ["calibrate", "bias_correction"],
    "brevitas_gptq": ["calibrate", "gptq"],
    "brevitas_gptq_bc": ["calibrate", "gptq", "bias_correction"],
}
STEPS = {"calibrate": calibrate, "bias_correction": bias_correct, "gptq": gptq}


def run_chain(fp_model, prefix: list[str], variants: set[str], setting: str, calib, test_x, test_y, batch):
    """Quantize once and apply the steps of `prefix` in order, evaluating after each variant whose chain is reached.
    A variant's seconds: quantize + its own steps + its evaluation (the time a user running just that recipe spends)."""
    wbits, abits = (int(t) for t in setting[1:].split("A"))
    t0 = time.perf_counter()
    qmodel = quantize_model(fp_model, wbits, abits, calib[:batch])
    elapsed = time.perf_counter() - t0
    done, out = [], {}
    for step in prefix:
        t = time.perf_counter()
        STEPS[step](qmodel, calib, batch)
        elapsed += time.perf_counter() - t
        done.append(step)
        for v in [v for v in variants if v not in out]:
            if CHAINS[v] == done:
                t = time.perf_counter()
                acc = top1(qmodel, test_x, test_y)
                out[v] = {"quant_top1": round(acc, 2), "seconds": round(elapsed + time.perf_counter() - t, 1),
                          "quantized": count_quantizers(qmodel)}
    return out


def quantize(a: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    import brevitas

    data = torch.load(a.data, weights_only=True)
    test_x, test_y = data["test_images"], data["test_labels"]
    seeds = sorted(data["calib"]) if not a.seeds else [int(s) for s in a.seeds.split(",")]
    variants = a.variants.split(",")
    # chains sharing a prefix run once: calib -> calib_bc, calib -> gptq -> gptq_bc
    prefixes = []
    for v in sorted(variants, key=lambda v: -len(CHAINS[v])):
        if not any(p[: len(CHAINS[v])] == CHAINS[v] for p in prefixes):
            prefixes.append(CHAINS[v])
    rows, raw = [], []
    for attention in a.attention.split(","):
        fp_model = build_fp(data["state_dict"], attention)
        t = time.perf_counter()
        fp = top1(fp_model, test_x, test_y)
        fp_seconds = time.perf_counter() - t
        print(f"[{attention}] FP top-1 {fp:.2f} ({fp_seconds:.1f}s); metaaug's own FP top-1 {data['metaaug_fp_top1']}", flush=True)
        for setting in a.settings.split(","):
            per = {v: [] for v in variants}
            for seed in seeds:
                torch.manual_seed(seed)
                calib = data["calib"][seed]["images"]
                pending = set(variants)
                for prefix in prefixes:
                    res = run_chain(fp_model, prefix, pending, setting, calib, test_x, test_y, a.batch)
                    pending -= set(res)
                    for v, r in res.items():
                        per[v].append(r)
                        raw.append({"variant": v, "attention": attention, "setting": setting, "seed": seed, **r})
                        print(f"[{attention}] {setting} seed {seed} {v}: top-1 {r['quant_top1']:.2f} in {r['seconds']:.1f}s "
                              f"{r['quantized']}", flush=True)
            for v in variants:
                accs = [r["quant_top1"] for r in per[v]]
                rows.append({
                    "variant": v if attention == "sdpa" else f"{v}_attnfloat", "toolkit": f"brevitas {brevitas.__version__}",
                    "steps": CHAINS[v], "attention_matmuls": "quantized (QuantScaledDotProductAttention)" if attention == "sdpa" else "float",
                    "setting": setting, "calib_size": len(data["calib"][seeds[0]]["images"]), "seeds": len(seeds),
                    "test_images": len(test_y), "fp_top1": round(fp, 2),
                    "quant_top1_mean": round(statistics.mean(accs), 2),
                    "quant_top1_std": round(statistics.stdev(accs), 2) if len(accs) > 1 else 0.0,
                    "quant_top1_per_seed": accs, "seconds": round(statistics.mean(r["seconds"] for r in per[v]), 1),
                    "quantized_modules": per[v][0]["quantized"], "threads": torch.get_num_threads(),
                    "torch": torch.__version__})
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"rows": rows, "runs": raw}, indent=1) + "\n")
    (out / "results.md").write_text(markdown(rows, data, a) + "\n")
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")


def markdown(rows: list[dict], data: dict, a: argparse.Namespace) -> str:
    lines = ["Command: `bash bench/vit/peer/run.sh`", "", EXPLANATION.strip(), "",
             "| variant | setting | calib_size | seeds | fp_top1 | quant_top1 | seconds |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["setting"], r["variant"])):
        lines.append(f"| {r['variant']} | {r['setting']} | {r['calib_size']} | {r['seeds']} | {r['fp_top1']:.2f} | "
                     f"{r['quant_top1_mean']:.2f} ± {r['quant_top1_std']:.2f} | {r['seconds']:.0f} |")
    if rows:
        lines += ["", f"Test images: {rows[0]['test_images']} (every 5th Fashion-MNIST test image, {data['data_dir']}); "
                  f"metaaug's own FP top-1 on them: {data['metaaug_fp_top1']}. {rows[0]['toolkit']}, torch {rows[0]['torch']}, "
                  f"{rows[0]['threads']} thread."]
    return "\n".join(lines)


EXPLANATION = """
Brevitas' own post-training recipe on the bundled ViT (`brevitas.graph.quantize.layerwise_quantize`, then
`calibration_mode`, `gptq_mode` and `bias_correction_mode` in the order of Brevitas' ImageNet PTQ example), on the
same calibration images (`calibration_split(train, 1024, seed)`, seeds 0, 1, 2) and the same 2,000 test images as
the project's `bench/vit` runs. Quantized: every Linear (qkv, proj, fc1, fc2 of the 6 blocks) with signed
symmetric per-output-channel weights (max-abs) and a signed symmetric per-tensor quantizer on its input
(99.999th percentile, calibrated); the patch embedding (Conv2d) and the head stay at 8 bits, weights and input
(so, unlike the project, the raw image is quantized to 8 bits too). Float: biases, LayerNorm, GELU, softmax, the
residual adds, the class token and position embedding. Attention matmuls: Brevitas has no quantizer for a bare
`q @ k.T` / `attn @ v`, so the rows without a suffix route them through `brevitas.nn.ScaledDotProductAttention`
(the same arithmetic; a per-layer submodule that `layerwise_quantize` turns into `QuantScaledDotProductAttention`):
q*scale, k^T and v are then quantized signed per tensor and the softmax output unsigned per tensor, at the
setting's activation bits, as the project does. The `_attnfloat` rows quantize the model as written: both
attention matmuls stay in float, so their W4A4 is weaker than a full W4A4. Weight quantizer as the example builds
it: full integer range, the per-channel scale a parameter initialised from the max-abs stats (with Brevitas' stock
runtime-stats `Int8WeightPerChannelFloat`, `gptq_mode` silently leaves every weight unchanged: its column-sliced
`quant_weight()` takes each column's own max). GPTQ with the example's defaults (no act-order, float activations
while collecting the Hessians). Variants: `calib` = calibration only; `calib_bc` = + bias correction (the example's
default recipe); `gptq` = calibration + GPTQ; `gptq_bc` = calibration + GPTQ + bias correction. seconds: one run
(quantize, its PTQ steps, the evaluation on the test images), mean over seeds, one thread.
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    pp = sub.add_parser("prepare", help="(project venv) save model, calibration sets and test split as tensors")
    pp.add_argument("--out", type=Path, required=True)
    pp.add_argument("--data-dir", default="/tmp/fmnist_every5")
    pp.add_argument("--calib-size", type=int, default=1024)
    pp.add_argument("--seeds", default="0,1,2")
    pp.add_argument("--test-limit", type=int, default=0, help="first N test images only (0: all)")
    pq = sub.add_parser("quantize", help="(Brevitas venv) quantize, evaluate, write results")
    pq.add_argument("--data", type=Path, required=True)
    pq.add_argument("--settings", default="W8A8,W4A4")
    pq.add_argument("--variants", default=",".join(CHAINS))
    pq.add_argument("--attention", default="sdpa,float", help="sdpa (attention matmuls quantized) and/or float")
    pq.add_argument("--seeds", default="", help="default: every seed in the data file")
    pq.add_argument("--batch", type=int, default=64, help="calibration batch size (the Brevitas example's default)")
    pq.add_argument("--out-dir", default=str(Path(__file__).parent))
    a = p.parse_args()
    prepare(a) if a.cmd == "prepare" else quantize(a)


if __name__ == "__main__":
    main()
