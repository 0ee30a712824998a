"""PNG figures for a run folder: calibration images next to T(x) per stage, and MetaAug's loss curves."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from metaaug.runs.files import atomic_path

if TYPE_CHECKING:
    from collections.abc import Sequence

    from metaaug.runs.summary import RunRow


def save_figure(fig, path: Path, dpi: int, metadata: dict[str, str] | None = None) -> Path:
    """Write a figure as PNG atomically (a kill mid-write leaves the old file or none), then close it. `metadata`:
    PNG text chunks (e.g. Software), by which a command recognises a file it wrote and may replace."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, format="png", metadata=metadata)
    plt.close(fig)
    return Path(path)


def _show(ax, img: torch.Tensor) -> None:
    img = img.detach().float()
    img = (img - img.min()) / (img.max() - img.min() + 1e-8)
    if img.shape[0] == 1:
        ax.imshow(img[0].numpy(), cmap="gray", vmin=0, vmax=1)
    else:
        ax.imshow(img.permute(1, 2, 0).numpy())
    ax.set_xticks([])
    ax.set_yticks([])


def image_grid(rows: list[tuple[str, torch.Tensor]], path: Path, title: str) -> Path:
    n = max(r[1].shape[0] for r in rows)
    fig, axes = plt.subplots(len(rows), n, figsize=(1.2 * n + 1.5, 1.25 * len(rows) + 0.6), squeeze=False)
    for i, (label, imgs) in enumerate(rows):
        for j in range(n):
            ax = axes[i][j]
            if j < imgs.shape[0]:
                _show(ax, imgs[j])
            else:
                ax.axis("off")
        axes[i][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path, 80)


