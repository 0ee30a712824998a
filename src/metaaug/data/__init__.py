"""Datasets: Fashion-MNIST IDX files, ImageNet-style image folders, calibration sampling."""

from metaaug.data.calib import calibration_split, stratified_indices
from metaaug.data.datasets import ImageDataset, load_dataset

__all__ = ["ImageDataset", "calibration_split", "load_dataset", "stratified_indices"]
