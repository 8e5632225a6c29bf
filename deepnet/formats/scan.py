"""Finding non-finite values in a model file, block by block (for `deepnet check`, --resume-torn and
the in-memory save's refusal), so a large core is never read whole."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import h5py
import numpy as np

#: Bytes read at a time while scanning.
SCAN_BLOCK_BYTES = 16 << 20


def non_finite_rows(read_rows: Callable[[int, int, np.ndarray], np.ndarray], n_rows: int, row_size: int) -> np.ndarray:
    """Indices of the float32 rows holding a NaN or an infinity, read by `read_rows(start, stop, out)`."""
    block = max(1, SCAN_BLOCK_BYTES // (4 * row_size))
    buf = np.empty((min(block, n_rows), row_size), np.float32)
    bad = []
    for start in range(0, n_rows, block):
        stop = min(n_rows, start + block)
        ok = np.isfinite(read_rows(start, stop, buf)).all(axis=1)
        if not ok.all():
            bad.append(start + np.flatnonzero(~ok))
    return np.concatenate(bad) if bad else np.empty(0, np.int64)


def non_finite_datasets(f: h5py.File, skip: str) -> list[str]:
    """The float datasets of `f` but `skip` holding a NaN or an infinity, by name."""
    found: list[str] = []

    def scan(name: str, obj: Any) -> None:
        if not isinstance(obj, h5py.Dataset) or obj.dtype.kind != "f" or name == skip:
            return
        if obj.ndim == 0:
            finite = bool(np.isfinite(obj[()]))
        else:
            rows = max(1, SCAN_BLOCK_BYTES // max(1, obj.dtype.itemsize * int(np.prod(obj.shape[1:]))))
            finite = all(np.isfinite(obj[i : i + rows]).all() for i in range(0, obj.shape[0], rows))
        if not finite:
            found.append(name)

    f.visititems(scan)
    return found
