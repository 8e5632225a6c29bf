"""MNIST as training arrays: pixels scaled to [0, 1], the first N images of a split."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deepnet.data.mnist import ensure_mnist
from deepnet.errors import ConfigError
from deepnet.formats.idx import load_mnist


def mnist_inputs(images: np.ndarray) -> np.ndarray:
    """Pixels (n, 28, 28) uint8 -> (n, 784) float32 in [0, 1] (x = pixels / 255)."""
    return images.reshape(images.shape[0], -1).astype(np.float32) / np.float32(255.0)


def load_split(data_dir: str | Path | None, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The raw images and labels of the ``train`` or ``test`` split (fetched first if missing)."""
    return load_mnist(ensure_mnist(data_dir), split)


def check_count(flag: str, value: int, available: int) -> None:
    """Refuse a count of images outside 1..available, naming ``--flag``."""
    if not 1 <= value <= available:
        raise ConfigError(f"--{flag} must be in 1..{available}, got {value}")


def load_training_set(data_dir: str | Path | None, train_limit: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``train_limit`` training images as inputs, and their labels."""
    images, labels = load_split(data_dir, "train")
    check_count("train-limit", train_limit, images.shape[0])
    return mnist_inputs(images[:train_limit]), labels[:train_limit]


def load_test_set(data_dir: str | Path | None, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``samples`` test images as inputs, and their labels."""
    images, labels = load_split(data_dir, "test")
    check_count("samples", samples, images.shape[0])
    return mnist_inputs(images[:samples]), labels[:samples]
