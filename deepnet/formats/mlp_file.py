"""The MLP model file (kind "mlp"): plain arrays and attributes, written whole and atomically.

Layout (names in :mod:`deepnet.formats.layout`)::

    /               attrs: format="deepnet", format_version=1, kind="mlp", hidden, input_dim, n_classes,
                           step, seed, rng_state (JSON of the minibatch generator's state, "" if none),
                           init ("he-uniform/xavier-uniform"), created, updated
    /mlp/w1         float32 (input_dim, hidden)      /mlp/b1   float32 (hidden,)
    /mlp/w2         float32 (hidden, n_classes)      /mlp/b2   float32 (n_classes,)
    /train/log      compound (step i8, loss f8, batch_acc f8, seconds f8), as in the dense model
    /train/evals    compound (step, kind, samples, loss, accuracy): the evaluations training made
                    (layout.EVAL_DTYPE; absent in files from before it: none)

The whole model is small, so it is rewritten whole at every save rather than updated in place: a run
killed between two saves loses only the steps since the last one, and never leaves a torn file. Also
here: telling the kinds of deepnet file apart (:func:`model_kind`, :func:`require_kind`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import NoReturn

import h5py
import numpy as np

from deepnet.errors import ModelFileError
from deepnet.formats.data_record import DataRecord, read_data_record, write_data_record
from deepnet.formats import evals as _evals
from deepnet.formats import layout
from deepnet.formats.atomic import atomic_path
from deepnet.formats.h5io import set_attrs
from deepnet.formats.locking import WriterLock, is_lock_conflict, locked_error
from deepnet.formats.create import FILE_OVERHEAD_BYTES
from deepnet.formats.values import decode, now, os_reason, rng_text

#: The ``init`` attribute: how the parameters of a new MLP are drawn.
INIT = "he-uniform/xavier-uniform"


@dataclass
class MLPContents:
    """What an MLP model file holds: the parameters (w1, b1, w2, b2) and the training state."""

    params: dict[str, np.ndarray]
    step: int
    seed: int
    rng_state: dict | None
    log: np.ndarray
    created: str
    evals: np.ndarray = field(default_factory=_evals.empty)
    data: DataRecord = field(default_factory=DataRecord)


def mlp_shapes(hidden: int, input_dim: int, n_classes: int) -> dict[str, tuple[int, ...]]:
    """The shape of each MLP parameter, in layout.MLP_KEYS order."""
    return {"w1": (input_dim, hidden), "b1": (hidden,), "w2": (hidden, n_classes), "b2": (n_classes,)}


def write_mlp_file(path: str | os.PathLike, params: Mapping[str, np.ndarray], *, step: int, seed: int,
                   rng_state: dict | None, log: np.ndarray, created: str, overwrite: bool = True,
                   lock: WriterLock | None = None, evals: np.ndarray | None = None,
                   data: DataRecord | None = None) -> None:
    """Write an MLP model file at `path` atomically (a temporary beside it, fsync, rename); without
    `overwrite` an existing `path` is refused. A run that saves again and again holds `lock` (a
    :class:`WriterLock` of `path`) for its whole length; without it the file's lock is taken for the write.

    `evals` are the evaluations the file holds (EVAL_DTYPE rows); None keeps those of the file being
    replaced if it is an earlier version of the same model (same ``created``), up to `step`."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise ModelFileError(f"cannot write {path}: it is a directory")
    if not os.path.isdir(directory):
        raise ModelFileError(f"cannot write {path}: directory {directory} does not exist")
    input_dim, hidden = params["w1"].shape
    size = sum(int(np.asarray(a).nbytes) for a in params.values()) + int(np.asarray(log).nbytes) + FILE_OVERHEAD_BYTES
    try:
        with atomic_path(path, overwrite=overwrite, size=size, lock=True if lock is None else lock) as tmp, \
                h5py.File(tmp, "w") as f:
            if evals is None:  # read under the lock atomic_path holds on the file being replaced
                evals = _carried_evals(path, created, seed, step)
            set_attrs(f, {"format": layout.FORMAT, "format_version": np.int64(layout.FORMAT_VERSION),
                          "kind": layout.KIND_MLP, "hidden": np.int64(hidden), "input_dim": np.int64(input_dim),
                          "n_classes": np.int64(params["w2"].shape[1]), "step": np.int64(step),
                          "seed": np.int64(seed), "rng_state": rng_text(rng_state), "init": INIT,
                          "created": created, "updated": now()})
            if data is not None:
                write_data_record(f, data)
            for name, dset in layout.mlp_paths(layout.MLP_GROUP).items():
                f.create_dataset(dset, data=params[name])
            f.create_dataset(layout.TRAIN_LOG, data=log, maxshape=(None,), chunks=(layout.LOG_CHUNK_ROWS,))
            _evals.create(f, evals)
    except OSError as exc:
        raise ModelFileError(f"could not write {path}: {os_reason(exc)}") from exc


