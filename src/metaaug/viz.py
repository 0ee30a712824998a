"""PNG figures for a run folder: calibration images next to T(x) per stage, and MetaAug's loss curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch


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
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


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
        fig.savefig(out_dir / "meta_losses.png", dpi=80)
        plt.close(fig)
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
    fig.savefig(out / "pareto.png", dpi=110)
    plt.close(fig)
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
    fig.savefig(out / "generations.png", dpi=110)
    plt.close(fig)
    return ["pareto.png", "generations.png"]
