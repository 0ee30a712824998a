"""Time the released QDrop code's own reconstruction loop (github.com/wimh966/QDrop, `qdrop/solver/recon.py`) on
ResNet-18 units at 224x224, batch 32, for the ms/iteration comparison of issue #32. Run by released_qdrop.sh in its
own venv beside a checkout of that repository (never vendored); nothing here is QDrop's code.

    python bench/imagenet/released_qdrop.py --qdrop /tmp/qdrop-released/src --calib 64 --iters 2,12 --out OUT.json

QDrop's model (its torchvision-style `resnet18`, random init: time depends on shapes only), its BN folding, its
`quantize_model` with its W2A4 ResNet-18 config's quantizers at 4-bit weights (AdaRound + MSE observer, LSQ
activations + MSE observer, drop_prob 0.5), its calibration order, then its `reconstruction()` on a copy of the
calibrated model per unit at two iteration counts: ms/iteration is the difference of the two wall times over the
difference of the counts, so the caching both calls do cancels. On a CPU-only machine `Tensor.cuda` is made the
identity and `torchvision` (imported by its data helpers, unused here) is stubbed.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import types
from pathlib import Path

import torch


def shim(qdrop: Path) -> None:
    """Make the released code importable on this machine without changing it."""
    for name in ("torchvision", "torchvision.transforms", "torchvision.datasets"):
        sys.modules.setdefault(name, types.ModuleType(name))
    if not torch.cuda.is_available():
        torch.Tensor.cuda = lambda self, *a, **k: self
        torch.nn.Module.cuda = lambda self, *a, **k: self
    sys.path[:0] = [str(qdrop), str(qdrop / "qdrop" / "solver")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--qdrop", type=Path, required=True, help="a checkout of wimh966/QDrop")
    p.add_argument("--calib", type=int, default=64)
    p.add_argument("--iters", default="2,12", help="two iteration counts, e.g. 2,12")
    p.add_argument("--units", default="layer1.0,layer2.0,layer3.0,layer4.0")
    p.add_argument("--wbits", type=int, default=4)
    p.add_argument("--abits", type=int, default=4)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    shim(a.qdrop)
    from easydict import EasyDict
    from fold_bn import search_fold_and_remove_bn
    from main_imagenet import quantize_model
    from qdrop.model import resnet18
    from qdrop.quantization.state import disable_all, enable_calibration_woquantization, enable_quantization
    from recon import reconstruction

    torch.manual_seed(0)
    n1, n2 = (int(v) for v in a.iters.split(","))
    quant = EasyDict({
        "a_qconfig": {"quantizer": "LSQFakeQuantize", "observer": "MSEObserver", "bit": a.abits, "symmetric": False,
                      "ch_axis": -1},
        "w_qconfig": {"quantizer": "AdaRoundFakeQuantize", "observer": "MSEObserver", "bit": a.wbits,
                      "symmetric": False, "ch_axis": 0}})
    recon = {"batch_size": 32, "scale_lr": 4.0e-5, "warm_up": 0.2, "weight": 0.01, "b_range": [20, 2],
             "keep_gpu": True, "round_mode": "learned_hard_sigmoid", "drop_prob": 0.5}
    model = resnet18(num_classes=1000).eval()
    search_fold_and_remove_bn(model)
    model = quantize_model(model, quant).eval()
    fp_model = copy.deepcopy(model)
    disable_all(fp_model)
    data = torch.randn(a.calib, 3, 224, 224)
    start = time.perf_counter()
    with torch.no_grad():
        enable_calibration_woquantization(model, quantizer_type="act_fake_quant")
        model(data[:256])
        enable_calibration_woquantization(model, quantizer_type="weight_fake_quant")
        model(data[:2])
    calibrate_s = time.perf_counter() - start
    enable_quantization(model)
    rows = []
    for unit in a.units.split(","):
        seconds = []
        for iters in (n1, n2):
            m = copy.deepcopy(model)
            cfg = EasyDict({**recon, "iters": iters})
            start = time.perf_counter()
            reconstruction(m, fp_model, m.get_submodule(unit), fp_model.get_submodule(unit), data, cfg)
            seconds.append(time.perf_counter() - start)
        rows.append({"unit": unit, "ms_per_iter": round((seconds[1] - seconds[0]) / (n2 - n1) * 1000, 1),
                     "seconds": [round(s, 2) for s in seconds]})
        print(json.dumps(rows[-1]), flush=True)
    a.out.write_text(json.dumps({"code": "wimh966/QDrop", "calib_size": a.calib, "iters": [n1, n2],
                                 "wbits": a.wbits, "abits": a.abits, "threads": torch.get_num_threads(),
                                 "torch": torch.__version__, "calibrate_s": round(calibrate_s, 1), "units": rows},
                                indent=2) + "\n")


if __name__ == "__main__":
    main()
