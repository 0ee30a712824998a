"""An ImageNet-shaped image folder for the memory/speed bench: Fashion-MNIST upsampled to RGB SIZExSIZE PNGs
(train/<class>/, test/<class>/) and random-init weights for a bench model. The accuracy of a random model means
nothing; the bench measures memory and time, which depend on shapes only.

    python bench/imagenet/make_data.py OUT --size 224 --train 1024 --test 32 --model resnet50
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from metaaug.data import load_dataset

sys.path.insert(0, str(Path(__file__).parent))
import models


def write_split(ds, out: Path, n: int, size: int) -> None:
    per_class = -(-n // 10)
    for c in range(10):
        idx = (ds.labels == c).nonzero().flatten()[:per_class]
        folder = out / f"class{c}"
        folder.mkdir(parents=True, exist_ok=True)
        big = F.interpolate(ds.images[idx], size=(size, size), mode="bilinear", align_corners=False)
        for j, img in enumerate(big):
            img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-6)  # the dataset is normalised
            rgb = (img.repeat(3, 1, 1).permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            Image.fromarray(rgb).save(folder / f"{j:05d}.png")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--train", type=int, default=1024)
    ap.add_argument("--test", type=int, default=32)
    ap.add_argument("--model", action="append", default=[])
    args = ap.parse_args()
    if not (args.out / "train").exists():
        write_split(load_dataset(None, "train"), args.out / "train", args.train, args.size)
        write_split(load_dataset(None, "test"), args.out / "test", args.test, args.size)
    for name in args.model:
        torch.manual_seed(0)
        path = args.out / f"{name}.safetensors"
        if not path.exists():
            save_file(getattr(models, name)().state_dict(), str(path))


if __name__ == "__main__":
    main()
