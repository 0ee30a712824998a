import gzip

import numpy as np
import pytest
import torch
from PIL import Image

from metaaug.data import calibration_split, load_dataset, stratified_indices
from metaaug.data.idx import read_idx
from metaaug.errors import DataError


def write_idx(path, arr: np.ndarray, gz: bool) -> None:
    code = {np.uint8: 0x08}[arr.dtype.type]
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data = header + arr.tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_folder_anywhere(tmp_path, gz):
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    for prefix, n in (("train", 30), ("t10k", 20)):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{sfx}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), gz)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{sfx}", (np.arange(n) % 10).astype(np.uint8), gz)
    ds = load_dataset(tmp_path, "test")
    assert ds.images.shape == (20, 1, 28, 28) and ds.labels.tolist() == [i % 10 for i in range(20)]
    raw = read_idx(tmp_path / f"t10k-images-idx3-ubyte{sfx}")
    assert torch.allclose(ds.images[3, 0], (torch.from_numpy(raw[3].astype(np.float32)) / 255 - 0.2860) / 0.3530)


def test_truncated_idx_is_reported(tmp_path):
    write_idx(tmp_path / "x", np.zeros((5, 4), dtype=np.uint8), gz=False)
    (tmp_path / "y").write_bytes((tmp_path / "x").read_bytes()[:-3])
    with pytest.raises(DataError, match="truncated"):
        read_idx(tmp_path / "y")


def test_image_folder_loader_keeps_size_and_channels(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("test", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                size = (36, 40) if i < 2 else (20, 20)  # one odd size: resized to the most common one
                arr = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(tmp_path / split / cls / f"{i}.png")
    ds = load_dataset(tmp_path, "train")
    assert ds.images.shape == (6, 3, 36, 40) and ds.classes == ["cat", "dog"]
    assert sorted(ds.labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert ds.info.channels == 3 and ds.info.size == (36, 40) and len(ds.info.mean) == 3
    per_channel = ds.images.transpose(0, 1).flatten(1)
    assert torch.allclose(per_channel.mean(1), torch.zeros(3), atol=1e-2) and torch.allclose(per_channel.std(1), torch.ones(3), atol=2e-2)
    test = load_dataset(tmp_path, "test")
    assert len(test) == 4 and test.info == ds.info  # normalised with the train split's statistics


def test_grey_image_folder_is_one_channel(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / "train" / cls).mkdir(parents=True)
        Image.fromarray(np.full((28, 28), 100, dtype=np.uint8), mode="L").save(tmp_path / "train" / cls / "x.png")
    assert load_dataset(tmp_path, "train").images.shape == (2, 1, 28, 28)


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_dataset(tmp_path / "nope", "train")
    with pytest.raises(DataError, match="neither IDX files"):
        load_dataset(tmp_path, "train")
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no images"):
        load_dataset(tmp_path, "train")


def test_stratified_sampling_is_balanced_and_reproducible():
    labels = torch.arange(1000) % 10
    a, b = stratified_indices(labels, 105, 3), stratified_indices(labels, 105, 3)
    assert torch.equal(a, b) and a.unique().numel() == 105
    counts = torch.bincount(labels[a], minlength=10)
    assert counts.max() - counts.min() <= 1
    assert not torch.equal(a, stratified_indices(labels, 105, 4))
    with pytest.raises(DataError, match="exceeds"):
        stratified_indices(labels, 1001, 0)


def test_holdout_split_is_disjoint_and_sized(fmnist_train):
    calib, hold = calibration_split(fmnist_train, 100, 0, holdout=0.2)
    assert len(calib) == 80 and len(hold) == 20
    flat = lambda ds: {tuple(x.flatten()[::37].tolist()) for x in ds.images}  # noqa: E731
    assert not flat(calib) & flat(hold)
