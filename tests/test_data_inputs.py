"""Inputs a user may bring: image folders whose splits lack a class, images in any PIL mode and bit depth, broken
IDX files, labels the model cannot score, and models on the meta device or in half/double precision. Each is loaded
right, warned about in one line, or refused in one line."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from typer.testing import CliRunner

from metaaug.cli.app import app
from metaaug.data import load_dataset, only_classes
from metaaug.data.checks import check_labels, check_model_fits_data, model_outputs
from metaaug.data.datasets import ImageDataset
from metaaug.data.idx import read_idx
from metaaug.errors import DataError, MetaAugWarning, ModelError
from metaaug.models.registry import build_model

runner = CliRunner()


def _save(img: Image.Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def _grey(rng: np.random.Generator, size: tuple[int, int] = (8, 8)) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8))


def _rgb(rng: np.random.Generator, size: tuple[int, int] = (8, 8)) -> Image.Image:
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def _folder(root: Path, layout: dict[str, dict[str, int]], make=_grey, seed: int = 0) -> Path:
    """`layout`: split -> class -> number of images (0: an empty class folder)."""
    rng = np.random.default_rng(seed)
    for split, classes in layout.items():
        for cls, n in classes.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                _save(make(rng), root / split / cls / f"{i}.png")
    return root


def _unnormalised(ds: ImageDataset) -> torch.Tensor:
    """The [0, 1] pixels back from the normalised images."""
    mean, std = torch.tensor(ds.info.mean).view(1, -1, 1, 1), torch.tensor(ds.info.std).view(1, -1, 1, 1)
    return ds.images * std + mean


# ---------------------------------------------------------------- classes mapped by name across splits


def test_test_split_missing_a_class_keeps_every_label(tmp_path):
    root = _folder(tmp_path, {"train": {"ant": 2, "bee": 2, "cat": 2, "dog": 2}, "test": {"ant": 1, "cat": 2, "dog": 1}})
    train = load_dataset(root, "train")
    assert train.classes == ["ant", "bee", "cat", "dog"] and train.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.warns(MetaAugWarning, match=r"test has no images of class 'bee' \(index 1\)") as rec:
        test = load_dataset(root, "test")
    assert len(rec) == 1
    assert test.classes == ["ant", "bee", "cat", "dog"] and test.labels.tolist() == [0, 2, 2, 3]  # not [0, 1, 1, 2]


def test_train_split_missing_a_class_and_val_split(tmp_path):
    root = _folder(tmp_path, {"train": {"a": 2, "c": 2}, "val": {"a": 1, "b": 1, "c": 1}})
    with pytest.warns(MetaAugWarning, match=r"train has no images of class 'b' \(index 1\)"):
        train = load_dataset(root, "train")
    assert train.classes == ["a", "b", "c"] and train.labels.tolist() == [0, 0, 2, 2]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        test = load_dataset(root, "test")  # val/ stands in for test/, nothing missing: no warning
    assert test.classes == ["a", "b", "c"] and test.labels.tolist() == [0, 1, 2]


def test_empty_class_folder_is_reported_and_keeps_its_index(tmp_path):
    root = _folder(tmp_path, {"train": {"a": 1, "b": 1, "c": 1}, "test": {"a": 1, "b": 0, "c": 1}})
    with pytest.warns(MetaAugWarning, match="'b'"):
        assert load_dataset(root, "test").labels.tolist() == [0, 2]


# ---------------------------------------------------------------- every PIL mode, 8-bit data unchanged


def _old_read(f: Path, channels: int, size: tuple[int, int]) -> np.ndarray:
    """The loader before this change (kept here as the reference for 8-bit images)."""
    with Image.open(f) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        if (im.height, im.width) != size:
            im = im.resize((size[1], size[0]))
        arr = np.asarray(im, dtype=np.uint8)
    return arr[..., None] if channels == 1 else arr


def _old_split(split_dir: Path, channels: int, size: tuple[int, int], mean=None, std=None):
    files = sorted(f for d in sorted(p for p in split_dir.iterdir() if p.is_dir()) for f in d.iterdir())
    stack = np.stack([_old_read(f, channels, size) for f in files])
    if mean is None:
        px = torch.from_numpy(stack.astype(np.float32) / 255.0).reshape(-1, channels)
        mean = tuple(round(float(v), 4) for v in px.mean(0))
        std = tuple(round(float(v), 4) for v in px.std(0).clamp(min=1e-3))
    x = torch.from_numpy(stack.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
    return torch.stack([(x[:, c] - m) / sd for c, (m, sd) in enumerate(zip(mean, std, strict=True))], 1), mean, std


def _eight_bit_images(rng: np.random.Generator, colour: bool) -> list[Image.Image]:
    grey = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    pal = Image.fromarray(grey // 64).convert("P")
    pal.putpalette([v for i in range(256) for v in ((i * 80 % 256, i * 80 % 256, i * 80 % 256) if not colour else (i * 80 % 256, 30, 200))])
    imgs = [Image.fromarray(grey), Image.fromarray(grey > 128), Image.fromarray(np.stack([grey, grey // 2], -1)),
            pal, _grey(rng, (6, 10))]  # an odd size: resized to the most common one
    if colour:
        imgs += [_rgb(rng), Image.fromarray(rng.integers(0, 256, (8, 8, 4), dtype=np.uint8))]
    return imgs


@pytest.mark.parametrize("colour", [False, True])
def test_eight_bit_folder_is_bit_identical_to_the_old_loader(tmp_path, colour):
    rng = np.random.default_rng(1)
    for split in ("train", "test"):
        for cls in ("x", "y"):
            for i, im in enumerate(_eight_bit_images(rng, colour)):
                _save(im, tmp_path / split / cls / f"{i}.png")
    train, test = load_dataset(tmp_path, "train"), load_dataset(tmp_path, "test")
    channels = 3 if colour else 1
    assert train.info.channels == channels and train.info.size == (8, 8)
    old_train, mean, std = _old_split(tmp_path / "train", channels, (8, 8))
    old_test, _, _ = _old_split(tmp_path / "test", channels, (8, 8), mean, std)
    assert train.info.mean == mean and train.info.std == std
    assert torch.equal(train.images, old_train) and torch.equal(test.images, old_test)


def test_one_rgb_image_among_grey_makes_the_folder_rgb(tmp_path):
    root = _folder(tmp_path, {"train": {"a": 3, "b": 3}})
    _save(Image.new("RGB", (8, 8), (250, 10, 10)), root / "train" / "b" / "red.png")
    ds = load_dataset(root, "train")
    px = _unnormalised(ds)
    assert ds.images.shape == (7, 3, 8, 8)
    assert torch.allclose(px[0, 0], px[0, 1], atol=1e-5) and torch.allclose(px[0, 1], px[0, 2], atol=1e-5)  # grey: R = G = B
    assert torch.allclose(px[-1, :, 0, 0], torch.tensor([250, 10, 10]) / 255, atol=1e-5)  # the red one stays red


def test_one_grey_image_among_rgb_is_replicated(tmp_path):
    root = _folder(tmp_path, {"train": {"a": 3, "b": 3}}, make=_rgb)
    grey = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    _save(Image.fromarray(grey), root / "train" / "a" / "grey.png")
    ds = load_dataset(root, "train")
    assert ds.info.channels == 3
    px = _unnormalised(ds)[3]  # a/grey.png sorts after a/0..2.png
    for c in range(3):
        assert torch.allclose(px[c], torch.from_numpy(grey.astype(np.float32) / 255), atol=1e-5)


def test_sixteen_bit_grey_folder_scales_instead_of_clipping(tmp_path):
    values = np.array([[0, 1, 257, 1000], [4096, 30000, 65534, 65535]], dtype=np.uint16)
    for split in ("train", "test"):
        for cls in ("a", "b"):
            for i in range(2):
                _save(Image.fromarray(values if i == 0 else values[::-1].copy()), tmp_path / split / cls / f"{i}.png")
    assert Image.open(tmp_path / "train" / "a" / "0.png").mode == "I;16"
    ds = load_dataset(tmp_path, "test")
    expected = (values.astype(np.float64) / 65535).astype(np.float32)
    m, s = ds.info.mean[0], ds.info.std[0]
    assert ds.info.channels == 1 and ds.images.shape == (4, 1, 2, 4)
    assert torch.equal(ds.images[0, 0], (torch.from_numpy(expected) - m) / s)  # value / 65535, then normalised
    px = _unnormalised(ds)[0, 0]
    assert abs(float(px[0, 3]) - 1000 / 65535) < 1e-6 and abs(float(px[0, 2]) - 257 / 65535) < 1e-6  # 8-bit clipping gave 1.0
    assert abs(m - float(expected.mean())) < 1e-4  # statistics from the scaled values too


def _mode_image(mode: str, rng: np.random.Generator) -> tuple[Image.Image, str]:
    """An 8x8 image of `mode` and the suffix of a format that keeps it."""
    grey, rgb = rng.integers(0, 256, (8, 8), dtype=np.uint8), rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    if mode == "P+transparency":
        im = Image.fromarray(rgb).convert("P")
        im.info["transparency"] = 0
        return im, ".png"
    if mode == "I;16":
        return Image.fromarray(grey.astype(np.uint16) * 257), ".png"
    if mode == "I;16B":
        return Image.fromarray((grey.astype(np.uint16) * 257).astype(">u2")), ".tif"
    if mode == "I":
        return Image.fromarray(grey.astype(np.int32) * 8_000_000), ".tif"
    if mode == "F":
        return Image.fromarray(grey.astype(np.float32) / 255), ".tif"
    base = Image.fromarray(rgb)
    return base.convert(mode), ".tif" if mode in ("CMYK", "YCbCr") else ".png"


MODES = ["1", "L", "LA", "P", "P+transparency", "RGB", "RGBA", "CMYK", "YCbCr", "I;16", "I;16B", "I", "F"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("others", ["grey", "rgb"])
def test_every_mode_converts_to_the_folder_channels(tmp_path, mode, others):
    rng = np.random.default_rng(2)
    _folder(tmp_path, {"train": {"a": 2, "b": 2}}, make=_grey if others == "grey" else _rgb)
    img, suffix = _mode_image(mode, rng)
    path = _save(img, tmp_path / "train" / "b" / f"odd{suffix}")
    with Image.open(path) as back:
        assert back.mode == mode.split("+")[0]
    ds = load_dataset(tmp_path, "train")
    grey_mode = mode in ("1", "L", "LA", "I;16", "I;16B", "I", "F")
    assert ds.info.channels == (1 if others == "grey" and grey_mode else 3)
    px = _unnormalised(ds)
    assert ds.images.shape == (5, ds.info.channels, 8, 8) and bool(torch.isfinite(ds.images).all())
    assert float(px.min()) > -1e-4 and float(px.max()) < 1 + 1e-4
    if mode in ("I;16", "I;16B", "I", "F"):  # the same picture as its 8-bit source, at full precision
        source = np.asarray(img, dtype=np.float64)
        top = {"I;16": 65535, "I;16B": 65535, "I": 2**31 - 1, "F": 1.0}[mode]
        assert torch.allclose(px[4, 0].double(), torch.from_numpy(source / top), atol=1e-4)  # b/odd sorts last


def test_float_image_outside_unit_range_is_refused(tmp_path):
    _folder(tmp_path, {"train": {"a": 2}})
    _save(Image.fromarray(np.full((8, 8), 200.0, dtype=np.float32)), tmp_path / "train" / "a" / "f.tif")
    with pytest.raises(DataError, match=r"f\.tif holds values in \[200, 200\]"):
        load_dataset(tmp_path, "train")


def test_undecodable_image_is_one_data_error(tmp_path):
    _folder(tmp_path, {"train": {"a": 2}})
    (tmp_path / "train" / "a" / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(DataError, match=r"cannot read image .*junk\.png"):
        load_dataset(tmp_path, "train")


def test_truncated_image_is_one_data_error(tmp_path):
    _folder(tmp_path, {"train": {"a": 2}})
    good = _save(_rgb(np.random.default_rng(0), (64, 64)), tmp_path / "x.png").read_bytes()
    (tmp_path / "train" / "a" / "cut.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match=r"cut\.png"):
        load_dataset(tmp_path, "train")


def test_any_exception_while_converting_is_one_data_error(tmp_path, monkeypatch):
    _folder(tmp_path, {"train": {"a": 2}})

    def broken(self, *args, **kwargs):
        raise RuntimeError("decoder exploded")
    monkeypatch.setattr(Image.Image, "convert", broken)
    with pytest.raises(DataError, match=r"cannot read image .*0\.png: RuntimeError: decoder exploded"):
        load_dataset(tmp_path, "train")


# ---------------------------------------------------------------- IDX files


def _idx(path: Path, arr: np.ndarray, code: int = 0x08) -> Path:
    dtype = {0x08: np.uint8, 0x09: np.int8, 0x0D: ">f4"}[code]
    path.write_bytes(bytes([0, 0, code, arr.ndim]) + np.array(arr.shape, dtype=">i4").tobytes() + arr.astype(dtype).tobytes())
    return path


def _idx_pair(folder: Path, n_train: int = 6, n_test: int = 4, test_labels: np.ndarray | None = None, code: int = 0x08) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    _idx(folder / "train-images-idx3-ubyte", rng.integers(0, 256, (n_train, 4, 4)))
    _idx(folder / "train-labels-idx1-ubyte", np.arange(n_train) % 3)
    _idx(folder / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 4, 4)))
    _idx(folder / "t10k-labels-idx1-ubyte", np.arange(n_test) % 3 if test_labels is None else test_labels, code)
    return folder


def test_idx_labels_are_class_indices_of_both_splits(tmp_path):
    ds = load_dataset(_idx_pair(tmp_path, test_labels=np.array([0, 1, 1, 0])), "test")
    assert ds.labels.tolist() == [0, 1, 1, 0] and ds.classes == ["0", "1", "2"]  # class 2 from the train labels


def test_ten_byte_idx_file(tmp_path):
    (tmp_path / "ten").write_bytes(bytes([0, 0, 8, 3, 0, 0, 0, 5, 0, 0]))
    with pytest.raises(DataError, match="promises 3 dimensions but the file ends after 10 bytes"):
        read_idx(tmp_path / "ten")


def test_idx_header_promising_more_than_the_file_holds(tmp_path):
    raw = bytes([0, 0, 8, 3]) + np.array([100, 28, 28], dtype=">i4").tobytes() + bytes(50)
    (tmp_path / "short").write_bytes(raw)
    with pytest.raises(DataError, match=r"header says \[100, 28, 28\] \(78400 data bytes\) but the file holds 50"):
        read_idx(tmp_path / "short")


def test_idx_with_no_images_is_refused(tmp_path):
    _idx_pair(tmp_path, n_test=0, test_labels=np.zeros(0))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte: no images"):
        load_dataset(tmp_path, "test")


def test_negative_idx_labels_are_refused(tmp_path):
    _idx_pair(tmp_path, test_labels=np.array([0, -1, 1, 2]), code=0x09)
    with pytest.raises(DataError, match="label -1 is negative"):
        load_dataset(tmp_path, "test")


def test_fractional_idx_labels_are_refused(tmp_path):
    _idx_pair(tmp_path, test_labels=np.array([0, 1.5, 1, 2]), code=0x0D)
    with pytest.raises(DataError, match=r"label 1\.5 is not a class index"):
        load_dataset(tmp_path, "test")


def test_image_file_given_as_labels_is_refused(tmp_path):
    _idx_pair(tmp_path)
    _idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros((4, 4, 4)))
    with pytest.raises(DataError, match=r"one number per image, but its header gives shape \[4, 4, 4\]"):
        load_dataset(tmp_path, "test")


def test_idx_images_and_labels_must_pair(tmp_path):
    _idx_pair(tmp_path, test_labels=np.array([0, 1, 2]))
    with pytest.raises(DataError, match="4 t10k images in t10k-images-idx3-ubyte but 3 labels"):
        load_dataset(tmp_path, "test")


# ---------------------------------------------------------------- labels against the model's outputs


def _ds(labels: list[int], classes: int) -> ImageDataset:
    return ImageDataset(torch.zeros(len(labels), 1, 4, 4), torch.tensor(labels), [str(i) for i in range(classes)])


def test_labels_beyond_the_outputs_are_refused():
    with pytest.raises(DataError, match="test: labels go up to 200 but the model has 10 outputs"):
        check_labels(_ds([0, 3, 200], 201), 10, "test")
    with pytest.raises(DataError, match="label -2 is negative"):
        check_labels(_ds([0, -2], 2), 10, "test")


def test_more_classes_than_outputs_is_refused():
    with pytest.raises(DataError, match="12 classes in /data/x but the model has 10 outputs"):
        check_labels(_ds([0, 1, 2], 12), 10, "/data/x")


def test_more_outputs_than_classes_warns_once():
    with pytest.warns(MetaAugWarning, match="the model has 1000 outputs but .* has 10 classes; top-1 counts only") as rec:
        check_labels(_ds(list(range(10)), 10), 1000, "train")
    assert len(rec) == 1
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 1000))
    with pytest.warns(MetaAugWarning) as rec:
        check_model_fits_data(model, "/data/x", train=_ds(list(range(10)), 10), test=_ds(list(range(10)), 10))
    assert [str(w.message).split(";")[0] for w in rec] == ["the model has 1000 outputs but the data in /data/x has 10 classes"]


def test_a_subset_of_classes_does_not_warn():
    seen = only_classes(_ds([0, 1, 2, 3, 4, 5, 6, 7, 8, 9] * 2, 10), (0, 1, 2))
    assert seen.labels.max() == 2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_labels(seen, 10, "train")


class _Tuple(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(x.flatten(1)), x


def test_model_outputs():
    assert model_outputs(nn.Sequential(nn.Flatten(), nn.Linear(16, 7)), torch.zeros(1, 4, 4)) == 7
    assert model_outputs(_Tuple(), torch.zeros(2, 1, 4, 4)) == 3  # the output rule: a tuple's first item is the logits
    with pytest.raises(ModelError, match=r"output for one image has shape \(1, 2, 4, 4\)"):
        model_outputs(nn.Conv2d(1, 2, 1), torch.zeros(1, 1, 4, 4))
    with pytest.raises(ModelError, match=r"fails on one \(1, 4, 4\) image of the data: RuntimeError"):
        model_outputs(nn.Conv2d(3, 2, 1), torch.zeros(1, 1, 4, 4))  # a 3-channel model on grey data
    bn = nn.Sequential(nn.Flatten(), nn.Linear(16, 4), nn.BatchNorm1d(4)).train()
    assert model_outputs(bn, torch.zeros(1, 4, 4)) == 4 and bn.training  # one image through BatchNorm: eval, then restored


# ---------------------------------------------------------------- models: meta device, half and double precision


NET = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self, k, c=1):
        super().__init__()
        self.conv = nn.Conv2d(c, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, k)

    def forward(self, x):
        x = torch.relu(self.bn(self.conv(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def build():
    torch.manual_seed(0)
    return Net(K)


def build_half():
    return build().half()


def build_double():
    return build().double()


def build_meta():
    with torch.device("meta"):
        return Net(K)
'''


def _user_model(folder: Path, k: int) -> tuple[Path, Path]:
    """A tiny Conv+BN+Linear model file with `k` outputs and its safetensors weights."""
    py = folder / f"net{k}.py"
    py.write_text(NET.replace("Net(K)", f"Net({k})"))
    ns: dict = {}
    exec(py.read_text(), ns)
    w = folder / f"net{k}.safetensors"
    save_file(ns["build"]().state_dict(), str(w))
    return py, w


@pytest.mark.parametrize(("factory", "dtype"), [("build_half", "float16"), ("build_double", "float64")])
def test_half_and_double_models_become_float32(tmp_path, factory, dtype):
    py, w = _user_model(tmp_path, 3)
    with pytest.warns(MetaAugWarning, match=f"weights are {dtype}; converted to float32") as rec:
        model = build_model(f"{py}:{factory}", w)
    assert len([r for r in rec if issubclass(r.category, MetaAugWarning)]) == 1
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.bn.num_batches_tracked.dtype == torch.int64 and model.bn.running_var.dtype == torch.float32
    exact = build_model(f"{py}:build", w)
    assert torch.equal(model.conv.weight, exact.conv.weight)  # loaded after the conversion: not rounded through float16


def test_meta_model_is_refused(tmp_path):
    py, w = _user_model(tmp_path, 3)
    with pytest.raises(ModelError, match="is on the meta device"):
        build_model(f"{py}:build_meta", w)


def test_python_api_checks_the_model(tmp_path):
    import metaaug

    ns: dict = {}
    exec(NET.replace("Net(K)", "Net(3)"), ns)
    images = torch.randn(8, 1, 8, 8)
    with pytest.raises(ModelError, match="meta device"):
        metaaug.quantize(ns["build_meta"](), images, "rtn", device="cpu")
    half = ns["build_half"]()
    with pytest.warns(MetaAugWarning, match="float16; converted to float32"):
        q = metaaug.quantize(half, images, "rtn", device="cpu")
    assert q(images).dtype == torch.float32 and next(half.parameters()).dtype == torch.float16  # the caller's model untouched


# ---------------------------------------------------------------- through the CLI: one line, exit code 2


def _quantize(tmp_path: Path, folder: Path, k: int):
    py, w = _user_model(tmp_path, k)
    return runner.invoke(app, ["quantize", "--method", "rtn", "--calib-size", "8", "--iters", "0", "--device", "cpu",
                               "--data-dir", str(folder), "--model", f"{py}:build", "--weights", str(w),
                               "--out", str(tmp_path / f"run{k}")])


def _error_lines(output: str) -> list[str]:
    assert "Traceback" not in output
    return [line for line in output.splitlines() if line.startswith("error:")]


def test_cli_class_missing_from_train(tmp_path):
    folder = _folder(tmp_path / "data", {"train": {"a": 4, "c": 4}, "test": {"a": 2, "b": 2, "c": 2}})
    res = _quantize(tmp_path, folder, 2)  # a model of the two train classes: the data has three
    assert res.exit_code == 2, res.output
    assert _error_lines(res.output) == [f"error: 3 classes in {folder} (train) but the model has 2 outputs"]
    assert f"warning: {folder / 'train'} has no images of class 'b' (index 1)" in res.output


def test_cli_class_missing_from_train_runs_when_the_model_has_every_class(tmp_path):
    folder = _folder(tmp_path / "data", {"train": {"a": 4, "c": 4}, "test": {"a": 2, "b": 2, "c": 2}})
    res = _quantize(tmp_path, folder, 3)
    assert res.exit_code == 0, res.output
    assert _error_lines(res.output) == [] and res.output.count("has no images of class 'b'") == 1


def test_cli_twelve_class_folder_on_a_ten_output_model(tmp_path):
    folder = _folder(tmp_path / "data", {split: {f"c{i:02d}": 1 for i in range(12)} for split in ("train", "test")})
    res = _quantize(tmp_path, folder, 10)
    assert res.exit_code == 2, res.output
    assert _error_lines(res.output) == [f"error: 12 classes in {folder} (train) but the model has 10 outputs"]


def test_cli_idx_labels_beyond_the_outputs(tmp_path):
    folder = _idx_pair(tmp_path / "data", n_train=8, test_labels=np.array([0, 1, 200, 2]))
    res = _quantize(tmp_path, folder, 3)
    assert res.exit_code == 2, res.output
    assert _error_lines(res.output) == [f"error: {folder} (test): labels go up to 200 but the model has 3 outputs"]
