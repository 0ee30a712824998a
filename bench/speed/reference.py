"""A plain-PyTorch reference of QDrop block reconstruction (the paper's recipe) on a CIFAR-style ResNet, written
apart from metaaug's engine, to time that engine against (issue #32).

    OMP_NUM_THREADS=1 python bench/speed/reference.py --model resnet20 --iters 2000 --calib 1024 --seed 0 --out ref.json

Blocks in order: the stem conv, each residual block, the final linear (checked against metaaug's own unit plan;
only the block names are taken from it). BN is folded into the convs. Per block: cache its FP inputs/outputs and its
quantized-path inputs for all images, start the activation steps by an Lp search on 256 images, then Adam for
`iters` steps of batch 32 on AdaRound rounding logits (lr 1e-3, regulariser 0.01 with beta 20 -> 2 after a 20%
warm-up) and LSQ activation steps (lr 4e-5); weight steps stay at their searched values. QDrop: the block input
mixes quantized and FP values element-wise (p=0.5) and every activation quantizer in the block drops its
quantization element-wise (p=0.5). Then rounding is hardened and the next block's inputs are computed.
Conventions as in metaaug: per-channel asymmetric weights, per-tensor activations (unsigned after ReLU), the first
and last layers W8 (the last one's input A8), activation quantizers on each block's output (the last residual
block's output is quantized after pooling, in the head), Lp norm 2.4 for both step searches.
"""

from __future__ import annotations

import metaaug  # noqa: F401  (first: the same OpenMP wait policy as the CLI run)

# isort: split

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from metaaug.data import calibration_split, load_dataset
from metaaug.models.registry import build_model
from metaaug.quant.prepare import QuantSpec, prepare

ZETA, GAMMA, P = 1.1, -0.1, 2.4  # AdaRound's rectified-sigmoid stretch; Lp norm of the clip searches


def ste(x: torch.Tensor) -> torch.Tensor:
    """Round with a straight-through gradient."""
    return x + (x.round() - x).detach()


