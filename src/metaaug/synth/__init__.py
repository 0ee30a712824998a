"""FDDA synthetic calibration data (Zhong et al., ECCV 2022): BN-statistics-aligned images from a class-conditional generator."""

from metaaug.synth.data import calibration_set, check_calib_source, load_synthetic
from metaaug.synth.fdda import FDDAConfig, SynthResult, save_synth, synthesize

__all__ = ["FDDAConfig", "SynthResult", "calibration_set", "check_calib_source", "load_synthetic", "save_synth", "synthesize"]
