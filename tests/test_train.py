"""The FP training script saves after every epoch and an interrupted run resumes to the uninterrupted result."""

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import metaaug.train as train_mod
from metaaug.data.datasets import ImageDataset
from metaaug.runs import Checkpoints


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, 2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))


@pytest.fixture
def tiny_setup(monkeypatch):
    g = torch.Generator().manual_seed(0)
    data = ImageDataset(torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g), [str(i) for i in range(10)])
    monkeypatch.setattr(train_mod, "load_dataset", lambda *_: data)
    monkeypatch.setitem(train_mod.BUNDLED, "tiny", tiny_model)


def test_interrupted_training_resumes_bit_exactly(tmp_path, tiny_setup, monkeypatch):
    full = train_mod.train("tiny", 3, 16, 0.1, 5e-4, 0, tmp_path / "full")
    calls = {"n": 0}
    real_top1 = train_mod.top1

    def dying_top1(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # dies during the second epoch's evaluation, after the first epoch was saved
            raise KeyboardInterrupt
        return real_top1(*args, **kwargs)

    monkeypatch.setattr(train_mod, "top1", dying_top1)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train("tiny", 3, 16, 0.1, 5e-4, 0, tmp_path / "resumed")
    assert (tmp_path / "resumed" / "tiny_train_progress.json").exists()
    monkeypatch.setattr(train_mod, "top1", real_top1)
    resumed = train_mod.train("tiny", 3, 16, 0.1, 5e-4, 0, tmp_path / "resumed")
    a, b = load_file(str(tmp_path / "full" / "tiny_fmnist.safetensors")), load_file(str(tmp_path / "resumed" / "tiny_fmnist.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["test_top1"] == full["test_top1"]
    assert not list((tmp_path / "resumed").glob("tiny_train_progress*"))
    with pytest.raises(Exception, match="another recipe"):
        Checkpoints(tmp_path / "resumed").save("tiny_train_progress", {"recipe": [1, 2, 3, 4, 5]})
        train_mod.train("tiny", 3, 16, 0.1, 5e-4, 0, tmp_path / "resumed")


def test_training_on_some_classes_names_them(tmp_path, tiny_setup):
    card = train_mod.train("tiny", 1, 4, 0.1, 5e-4, 0, tmp_path, classes=(0, 1, 2))
    assert card["classes"] == [0, 1, 2]
    assert (tmp_path / "tiny_fmnist_classes012.safetensors").exists()
    with pytest.raises(Exception, match="class 12 does not exist"):
        train_mod.train("tiny", 1, 4, 0.1, 5e-4, 0, tmp_path, classes=(0, 12))
