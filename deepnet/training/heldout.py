"""Held-out accuracy while training: the last N training images, never drawn into a minibatch.

``--holdout N --eval-every K`` sets the last N of MNIST's 60,000 training images aside (the minibatches
are then drawn from the first ``min(train_limit, 60000 - N)``) and evaluates the model on them after
every K-th step (by global step number, so a resumed run measures at the same steps). Each measurement
is shown in the training table and appended to the model file, in the resizable dataset
``formats.layout.TRAIN_HELDOUT`` of rows ``HELDOUT_DTYPE`` (step, heldout_loss, heldout_acc): a dataset
of its own rather than a column of the training log (whose row type is the file format). Streamed,
a row is appended right after its (already committed) step; in memory, the rows travel with the atomic
checkpoint, so the file never holds a figure of a step it does not hold.
"""

from __future__ import annotations

import time
from typing import Iterable

import h5py
import numpy as np

from deepnet.errors import ConfigError
from deepnet.flags import int_at_least
from deepnet.formats.hdf5 import ModelFile
from deepnet.formats.layout import HELDOUT_DTYPE, TRAIN_HELDOUT
from deepnet.nn.network import DeepNet

#: Rows per HDF5 chunk of the dataset.
CHUNK_ROWS = 1024


def check_options(holdout: int | None, eval_every: int | None, n_train: int) -> tuple[int, int | None]:
    """Validate --holdout / --eval-every: (holdout, eval_every), holdout 0 meaning none."""
    holdout = 0 if holdout is None else holdout
    if isinstance(holdout, bool) or not isinstance(holdout, int) or not 0 <= holdout < n_train:
        raise ConfigError(f"--holdout must be an integer in 0..{n_train - 1}, got {holdout!r}")
    if eval_every is not None:
        int_at_least("eval-every", eval_every, 1)
        if not holdout:
            raise ConfigError("--eval-every evaluates on the held-out images: give --holdout N too")
    elif holdout:
        raise ConfigError("--holdout N needs --eval-every K (evaluate every K steps)")
    return holdout, eval_every


def train_limit(requested: int | None, stored: int | None, default: int, n_train: int, holdout: int) -> int:
    """The number of leading training images minibatches are drawn from, with ``holdout`` set aside:
    as given (then it must leave the held-out images alone), else as stored/default, capped."""
    room = n_train - holdout
    if requested is not None:
        if not 1 <= requested <= room:
            what = f" (the last {holdout} are held out)" if holdout else ""
            raise ConfigError(f"--train-limit must be in 1..{room}{what}, got {requested}")
        return requested
    value = stored if stored is not None else default
    return max(1, min(value, room))


class HeldOut:
    """The held-out images of a run, when to evaluate on them, and the measurements."""

    def __init__(self, x: np.ndarray, y: np.ndarray, every: int, *, batch: int = 1024) -> None:
        self.x = x
        self.y = y
        self.every = every
        self.batch = batch
        self.rows: list[tuple[int, float, float]] = []   # this run's measurements
        self.seconds = 0.0                                # spent measuring

    @property
    def size(self) -> int:
        """Held-out images."""
        return int(self.x.shape[0])

    def due(self, step: int) -> bool:
        """Whether to measure after ``step``."""
        return step % self.every == 0

    @property
    def last(self) -> tuple[int, float, float] | None:
        """The latest measurement (step, loss, accuracy), if any."""
        return self.rows[-1] if self.rows else None

    def measure(self, net: DeepNet) -> float:
        """Evaluate ``net`` now; record (step, loss, accuracy); streamed nets get the row appended to the
        file at once. Returns the accuracy."""
        started = time.perf_counter()
        result = net.evaluate(self.x, self.y, batch=self.batch)
        self.seconds += time.perf_counter() - started
        row = (int(net.step), float(result.loss), float(result.accuracy))
        self.rows.append(row)
        net.file.record_evaluation(row[0], "heldout", result.samples, row[1], row[2])
        if not net.in_memory:
            append_rows(net.file.h5, [row])
        return row[2]

    def attach(self, net: DeepNet) -> None:
        """Have the in-memory net's checkpoints carry the measurements."""
        if net.in_memory:
            net.extra_writers.append(lambda h5: self.write_copy(h5, net))

    def write_copy(self, h5: h5py.File, net: DeepNet) -> None:
        """Into the file an in-memory checkpoint writes: the stored rows up to the step being saved,
        then this run's."""
        old = read_rows(net.file.h5)
        first = self.rows[0][0] if self.rows else net.step + 1
        keep = old[old["step"] < first]
        new = np.concatenate([keep, _rows(r for r in self.rows if r[0] <= net.step)])
        if TRAIN_HELDOUT in h5:
            del h5[TRAIN_HELDOUT]
        h5.create_dataset(TRAIN_HELDOUT, data=new, maxshape=(None,), chunks=(CHUNK_ROWS,))


def _rows(rows: Iterable[tuple[int, float, float]]) -> np.ndarray:
    rows = list(rows)
    out = np.empty(len(rows), HELDOUT_DTYPE)
    for i, row in enumerate(rows):
        out[i] = row
    return out


def read_rows(h5: h5py.Group) -> np.ndarray:
    """The held-out rows of an open h5py file (empty if there are none)."""
    ds = h5.get(TRAIN_HELDOUT)
    if ds is None or getattr(ds, "dtype", None) != HELDOUT_DTYPE:
        return np.empty(0, HELDOUT_DTYPE)
    return ds[()]


def append_rows(h5: h5py.Group, rows: Iterable[tuple[int, float, float]]) -> None:
    """Append rows to the held-out dataset of a writable file, creating it if needed (an HDF5 metadata
    change: done between steps only)."""
    rows = _rows(rows)
    ds = h5.get(TRAIN_HELDOUT)
    if ds is None:
        ds = h5.create_dataset(TRAIN_HELDOUT, shape=(0,), maxshape=(None,), dtype=HELDOUT_DTYPE,
                               chunks=(CHUNK_ROWS,))
    n = ds.shape[0]
    ds.resize((n + rows.shape[0],))
    ds[n:] = rows
    h5.flush()


def summary(model_file: ModelFile) -> dict:
    """What `deepnet info` shows: the last held-out figure."""
    rows = read_rows(model_file.h5)
    if not rows.size:
        return {}
    last = rows[-1]
    return {"last_heldout": {"step": int(last["step"]), "loss": float(last["heldout_loss"]),
                             "acc": float(last["heldout_acc"]), "measurements": int(rows.size)}}
