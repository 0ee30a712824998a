"""Bundled models (trained here, shipped as safetensors) and loading of users' own models."""

from metaaug.models.registry import BUNDLED, build_model, load_weights

__all__ = ["BUNDLED", "build_model", "load_weights"]
