"""Datasets: Fashion-MNIST IDX files, ImageNet-style image folders, calibration sampling."""

from metaaug.data.calib import calibration_split, only_classes, stratified_indices
from metaaug.data.checks import check_calibration, check_finite
from metaaug.data.datasets import ImageDataset, load_dataset

__all__ = ["ImageDataset", "calibration_split", "check_calibration", "check_finite", "load_dataset", "only_classes", "stratified_indices"]