def _carried_evals(path: str, created: str, seed: int, step: int) -> np.ndarray:
    """The evaluations of the MLP file at `path`, if it is an earlier version of the model being written
    (the same ``created`` and ``seed``, a step up to `step`; else, or if it cannot be read, none). The
    caller holds the file's lock: HDF5 must not take it again."""
    try:
        if not os.path.isfile(path) or not h5py.is_hdf5(path):
            return _evals.empty()
        with h5py.File(path, "r", locking=False) as old:
            a = old.attrs
            same = (decode(a.get("kind", "")) == layout.KIND_MLP and decode(a.get("created", "")) == created
                    and a.get("seed") == seed and 0 <= a.get("step", -1) <= step)
            if not same:
                return _evals.empty()
            _evals.check_dataset(old, path)
            rows = old[layout.TRAIN_EVALS][()] if layout.TRAIN_EVALS in old else _evals.empty()
    except (OSError, ModelFileError):
        return _evals.empty()
    return rows[rows["step"] <= step]


def append_mlp_evaluation(path: str | os.PathLike, step: int, kind: str, samples: int, loss: float,
                          accuracy: float) -> None:
    """Add an evaluation training made (see :func:`deepnet.formats.evals.evaluation_rows`) to the MLP
    file at `path`, which is rewritten whole and atomically, as every MLP file is."""
    row = _evals.evaluation_rows([(step, kind, samples, loss, accuracy)])
    require_kind(path, layout.KIND_MLP, "train-mlp")
    path = os.fspath(path)
    with WriterLock(path) as lock:  # read and replaced under one lock; HDF5 must not take it again
        try:
            with h5py.File(path, "r", locking=False) as f:
                contents = _read(f, path)
        except OSError as exc:
            raise ModelFileError(f"could not read {path}: {os_reason(exc)}") from exc
        write_mlp_file(path, contents.params, step=contents.step, seed=contents.seed, rng_state=contents.rng_state,
                       log=contents.log, created=contents.created, lock=lock,
                       evals=np.concatenate([contents.evals, row]), data=contents.data)


def read_mlp_file(path: str | os.PathLike) -> MLPContents:
    """Read and validate an MLP model file; any problem is a one-line ModelFileError."""
    path = os.fspath(path)
    kind = model_kind(path)
    if kind is None:
        not_a_model(path)
    if kind != layout.KIND_MLP:
        hint = " (use `deepnet eval` / `deepnet train` for it)" if kind == layout.KIND_DENSE else ""
        raise ModelFileError(f"{path} holds a model of kind {kind!r}, not {layout.KIND_MLP!r}{hint}")
    try:
        with h5py.File(path, "r") as f:
            return _read(f, path)
    except OSError as exc:
        if is_lock_conflict(exc):
            raise locked_error(path, "r") from None
        raise ModelFileError(f"could not read {path}: {os_reason(exc)}") from exc


