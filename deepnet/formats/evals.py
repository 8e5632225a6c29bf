"""The evaluations a training run made, kept in a model file: /train/evals (``layout.EVAL_DTYPE`` rows).

One row per evaluation: the step evaluated, its kind (``heldout``: the --holdout images at --eval-every;
``test``: the test images at the end of a run), the images evaluated, the mean loss and the accuracy.

A dense file keeps them as it keeps /train/log: the commit record counts the committed rows
(``eval_rows``, :data:`deepnet.formats.commit.EVAL_ROWS`), rows are appended at that count (so rows a killed append
left past it are ignored, then overwritten) and the record is written after them; a checkpoint's
rewrite writes the committed rows into the new file. An evaluation of a step the file does not hold
yet (in-memory training between checkpoints) waits, in the open :class:`~deepnet.formats.model_file.ModelFile`,
for the checkpoint that writes its step. An MLP file, written whole, holds them as a plain dataset.
Files from before the dataset have none (and may have /train/heldout, see :func:`heldout_as_evaluations`).
No I/O beyond the datasets named here; the record itself is :mod:`deepnet.formats.record`'s.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import h5py
import numpy as np

from deepnet.errors import ConfigError, ModelFileError
from deepnet.formats import layout
from deepnet.formats.commit import EVAL_ROWS
from deepnet.formats.record import CommitLog
from deepnet.formats.values import os_reason

#: One evaluation as given to :func:`evaluation_rows`: (step, kind, samples, loss, accuracy).
Evaluation = Sequence[Any]


def empty() -> np.ndarray:
    """No evaluations."""
    return np.empty(0, layout.EVAL_DTYPE)


def evaluation_rows(rows: Iterable[Evaluation]) -> np.ndarray:
    """Evaluations (step, kind, samples, loss, accuracy) as EVAL_DTYPE rows, checked: step >= 0 and
    samples >= 1 integers, kind one of EVAL_KINDS, accuracy in [0, 1]; else a one-line ConfigError."""
    rows = list(rows)
    out = np.empty(len(rows), layout.EVAL_DTYPE)
    for i, row in enumerate(rows):
        if len(row) != 5:
            raise ConfigError(f"an evaluation is (step, kind, samples, loss, accuracy), got {len(row)} values")
        step, kind, samples, loss, accuracy = row
        for name, value, minimum in (("step", step, 0), ("samples", samples, 1)):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
                raise ConfigError(f"an evaluation's {name} must be an integer >= {minimum}, got {value!r}")
        if kind not in layout.EVAL_KINDS:
            raise ConfigError(f"an evaluation's kind must be one of {', '.join(layout.EVAL_KINDS)}, got {kind!r}")
        try:
            loss, accuracy = float(loss), float(accuracy)
        except (TypeError, ValueError):
            raise ConfigError(f"an evaluation's loss and accuracy must be numbers, got {row[3]!r}, {row[4]!r}") from None
        if not 0.0 <= accuracy <= 1.0:
            raise ConfigError(f"an evaluation's accuracy must be in [0, 1], got {accuracy!r}")
        if math.isnan(loss) or loss < 0:
            raise ConfigError(f"an evaluation's loss must be a number >= 0, got {loss!r}")
        out[i] = (int(step), kind.encode("ascii"), int(samples), loss, accuracy)
    return out


def kinds(rows: np.ndarray) -> list[str]:
    """The kind column of EVAL_DTYPE rows as text."""
    return [k.decode("ascii", "replace") for k in rows["kind"]]


def of_kind(rows: np.ndarray, kind: str) -> np.ndarray:
    """The rows of one kind."""
    return rows[rows["kind"] == kind.encode("ascii")]


def stored_count(h5: h5py.Group) -> int:
    """Rows in the /train/evals dataset, committed or not (0 without it)."""
    ds = h5.get(layout.TRAIN_EVALS)
    return int(ds.shape[0]) if isinstance(ds, h5py.Dataset) else 0


def read_committed(h5: h5py.Group, count: int) -> np.ndarray:
    """The first `count` rows of /train/evals (the committed ones)."""
    if not count:
        return empty()
    return h5[layout.TRAIN_EVALS][:count]


def check_count(h5: h5py.Group, path: str, count: int) -> None:
    """A one-line error if the record counts more rows than the dataset holds."""
    stored = stored_count(h5)
    if count > stored:
        raise ModelFileError(f"{path}: the commit record counts {count} rows of /{layout.TRAIN_EVALS} "
                             f"but the dataset has {stored}")


def create(f: h5py.Group, rows: np.ndarray) -> None:
    """Allocate /train/evals (resizable) holding `rows`."""
    ds = f.create_dataset(layout.TRAIN_EVALS, shape=(rows.shape[0],), maxshape=(None,), dtype=layout.EVAL_DTYPE,
                          chunks=(layout.EVAL_CHUNK_ROWS,))
    if rows.shape[0]:
        ds.write_direct(np.ascontiguousarray(rows, dtype=layout.EVAL_DTYPE))


def write_at(f: h5py.Group, at: int, rows: np.ndarray) -> None:
    """Make /train/evals `at` + len(rows) rows long with `rows` from row `at` (creating it if missing; an
    HDF5 metadata change). Rows past `at` (an interrupted append's) are overwritten."""
    ds = f.get(layout.TRAIN_EVALS)
    if ds is None:
        create(f, empty())
        ds = f[layout.TRAIN_EVALS]
    ds.resize((at + rows.shape[0],))
    if rows.shape[0]:
        ds.write_direct(np.ascontiguousarray(rows, dtype=layout.EVAL_DTYPE), dest_sel=np.s_[at : at + rows.shape[0]])


def check_dataset(f: h5py.Group, path: str) -> None:
    """A one-line error unless /train/evals, if present, is a 1-D resizable dataset of EVAL_DTYPE."""
    obj = f.get(layout.TRAIN_EVALS)
    if obj is None:
        return
    name = f"/{layout.TRAIN_EVALS}"
    if not isinstance(obj, h5py.Dataset):
        raise ModelFileError(f"{path}: {name} is a {type(obj).__name__}, not a dataset")
    if obj.dtype != layout.EVAL_DTYPE:
        raise ModelFileError(f"{path}: dataset {name} has dtype {obj.dtype} but {layout.EVAL_DTYPE} is required")
    if obj.ndim != 1 or obj.maxshape != (None,):
        raise ModelFileError(f"{path}: dataset {name} has shape {obj.shape} (max {obj.maxshape}) "
                             f"but must be 1-D and resizable")


def heldout_as_evaluations(h5: h5py.Group) -> np.ndarray:
    """The rows of /train/heldout (deepnet.training.heldout; step, heldout_loss, heldout_acc) as held-out
    evaluations of unknown size (samples 0): what a file from before /train/evals has to show."""
    ds = h5.get(layout.TRAIN_HELDOUT)
    if not isinstance(ds, h5py.Dataset) or ds.dtype != layout.HELDOUT_DTYPE or ds.ndim != 1:
        return empty()
    held = ds[()]
    out = np.empty(held.shape[0], layout.EVAL_DTYPE)
    out["step"] = held["step"]
    out["kind"] = layout.EVAL_HELDOUT.encode("ascii")
    out["samples"] = 0
    out["loss"] = held["heldout_loss"]
    out["accuracy"] = held["heldout_acc"]
    return out


def with_heldout_dataset(rows: np.ndarray, h5: h5py.Group) -> np.ndarray:
    """`rows` and, before them, the /train/heldout measurements of steps they have no held-out
    evaluation of (a file trained before /train/evals existed), ordered by step (stable)."""
    held = heldout_as_evaluations(h5)
    if held.size:
        have = of_kind(rows, layout.EVAL_HELDOUT)["step"]
        held = held[~np.isin(held["step"], have)]
    if not held.size:
        return rows
    merged = np.concatenate([held, rows])
    return merged[np.argsort(merged["step"], kind="stable")]


class EvalLog:
    """The /train/evals of an open dense file: the committed rows (the commit record's count) and the
    rows waiting for a step the file does not hold yet. :meth:`bind` attaches it to the open file
    (again after a checkpoint replaced it); the waiting rows stay."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.waiting = empty()
        self._f: h5py.File | None = None
        self._commits: CommitLog | None = None

    def bind(self, h5file: h5py.File, commits: CommitLog) -> None:
        """Use `h5file` and its record from now on (a one-line error if the record counts too many rows)."""
        self._f, self._commits = h5file, commits
        check_count(h5file, self.path, self.count)

    @property
    def count(self) -> int:
        """Committed rows (none in a record from before the count)."""
        return int(self._commits.get(EVAL_ROWS) or 0)

    def read(self) -> np.ndarray:
        """The committed rows."""
        return read_committed(self._f, self.count)

    def ready(self, step: int) -> np.ndarray:
        """The waiting rows of steps up to `step`."""
        return self.waiting[self.waiting["step"] <= step]

    def forget(self, step: int) -> None:
        """Drop the waiting rows of steps up to `step` (now in the file)."""
        self.waiting = self.waiting[self.waiting["step"] > step]

    def record(self, rows: np.ndarray, held_step: int) -> None:
        """Add `rows`; commit those of steps up to `held_step` (the file's): appended at the committed
        count, then the record counts them."""
        self.waiting = np.concatenate([self.waiting, rows])
        ready = self.ready(held_step)
        if not ready.size:
            return
        at = self.count
        try:
            write_at(self._f, at, ready)
            self._f.flush()
        except (OSError, RuntimeError) as exc:
            raise ModelFileError(f"could not append to the evaluations of {self.path}: {os_reason(exc)} "
                                 f"(the file still holds step {held_step})") from exc
        self._commits.write(**{EVAL_ROWS: at + int(ready.size)})
        self.forget(held_step)
