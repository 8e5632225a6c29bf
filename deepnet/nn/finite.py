"""The numerical guard: the error of a step refused for a non-finite value, and the checks behind it.

Nothing non-finite is ever kept: a training step computes the new weights of each part (core chunk,
heads, branch, MLP) and checks them before they are committed; a step whose loss, gradient or updated
weights are not finite is refused with one line naming the step and what went non-finite. The
arithmetic of a step runs under ``quiet()``: an overflow is reported by that check, not by NumPy's
RuntimeWarning on the terminal.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from deepnet.errors import DeepnetError


class NonFiniteError(DeepnetError):
    """A loss, gradient or updated weight is not finite, so the step is refused (``start``/``stop``: the
    layers of the chunk whose backward pass produced it, when it appeared mid-backward)."""

    def __init__(self, message: str, *, start: int | None = None, stop: int | None = None) -> None:
        super().__init__(message)
        self.start = start
        self.stop = stop


def all_finite(arrays: Iterable[np.ndarray]) -> bool:
    """Whether every element of every array is finite."""
    return all(bool(np.isfinite(a).all()) for a in arrays)


def finite_rows(rows: np.ndarray) -> bool:
    """Whether every element of a float32 chunk of core rows is finite, at a fraction of the cost of
    ``np.isfinite(rows).all()``: the sum of squares (one BLAS dot, no temporary) is finite whenever every
    element is, and only a non-finite sum (an inf or nan, or a value beyond ~1e19) pays for the exact check."""
    flat = rows.reshape(-1)
    if np.isfinite(np.dot(flat, flat)):
        return True
    return bool(np.isfinite(flat).all())


def finite_blocks(a: np.ndarray, block: int = 1 << 20) -> bool:
    """Whether every element of a (large, C-contiguous) array is finite, checked a block at a time so the
    check allocates one block's flags, not the whole array's."""
    flat = a.reshape(-1)
    return all(bool(np.isfinite(flat[i:i + block]).all()) for i in range(0, flat.size, block))


def quiet() -> np.errstate:
    """NumPy's floating-point warnings off: the step's own checks report what went non-finite."""
    return np.errstate(over="ignore", invalid="ignore", divide="ignore")


def stepped(param: np.ndarray, delta: np.ndarray) -> np.ndarray:
    """``param - delta`` as a new array, computed as ``param -= delta`` would be (the same float32
    arithmetic), so a step's new weights can be checked before they replace the old ones."""
    new = param.copy()
    new -= delta
    return new


def assign(params: dict[str, np.ndarray], values: dict[str, np.ndarray]) -> None:
    """Copy checked new values into the parameters' arrays, in place (views handed out earlier see them)."""
    for key, value in values.items():
        np.copyto(params[key], value)
