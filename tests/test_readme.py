"""The README's Python example runs as written and gives a working quantized model."""

import re
from pathlib import Path

import torch

from metaaug.evaluate import top1
from metaaug.quant import QuantModel

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_snippet_runs_as_written(fmnist_test_small):
    text = README.read_text()
    api = text[text.index("## Python API"):]
    snippet = re.search(r"```python\n(.*?)```", api, re.S).group(1)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    assert isinstance(scope["qmodel"], QuantModel) and not hasattr(scope["qmodel"], "engine")
    assert scope["logits"].shape == (8, 10) and torch.isfinite(scope["logits"]).all()
    # W2A4 round-to-nearest scores ~68 %; 200 QDrop iterations per unit must already be far above it
    assert top1(scope["qmodel"], fmnist_test_small) > 88.0