def _read(f: h5py.File, path: str) -> MLPContents:
    a = f.attrs
    version = a.get("format_version")
    if not isinstance(version, (int, np.integer)) or int(version) != layout.FORMAT_VERSION:
        raise ModelFileError(f"{path} has format_version {decode(version)!r} but this deepnet reads "
                             f"format_version {layout.FORMAT_VERSION}")
    missing = [n for n in layout.MLP_REQUIRED_ATTRS if n not in a]
    if missing:
        raise ModelFileError(f"{path} is missing the attribute(s) {', '.join(missing)}")
    meta = {}
    for name, minimum in zip(layout.MLP_INT_ATTRS, (1, 1, 2, 0, 0)):
        value = a[name]
        if not isinstance(value, (int, np.integer)) or isinstance(value, (bool, np.bool_)):
            raise ModelFileError(f"{path}: attribute {name} is {decode(value)!r}, not an integer")
        if value < minimum:
            raise ModelFileError(f"{path}: attribute {name} is {int(value)}, must be >= {minimum}")
        meta[name] = int(value)
    hidden = meta["hidden"]
    shapes = mlp_shapes(hidden, meta["input_dim"], meta["n_classes"])
    params = {}
    for name, dset in layout.mlp_paths(layout.MLP_GROUP).items():
        ds = f.get(dset)
        if not isinstance(ds, h5py.Dataset):
            raise ModelFileError(f"{path} is missing the dataset /{dset}")
        if ds.dtype != np.float32 or ds.shape != shapes[name]:
            raise ModelFileError(f"{path}: dataset /{dset} is {ds.dtype} {ds.shape} but "
                                 f"hidden={hidden} needs float32 {shapes[name]}")
        params[name] = ds[()]
    log_ds = f.get(layout.TRAIN_LOG)
    if not isinstance(log_ds, h5py.Dataset) or log_ds.dtype != layout.LOG_DTYPE or log_ds.ndim != 1:
        raise ModelFileError(f"{path}: /{layout.TRAIN_LOG} is missing or is not the training-log table")
    text = decode(a["rng_state"])
    try:
        rng_state = json.loads(text) if text else None
    except ValueError:
        raise ModelFileError(f"{path}: attribute rng_state is not valid JSON") from None
    if rng_state is not None and not isinstance(rng_state, dict):
        raise ModelFileError(f"{path}: attribute rng_state is not a JSON object")
    _evals.check_dataset(f, path)
    evals = f[layout.TRAIN_EVALS][()] if layout.TRAIN_EVALS in f else _evals.empty()
    return MLPContents(params, meta["step"], meta["seed"], rng_state, log_ds[()], decode(a["created"]), evals,
                       read_data_record(f, path))


def not_a_model(path: str) -> NoReturn:
    """Raise the one-line error for a path that is not a readable deepnet model file."""
    if not os.path.exists(path):
        raise ModelFileError(f"no model file at {path}")
    if os.path.isdir(path):
        raise ModelFileError(f"{path} is a directory, not a model file")
    raise ModelFileError(f"{path} is not a deepnet model file")


def model_kind(path: str | os.PathLike) -> str | None:
    """The ``kind`` attribute of a deepnet model file ("dense", "mlp", ...), or None if ``path`` is not
    a readable deepnet HDF5 file (the caller's own open then says why); a file another process holds
    locked is a one-line ModelFileError saying so."""
    path = os.fspath(path)
    try:
        if not os.path.isfile(path) or not h5py.is_hdf5(path):
            return None
        with h5py.File(path, "r") as f:
            if decode(f.attrs.get("format", "")) != layout.FORMAT:
                return None
            kind = f.attrs.get("kind")
            return None if kind is None else decode(kind)
    except OSError as exc:
        if is_lock_conflict(exc):  # a file in training is not "not a model file"
            raise locked_error(path, "r") from None
        return None


def require_kind(path: str | os.PathLike, kind: str, command: str) -> None:
    """Refuse (one line) a deepnet file of another kind before ``deepnet command`` opens it as ``kind``."""
    try:
        have = model_kind(path)
    except ModelFileError:  # locked by a run: the command's own open says so, in its own mode
        return
    if have is not None and have != kind:
        base = command.removesuffix("-mlp")
        other = {layout.KIND_DENSE: base, layout.KIND_MLP: f"{base}-mlp"}.get(have)
        hint = f" (use `deepnet {other}`)" if other else ""
        raise ModelFileError(f"{os.fspath(path)} holds a model of kind {have!r}; `deepnet {command}` reads kind "
                             f"{kind!r}{hint}")
