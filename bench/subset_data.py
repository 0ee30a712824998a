"""Fashion-MNIST with the full train split and every K-th test image, as IDX files: benchmark runs whose evaluation
would otherwise dominate their time (a fake-quant ViT on 10,000 test images) evaluate on the subset.

    python bench/subset_data.py --every 5 --out /tmp/fmnist_every5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from metaaug.data.datasets import FASHION_MNIST_DIR
from metaaug.data.idx import find_idx, read_idx


def write_idx(path: Path, array: np.ndarray) -> None:
    magic = bytes([0, 0, 8, array.ndim])
    path.write_bytes(magic + np.array(array.shape, dtype=">i4").tobytes() + array.astype(np.uint8).tobytes())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        write_idx(a.out / name, read_idx(find_idx(FASHION_MNIST_DIR, name)))
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        write_idx(a.out / name, read_idx(find_idx(FASHION_MNIST_DIR, name))[:: a.every])
    print(a.out)


if __name__ == "__main__":
    main()
