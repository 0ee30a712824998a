"""Per-layer bit-widths (mixed precision): a policy maps each quantized layer to its weight bits and the bits of
the activation it reads. Stored as `policy.json`: `{"layers": {"<module path>": {"wbits": b, "abits": a}, ...}}`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metaaug.config_check import shown
from metaaug.errors import ConfigError
from metaaug.quant.quantizers import check_bits


@dataclass(frozen=True)
class LayerBits:
    wbits: int
    abits: int


@dataclass(frozen=True)
class Policy:
    """Bits per quantized layer, keyed by the layer's module path in the original model.

    `abits` is the bit-width of the layer's input activation; layers that read the same tensor share its quantizer
    and so must agree. The first layer reads the raw image, which is not quantized: its `abits` is not used.
    """

    layers: Mapping[str, LayerBits] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.layers:
            raise ConfigError("a bit-width policy must list at least one layer")
        fixed = {}
        for name, bits in self.layers.items():
            if not isinstance(name, str):
                raise ConfigError(f"policy layer names must be module paths (strings), got {shown(name)}")
            if isinstance(bits, Mapping):
                unknown = sorted(set(bits) - {"wbits", "abits"}, key=str)
                if unknown or not {"wbits", "abits"} <= set(bits):
                    raise ConfigError(f"policy entry for {name!r} must be {{\"wbits\": b, \"abits\": a}}, got {shown(dict(bits))}")
                bits = LayerBits(bits["wbits"], bits["abits"])
            elif not isinstance(bits, LayerBits):
                raise ConfigError(f"policy entry for {name!r} must be {{\"wbits\": b, \"abits\": a}}, got {shown(bits)}")
            check_bits(bits.wbits, f"policy wbits of layer {name!r}")
            check_bits(bits.abits, f"policy abits of layer {name!r}")
            fixed[name] = bits
        object.__setattr__(self, "layers", fixed)

    @classmethod
    def uniform(cls, layer_names: Iterable[str], wbits: int, abits: int, first: str | None = None, last: str | None = None,
                first_last_bits: int = 8) -> Policy:
        """Every layer at W`wbits`A`abits`, the first and last at `first_last_bits` (the QDrop setting)."""
        out = {}
        for name in layer_names:
            edge = name in (first, last)
            out[name] = LayerBits(first_last_bits if edge else wbits, first_last_bits if name == last else abits)
        return cls(out)

    def to_dict(self) -> dict[str, Any]:
        return {"layers": {k: {"wbits": v.wbits, "abits": v.abits} for k, v in self.layers.items()}}

    @classmethod
    def from_dict(cls, data: Any, source: str = "policy") -> Policy:
        """A policy from its JSON form: "layers", and optionally "written_by" (the command that wrote the file)."""
        if not isinstance(data, Mapping) or not isinstance(data.get("layers"), Mapping):
            raise ConfigError(f"{source} must be a JSON object {{\"layers\": {{\"<module path>\": {{\"wbits\": b, \"abits\": a}}}}}}")
        unknown = sorted(set(data) - {"layers", "written_by"}, key=str)
        if unknown:
            raise ConfigError(f"{source} has an unknown key {shown(unknown[0])}; a policy holds \"layers\" and optionally \"written_by\"")
        if not isinstance(data.get("written_by", ""), str):
            raise ConfigError(f"{source}: \"written_by\" must be a string, got {shown(data['written_by'])}")
        return cls(dict(data["layers"]))

    def save(self, path: str | Path, written_by: str | None = None) -> None:
        """Write policy.json atomically; `written_by` marks the command that wrote it (so it may replace it later)."""
        from metaaug.runs.files import write_json

        write_json(path, {**self.to_dict(), **({"written_by": written_by} if written_by else {})})

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Read policy.json: UTF-8 JSON only, no key repeated (JSON would keep the last one silently)."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"policy file {path} does not exist")

        def no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
            seen: dict[str, Any] = {}
            for key, value in pairs:
                if key in seen:
                    raise ConfigError(f"policy file {path} gives the key {shown(key)} twice; give each key once")
                seen[key] = value
            return seen

        try:
            data = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=no_repeats)
        except OSError as exc:
            raise ConfigError(f"cannot read policy file {path}: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"policy file {path} is not UTF-8 text (a policy is a UTF-8 JSON file)") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"policy file {path} is not valid JSON: {exc.msg} (line {exc.lineno})") from None
        except RecursionError:
            raise ConfigError(f"policy file {path} is not a policy: its JSON nests too deeply") from None
        return cls.from_dict(data, f"policy file {path}")

    def check_layers(self, layer_names: list[str]) -> None:
        """Every quantized layer of the model listed, and nothing else."""
        unknown = [n for n in self.layers if n not in layer_names]
        if unknown:
            raise ConfigError(f"policy names layer {unknown[0]!r}, which is not a quantized layer of the model "
                              f"(layers: {', '.join(layer_names[:4])}, ...)")
        missing = [n for n in layer_names if n not in self.layers]
        if missing:
            raise ConfigError(f"policy has no bits for layer {missing[0]!r} ({len(missing)} layer(s) missing)")

    def average_wbits(self, params: Mapping[str, int]) -> float:
        """Weight bits averaged over the layers, weighted by their parameter counts."""
        total = sum(params[n] for n in self.layers)
        return sum(self.layers[n].wbits * params[n] for n in self.layers) / total
