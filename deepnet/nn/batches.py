"""The one check of a batch handed to a network: inputs (batch, input_dim) float32, labels in range."""

from __future__ import annotations

import numpy as np

from deepnet.errors import ConfigError


def check_batch(x: np.ndarray, y: np.ndarray | None, *, input_dim: int,
                n_classes: int) -> tuple[np.ndarray, np.ndarray | None]:
    """``x`` as C-contiguous float32 of shape (batch >= 1, input_dim) and ``y`` (if given) as intp labels in
    0..n_classes-1; ConfigError (one line) for anything else."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != input_dim or x.shape[0] < 1:
        raise ConfigError(f"x must have shape (batch >= 1, {input_dim}), got {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if y is not None:
        y = np.asarray(y)
        if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
            raise ConfigError(f"y must be {x.shape[0]} integer labels, got shape {y.shape} dtype {y.dtype}")
        if y.min() < 0 or y.max() >= n_classes:
            raise ConfigError(f"labels must be in 0..{n_classes - 1}")
        y = y.astype(np.intp, copy=False)
    return x, y
