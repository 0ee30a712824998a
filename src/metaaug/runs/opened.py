"""`open_run`: the finished run behind `eval --run`, `export --run` and `fewshot --run`, whatever job wrote it.

A quantize run holds one quantized width; a QAT run holds every width (`--bits` picks one). Both give the same view:
the fake-quant model and what a packed file records of it (method, spec, units, reference top-1, data folder).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from metaaug.errors import ConfigError
from metaaug.quant.prepare import QuantModel
from metaaug.runs.folder import RunFolder


@dataclass
class OpenedRun:
    folder: RunFolder

    @property
    def kind(self) -> str:
        return self.folder.kind

    def check_bits(self, bits: str | None) -> tuple[int, int] | None:
        """The width `--bits` names, checked before anything is loaded: QAT runs need one, quantize runs take none."""
        from metaaug.qat.job import parse_width

        if self.kind == "qat":
            if bits is None:
                raise ConfigError(f"{self.folder.path} is a QAT run: give the width with --bits (e.g. --bits 4)")
            return parse_width(bits)
        if bits is not None:
            raise ConfigError(f"{self.folder.path} is not a QAT run: --bits applies to QAT run folders only "
                              "(a quantize run holds one width)")
        return None

    def view(self, bits: str | None, device: str = "cpu") -> tuple[QuantModel, dict[str, Any]]:
        """The quantized model (at `bits` for a QAT run) and its metadata: model, method, spec, units, weights,
        data_dir and `extra` (quant_top1 and fp_top1 as the run reported them, None where it has no value)."""
        width = self.check_bits(bits)
        if width is not None:
            from metaaug.qat.job import export_view

            return export_view(self.folder.path, width, device)
        from metaaug.pipeline import load_run

        qmodel, cfg, report = load_run(self.folder.path, device)
        units = cfg.units if cfg.units is not None else cfg.method_cfg().units
        extra = {"quant_top1": report.get("quant_top1"), "fp_top1": report.get("fp_top1"), "data_dir": cfg.data_dir,
                 "wbits": cfg.wbits, "abits": cfg.abits}
        return qmodel, {"model": cfg.model, "method": cfg.method, "spec": asdict(cfg.spec()), "units": units,
                        "extra": extra, "weights": cfg.weights, "data_dir": cfg.data_dir}


def open_run(path: str | Path, purpose: str, kinds: tuple[str, ...] = ("quantize", "qat")) -> OpenedRun:
    """The run folder at `path` if it is one of `kinds`; any other folder is one line saying what it is."""
    return OpenedRun(RunFolder.open(path, kinds, purpose))