class QLayer(nn.Module):
    """Conv2d (BN folded) or Linear with a per-output-channel asymmetric weight quantizer and AdaRound rounding."""

    def __init__(self, layer: nn.Conv2d | nn.Linear, bn: nn.BatchNorm2d | None, bits: int) -> None:
        super().__init__()
        w, b = layer.weight.detach(), layer.bias.detach() if layer.bias is not None else torch.zeros(layer.weight.shape[0])
        if bn is not None:
            f = bn.weight.detach() / (bn.running_var + bn.eps).sqrt()
            w, b = w * f.view(-1, *[1] * (w.dim() - 1)), (b - bn.running_mean) * f + bn.bias.detach()
        self.register_buffer("w", w)
        self.register_buffer("b", b)
        self.conv = dict(stride=layer.stride, padding=layer.padding) if isinstance(layer, nn.Conv2d) else None
        self.levels, self.mode = 2**bits - 1, "fp"  # fp | rtn | soft | hard
        w2, best = w.flatten(1), torch.full((w.shape[0],), float("inf"))
        lo0, hi0 = w2.min(1).values.clamp(max=0), w2.max(1).values.clamp(min=0)
        self.s, self.z = torch.ones_like(best), torch.zeros_like(best)
        for r in torch.linspace(1.0, 0.01, 100).tolist():  # per-channel clip-ratio search
            s = ((hi0 - lo0) * r / self.levels).clamp(min=1e-8)
            z = (-lo0 * r / s).round()
            err = ((((w2 / s[:, None]).round() + z[:, None]).clamp(0, self.levels) - z[:, None]) * s[:, None] - w2).abs().pow(P).sum(1)
            keep = err < best
            best, self.s, self.z = torch.where(keep, err, best), torch.where(keep, s, self.s), torch.where(keep, z, self.z)
        self.s, self.z = self.s.view(-1, *[1] * (w.dim() - 1)), self.z.view(-1, *[1] * (w.dim() - 1))
        self.v = nn.Parameter(torch.zeros(0))

    def start_rounding(self) -> None:
        """AdaRound starts at the FP weight: h(v) = frac(w / s)."""
        self.floor = (self.w / self.s).floor()
        frac = (self.w / self.s - self.floor).clamp(1e-4, 1 - 1e-4)
        self.v, self.mode = nn.Parameter(-torch.log((ZETA - GAMMA) / (frac - GAMMA) - 1)), "soft"

    def h(self) -> torch.Tensor:
        return (torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w
        if self.mode == "rtn":
            w = (((w / self.s).round() + self.z).clamp(0, self.levels) - self.z) * self.s
        elif self.mode != "fp":
            up = self.h() if self.mode == "soft" else (self.v >= 0).float()
            w = (self.floor + up).clamp(-self.z, self.levels - self.z) * self.s
        return F.conv2d(x, w, self.b, **self.conv) if self.conv else F.linear(x, w, self.b)


class QAct(nn.Module):
    """Per-tensor LSQ activation quantizer (unsigned for non-negative inputs) with QDrop's element-wise drop `p`."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        self.bits, self.mode, self.p, self.seen = bits, "fp", 1.0, []  # mode: fp | observe | on
        self.step = nn.Parameter(torch.ones(1), requires_grad=False)

    def search(self) -> None:
        x = torch.cat(self.seen)
        x = x[:: max(1, x.numel() // (1 << 19))]
        self.lo, self.hi = (-(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1) if x.min() < 0 else (0, 2**self.bits - 1)
        top = (x.abs().max() if self.lo < 0 else x.max()).clamp(min=1e-8)
        errs = [((x / s).round().clamp(self.lo, self.hi) * s - x).abs().pow(P).mean() for s in top * torch.linspace(1, 0.01, 100) / self.hi]
        self.step.data = (top * torch.linspace(1, 0.01, 100)[int(torch.stack(errs).argmin())] / self.hi).reshape(1)
        self.seen, self.mode = [], "on"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "observe":
            self.seen.append(x.detach().flatten())
        if self.mode != "on":
            return x
        q = ste(x / self.step).clamp(self.lo, self.hi) * self.step
        return q if self.p >= 1 else torch.where(torch.rand_like(x) < self.p, q, x)


class Stem(nn.Module):
    def __init__(self, m: nn.Module, bits: int, abits: int) -> None:
        super().__init__()
        self.conv, self.out = QLayer(m.conv1, m.bn1, bits), QAct(abits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.conv(x)))


class Residual(nn.Module):
    def __init__(self, b: nn.Module, bits: int, abits: int, last: bool) -> None:
        super().__init__()
        self.c1, self.c2, self.mid = QLayer(b.conv1, b.bn1, bits), QLayer(b.conv2, b.bn2, bits), QAct(abits)
        self.ds = None if b.downsample is None else QLayer(b.downsample[0], b.downsample[1], bits)
        self.out = None if last else QAct(abits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.c2(self.mid(F.relu(self.c1(x)))) + (x if self.ds is None else self.ds(x)))
        return y if self.out is None else self.out(y)


class Head(nn.Module):
    def __init__(self, m: nn.Module, bits: int) -> None:
        super().__init__()
        self.inp, self.fc = QAct(bits), QLayer(m.fc, None, bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.inp(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)))


def blocks_of(model: nn.Module, wbits: int, abits: int, edge: int = 8) -> tuple[list[str], list[nn.Module]]:
    """The reconstruction blocks of a CIFAR-style ResNet, checked against metaaug's unit plan (names only)."""
    res = [(f"{s}.{i}", b) for s in ("layer1", "layer2", "layer3") for i, b in enumerate(getattr(model, s))]
    names = ["conv1", *(n for n, _ in res), "fc"]
    plan = [u.name for u in prepare(model, QuantSpec(wbits, abits), "block").unit_plans]
    assert names == plan, f"block list {names} differs from metaaug's units {plan}"
    blocks = [Stem(model, edge, abits), *(Residual(b, wbits, abits, i == len(res) - 1) for i, (_, b) in enumerate(res)), Head(model, edge)]
    return names, blocks


def set_mode(block: nn.Module, weights: str, acts: str) -> None:
    """Put every weight quantizer of `block` in mode `weights` and every activation quantizer in mode `acts`."""
    for m in block.modules():
        if isinstance(m, QLayer | QAct):
            m.mode = weights if isinstance(m, QLayer) else acts


@torch.no_grad()
def apply(block: nn.Module, x: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    return torch.cat([block(x[i : i + chunk]) for i in range(0, len(x), chunk)])


def reconstruct(blocks: list[nn.Module], images: torch.Tensor, iters: int, seed: int, p: float = 0.5) -> list[float]:
    """QDrop block by block; returns each block's optimisation-loop seconds."""
    fp_in, q_in, seconds = images, images, []
    for k, block in enumerate(blocks):
        torch.manual_seed(seed * 100_003 + k)
        layers, acts = [m for m in block.modules() if isinstance(m, QLayer)], [m for m in block.modules() if isinstance(m, QAct)]
        set_mode(block, "fp", "fp")
        fp_out = apply(block, fp_in)
        set_mode(block, "rtn", "observe")
        apply(block, q_in[:256], 128)
        for a in acts:
            a.search()
            a.p = p
        for layer in layers:
            layer.start_rounding()
        start = time.perf_counter()
        opt = torch.optim.Adam([{"params": [m.v for m in layers], "lr": 1e-3}, {"params": [a.step.requires_grad_() for a in acts], "lr": 4e-5}])
        warm = int(0.2 * iters)
        for it in range(iters):
            idx = torch.randint(len(images), (32,))
            qb, fb = q_in[idx], fp_in[idx]
            loss = ((block(torch.where(torch.rand_like(qb) < p, qb, fb)) - fp_out[idx]) ** 2).sum(1).mean()
            if it >= warm:
                beta = 2.0 + 18.0 * (1 - (it - warm) / max(1, iters - warm))
                loss = loss + 0.01 * sum((1 - (2 * m.h() - 1).abs().pow(beta)).sum() for m in layers)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if images.is_cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
        for layer in layers:
            layer.mode = "hard"
            layer.v.requires_grad_(False)
        for a in acts:
            a.p = 1.0
            a.step.requires_grad_(False)
        q_in, fp_in = apply(block, q_in), fp_out
    return seconds


@torch.no_grad()
def top1(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((apply(model, images, 500).argmax(1) == labels).float().mean())


def main() -> None:
    start = time.perf_counter()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet20", help="bundled name or path/to/file.py:factory (a CIFAR-style ResNet)")
    p.add_argument("--weights", default=None)
    p.add_argument("--wbits", type=int, default=2)
    p.add_argument("--abits", type=int, default=4)
    p.add_argument("--calib", type=int, default=1024)
    p.add_argument("--iters", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the GPU check, bench/gpu.sh)")
    p.add_argument("--out", type=Path, required=True, help="result JSON")
    a = p.parse_args()
    if a.device != "cpu":  # every tensor the blocks make lives on the device (on the CPU: no dispatch mode, same timing)
        torch.set_default_device(a.device)
    model = build_model(a.model, a.weights).eval()
    calib, _ = calibration_split(load_dataset(None, "train"), a.calib, a.seed)  # the pipeline's stratified picks
    test = load_dataset(None, "test")
    calib_images, test_images, test_labels = (t.to(a.device) for t in (calib.images, test.images, test.labels))
    names, blocks = blocks_of(model, a.wbits, a.abits)
    net = nn.Sequential(*blocks).eval()
    fp_top1 = top1(net, test_images, test_labels)
    seconds = reconstruct(blocks, calib_images, a.iters, a.seed)
    quant_top1 = top1(net, test_images, test_labels)
    result = {"model": a.model, "wbits": a.wbits, "abits": a.abits, "calib_size": a.calib, "iters": a.iters, "seed": a.seed,
              "device": a.device, "threads": torch.get_num_threads(), "fp_top1": round(fp_top1, 2), "quant_top1": round(quant_top1, 2),
              "recon_seconds": round(sum(seconds), 1), "wall_seconds": round(time.perf_counter() - start, 1),
              "blocks": {n: round(s, 2) for n, s in zip(names, seconds, strict=True)}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