def save_meta_plots(out_dir: Path, snapshots: list[tuple[str, torch.Tensor]], curves: dict[str, list[dict]]) -> list[str]:
    """`transforms.png`: x and T(x) after each unit's meta phase; `meta_losses.png`: outer-loss terms per step."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if len(snapshots) > 1:
        rows = [snapshots[0]] + [(f"T(x) {name}", imgs) for name, imgs in snapshots[1:]]
        image_grid(rows, out_dir / "transforms.png", "calibration images x (top) and T(x) after each unit's meta phase")
        written.append("transforms.png")
    keys = sorted({k for c in curves.values() for row in c for k in row if k != "step"})
    if keys:  # no curve at all when every unit ran 0 meta steps
        fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 3), squeeze=False)
        for ax, key in zip(axes[0], keys, strict=True):
            offset = 0
            for unit, rows in curves.items():
                xs = [offset + r["step"] for r in rows if key in r]
                ax.plot(xs, [r[key] for r in rows if key in r], label=unit, lw=1)
                offset += (rows[-1]["step"] + 1) if rows else 0
            ax.set_title(key, fontsize=9)
            ax.set_xlabel("meta step (units in sequence)", fontsize=8)
            if key.startswith("grad_"):
                ax.set_yscale("log")
        fig.tight_layout()
        save_figure(fig, out_dir / "meta_losses.png", 80)
        written.append("meta_losses.png")
    return written


def save_search_plots(out: Path, summary: dict, budget_kind: str) -> list[str]:
    """pareto.png: every candidate's average weight bits vs held-out top-1, uniform policies and the winner marked;
    generations.png: best and mean fitness per generation (and MetaQuantNet's training curve when there is one)."""
    out = Path(out)
    fig, ax = plt.subplots(figsize=(6, 4.2))
    cands = summary["candidates"]
    ax.scatter([c["avg_wbits"] for c in cands], [c["top1"] for c in cands], s=10, alpha=0.5, label="GA candidates")
    uni = summary["uniform"]
    ax.scatter([u["cost"]["avg_wbits"] for u in uni.values()], [u["top1"] for u in uni.values()], marker="s", color="black",
               label="uniform")
    for name, u in uni.items():
        ax.annotate(name, (u["cost"]["avg_wbits"], u["top1"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    best = summary["best"]
    ax.scatter([best["cost"]["avg_wbits"]], [best["top1"]], marker="*", s=160, color="red", label="chosen policy")
    if budget_kind == "avg_wbits":
        ax.axvline(summary["budget"]["limit"], color="red", linestyle=":", label="budget")
    ax.set_xlabel("average weight bits (parameter-weighted)")
    ax.set_ylabel("held-out top-1 with generated weights (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out / "pareto.png", 110)
    panels = 2 if summary["meta_curve"] else 1
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 3.6), squeeze=False)
    hist = summary["history"]
    axes[0][0].plot([h["generation"] for h in hist], [h["best_fitness"] for h in hist], label="best")
    axes[0][0].plot([h["generation"] for h in hist], [h["mean_fitness"] for h in hist], label="population mean")
    axes[0][0].set_xlabel("generation")
    axes[0][0].set_ylabel("fitness on the held-out split")
    axes[0][0].legend(fontsize=8)
    if summary["meta_curve"]:
        curve = summary["meta_curve"]
        axes[0][1].plot([c["step"] for c in curve], [c["loss"] for c in curve])
        axes[0][1].set_xlabel("MetaQuantNet step")
        axes[0][1].set_ylabel("KL to FP (mean over sampled policies)")
        axes[0][1].set_yscale("log")
    fig.tight_layout()
    save_figure(fig, out / "generations.png", 110)
    return ["pareto.png", "generations.png"]


def _overlap(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _place_labels(fig, ax, items: list[tuple[float, float, str, object, float]], fontsize: float) -> None:
    """Annotate each point beside it, on the side (of a few) where the label's estimated box stays inside the axes and
    covers the least of the other labels and points: runs at the same memory (one width by several methods) would
    otherwise write over each other. `items`: (x, y, text, colour, marker radius in points)."""
    fig.canvas.draw()  # the final layout, so that data coordinates map to the pixels the labels will take
    px = fig.dpi / 72
    char_w, line_h = 0.6 * fontsize * px, 1.25 * fontsize * px
    points = [tuple(ax.transData.transform((x, y))) for x, y, *_ in items]
    frame = ax.get_window_extent()
    marks = [(x - r * px, y - r * px, x + r * px, y + r * px) for (x, y), (*_, r) in zip(points, items, strict=True)]
    labels: list[tuple[float, float, float, float]] = []
    for i, ((x, y, text, colour, r), (sx, sy)) in enumerate(zip(items, points, strict=True)):
        g = r + 1  # the gap between the point's centre and its label, in points
        sides = [(g, 2), (g, -10), (-g, 2), (-g, -10), (g, g + 5), (g, -g - 13), (-g, g + 5), (-g, -g - 13)]
        w = len(text) * char_w
        others = labels + marks[:i] + marks[i + 1:]  # its own point is beside the label, never under it
        boxes = []
        for dx, dy in sides:
            left = sx + dx * px if dx > 0 else sx + dx * px - w
            boxes.append((left, sy + dy * px, left + w, sy + dy * px + line_h))
        costs = [1e12 * (not (frame.x0 <= b[0] and b[2] <= frame.x1 and frame.y0 <= b[1] and b[3] <= frame.y1))
                 + sum(_overlap(b, o) for o in others) for b in boxes]
        best = costs.index(min(costs))  # the first of equally good sides: right of the point, then below, left...
        chosen = sides[best]
        labels.append(boxes[best])
        ax.annotate(text, (x, y), xytext=chosen, textcoords="offset points", ha="left" if chosen[0] > 0 else "right", va="bottom",
                    fontsize=fontsize, color=colour)


def save_runs_plot(rows: Sequence[RunRow], path: Path, axis: str = "memory", metadata: dict[str, str] | None = None) -> Path:
    """Top-1 against weight memory (KB) or BOPs, each run (or QAT width) a point: the trade-off a user of mixed
    precision weighs. Uniform widths are circles, per-layer policies (quantize --policy, search results) stars, a
    search's held-out top-1 a hollow star; colour is the method (and its labels), one panel per model, the FP model a
    dashed line; the x axis is logarithmic when it spans more than 8x."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    models = sorted({r.model or "?" for r in rows})
    methods = sorted({r.method or "?" for r in rows})
    colour = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    fig, axes = plt.subplots(1, len(models), figsize=(5.4 * len(models) + 2.6, 4.8), squeeze=False, layout="constrained")
    labels: list[tuple[object, list]] = []
    for ax, model in zip(axes[0], models, strict=True):
        mine = [r for r in rows if (r.model or "?") == model]
        xs = [float(r.x(axis)) / (1e9 if axis == "bops" else 1) for r in mine]
        items = []
        for r, x in zip(mine, xs, strict=True):
            c = colour[r.method or "?"]
            if r.mixed:
                ax.scatter([x], [r.top1], marker="*", s=200, facecolors="none" if r.heldout else [c], edgecolors=[c],
                           linewidths=1.3, zorder=3)
            else:
                ax.scatter([x], [r.top1], marker="o", s=46, color=c, edgecolors="white", linewidths=0.6, zorder=3)
            label = f"mix {r.avg_wbits:.1f}b" if r.mixed and r.avg_wbits is not None else (r.bits or "").upper()
            if label:
                items.append((x, r.top1, label, c, 7.5 if r.mixed else 4.0))
        fps = sorted({r.fp_top1 for r in mine if r.fp_top1 is not None})
        for fp in fps:
            ax.axhline(fp, color="0.45", linestyle="--", linewidth=1, zorder=1)
            ax.annotate(f"FP {fp:g}", (0.01, fp), xycoords=("axes fraction", "data"), xytext=(0, -3), textcoords="offset points",
                        va="top", fontsize=7.5, color="0.35")
        ys = [r.top1 for r in mine] + fps
        margin = (max(ys) - min(ys)) * 0.06 or 1.0
        ax.set_ylim(min(ys) - margin, max(ys) + margin)
        lo, hi = min(xs), max(xs)
        if hi > 8 * lo > 0:
            ax.set_xscale("log")
            ax.set_xlim(lo / 1.25, hi * 1.6)  # room for the labels right of the points
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        else:
            pad = (hi - lo) * 0.08 or hi * 0.05 or 1.0
            ax.set_xlim(lo - pad, hi + 2 * pad)
        ax.set_title(model, fontsize=10)
        ax.set_xlabel("weight memory (KB)" if axis == "memory" else "BOPs per image (G)")
        ax.set_ylabel("top-1 (%)")
        ax.grid(True, alpha=0.3)
        labels.append((ax, items))
    handles = [Line2D([], [], marker="s", linestyle="none", color=colour[m], markersize=8, label=m) for m in methods]
    kinds = [("uniform width", {"marker": "o", "markerfacecolor": "0.4"}, any(not r.mixed for r in rows)),
             ("mixed precision (policy)", {"marker": "*", "markerfacecolor": "0.4"}, any(r.mixed and not r.heldout for r in rows)),
             ("search result (held-out top-1)", {"marker": "*", "markerfacecolor": "none"}, any(r.heldout for r in rows)),
             ("FP model (test top-1)", {"marker": None, "linestyle": "--"}, any(r.fp_top1 is not None for r in rows))]
    handles += [Line2D([], [], color="0.4", markersize=12 if style.get("marker") == "*" else 7, linestyle=style.pop("linestyle", "none"),
                       label=name, **style) for name, style, present in kinds if present]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8, frameon=False)
    fig.suptitle(f"top-1 vs {'weight memory' if axis == 'memory' else 'BOPs'} ({len(rows)} point{'s' * (len(rows) != 1)})", fontsize=11)
    for ax, items in labels:
        _place_labels(fig, ax, items, 7.5)
    return save_figure(fig, path, 120, metadata)
