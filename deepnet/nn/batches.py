"""The one check of a batch handed to a network: inputs (batch, input_dim) float32, and labels in range or
(for a mean-squared-error model) finite target vectors."""

from __future__ import annotations

import numpy as np

from deepnet.errors import ConfigError


def check_batch(x: np.ndarray, y: np.ndarray | None, *, input_dim: int, n_classes: int,
                targets: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """``x`` as C-contiguous float32 of shape (batch >= 1, input_dim) and ``y`` (if given) as intp labels in
    0..n_classes-1, or with ``targets`` as C-contiguous float32 target vectors (batch, n_classes), all
    finite; ConfigError (one line) for anything else."""
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != input_dim or x.shape[0] < 1:
        raise ConfigError(f"x must have shape (batch >= 1, {input_dim}), got {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    if y is not None and targets:
        y = np.asarray(y)
        if y.shape != (x.shape[0], n_classes) or not np.issubdtype(y.dtype, np.floating):
            raise ConfigError(f"y must be {x.shape[0]} float target vectors of {n_classes} values (a mean-squared-error "
                              f"model learns targets, not labels), got shape {y.shape} dtype {y.dtype}")
        with np.errstate(over="ignore"):                # too large for float32: inf, refused below
            y = np.ascontiguousarray(y, dtype=np.float32)
        if not np.isfinite(y).all():
            raise ConfigError(f"targets must be finite float32 values; {int(np.count_nonzero(~np.isfinite(y)))} "
                              f"of the batch's {y.size} are not")
    elif y is not None:
        y = np.asarray(y)
        if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
            raise ConfigError(f"y must be {x.shape[0]} integer labels, got shape {y.shape} dtype {y.dtype}")
        if y.min() < 0 or y.max() >= n_classes:
            raise ConfigError(f"labels must be in 0..{n_classes - 1}")
        y = y.astype(np.intp, copy=False)
    return x, y
