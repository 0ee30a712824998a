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
