"""Shared fixtures: tiny models, small real data, a trained bundled model."""

from __future__ import annotations

from pathlib import Path

import metaaug  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads OpenMP)

# isort: split

import numpy as np
import pytest
import torch
from torch import nn

from metaaug.data import calibration_split, load_dataset
from metaaug.data.datasets import ImageDataset
from metaaug.models.registry import build_model


class TinyBlock(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))) + x)


TinyBlock.__name__ = "BasicBlock"  # recognised like torchvision's BasicBlock, by class name


class TinyNet(nn.Module):
    """Stem conv + two residual blocks + linear head: small enough for exact gradient checks."""

    def __init__(self, c: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.block1, self.block2 = TinyBlock(c), TinyBlock(c)
        self.fc = nn.Linear(c, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        x = self.block2(self.block1(x))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


@pytest.fixture
def tiny_net() -> TinyNet:
    torch.manual_seed(0)
    return randomize_bn(TinyNet())


@pytest.fixture(scope="session")
def fmnist_train() -> ImageDataset:
    return load_dataset(None, "train")


@pytest.fixture(scope="session")
def fmnist_test_small() -> ImageDataset:
    test = load_dataset(None, "test")
    return test.subset(torch.arange(0, len(test), 5))  # 2000 images: enough to separate methods, fast


@pytest.fixture(scope="session")
def calib256(fmnist_train: ImageDataset) -> ImageDataset:
    return calibration_split(fmnist_train, 256, seed=0)[0]


def _write_idx(path: Path, array: np.ndarray) -> None:
    magic = bytes([0, 0, 8, array.ndim])
    path.write_bytes(magic + np.array(array.shape, dtype=">i4").tobytes() + array.astype(np.uint8).tobytes())


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fashion-MNIST with every 10th test image (1000): keeps the run's own evaluations short."""
    from metaaug.data.datasets import FASHION_MNIST_DIR
    from metaaug.data.idx import find_idx, read_idx

    folder = tmp_path_factory.mktemp("fmnist_small")
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        src = find_idx(FASHION_MNIST_DIR, name)
        (folder / src.name).symlink_to(src)
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        _write_idx(folder / name, read_idx(find_idx(FASHION_MNIST_DIR, name))[::10])
    return folder


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first 600 train and 200 test images of Fashion-MNIST as IDX files: jobs run in subprocesses load it fast."""
    from metaaug.data.datasets import FASHION_MNIST_DIR
    from metaaug.data.idx import find_idx, read_idx

    folder = tmp_path_factory.mktemp("fmnist_tiny")
    for prefix, n in (("train", 600), ("t10k", 200)):
        for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
            _write_idx(folder / f"{prefix}-{kind}", read_idx(find_idx(FASHION_MNIST_DIR, f"{prefix}-{kind}"))[:n])
    return folder


@pytest.fixture(scope="session")
def resnet20() -> nn.Module:
    return build_model("resnet20")
