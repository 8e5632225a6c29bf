"""Opening a dense model file and checking it against the layout (:mod:`deepnet.formats.layout`).

A file that fails any check cannot be used at all, so every problem is a one-line
:class:`ModelFileError` naming the file and what is wrong, before any weight is read.
"""

from __future__ import annotations

import errno
import math
import operator
import os
from collections.abc import Mapping
from typing import Any

import h5py
import numpy as np

from deepnet.errors import ConfigError, ModelFileError
from deepnet.formats import evals as _evals
from deepnet.formats import layout, shard_files
from deepnet.formats.h5io import open_h5
from deepnet.formats.locking import flock, hdf5_locking_disabled, is_lock_conflict, locked_error, same_file
from deepnet.formats.values import decode, is_int, is_int_attr, os_reason, show

#: Which `expect` keys ModelFile.open understands (each is also the flag's name).
EXPECT_KEYS = ("width", "layers", "activation", "input_dim", "n_classes")


def open_validated(path: str | os.PathLike, mode: str,
                   expect: Mapping[str, Any] | None) -> tuple[h5py.File, dict[str, Any], int | None]:
    """Open a model file ("r" or "r+"), taking the one-writer lock, and validate it against the layout
    and `expect`; returns the open file, its metadata (see :func:`validate`) and the descriptor of the
    lock deepnet took itself (None when HDF5 holds it). Every problem is a one-line error."""
    path = os.fspath(path)
    if mode not in ("r", "r+"):
        raise ConfigError(f"mode must be 'r' or 'r+', got {mode!r}")
    expect = dict(expect or {})
    unknown = sorted(set(expect) - set(EXPECT_KEYS))
    if unknown:
        raise ConfigError(f"cannot check {', '.join(unknown)} against a model file (known: {', '.join(EXPECT_KEYS)})")
    if not os.path.exists(path):
        raise ModelFileError(f"no model file at {path}")
    if os.path.isdir(path):
        raise ModelFileError(f"{path} is a directory, not a model file")
    cannot = f"could not open {path} in mode {mode!r}"
    if not os.access(path, os.R_OK if mode == "r" else os.R_OK | os.W_OK):
        raise ModelFileError(f"{cannot}: {os.strerror(errno.EACCES)}")
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as exc:
        raise ModelFileError(f"could not open {path}: {os_reason(exc)}") from exc
    if not is_hdf5:
        raise ModelFileError(f"{path} is not a deepnet model file (not an HDF5 file)")
    locked = str(locked_error(path, mode))
    lock_fd = None
    if hdf5_locking_disabled():
        try:
            lock_fd = flock(path, exclusive=(mode == "r+"))
        except BlockingIOError:
            raise ModelFileError(locked) from None
        except OSError as exc:
            raise ModelFileError(f"{cannot}: {os_reason(exc)}") from exc
    try:
        f = open_h5(path, mode)
    except OSError as exc:
        if lock_fd is not None:
            os.close(lock_fd)
        if is_lock_conflict(exc):
            raise ModelFileError(locked) from exc
        raise ModelFileError(f"{cannot}: {os_reason(exc)}") from exc
    try:
        if not _still_at(path, f, lock_fd):
            # Replaced by rename between our open and our lock: its writer holds the new file (or has just
            # finished); what we locked is no longer the model at `path`.
            raise ModelFileError(f"{cannot}: another process replaced it while it was being opened "
                                 f"(a training run's checkpoint?)")
        meta = validate(f, path)
        check_expect(meta, expect, path)
        if mode == "r+":
            refuse_shard_writes(f, path, meta)
    except BaseException:
        f.close()
        if lock_fd is not None:
            os.close(lock_fd)
        raise
    return f, meta, lock_fd


def refuse_shard_writes(f: h5py.File, path: str, meta: Mapping[str, Any]) -> None:
    """A sharded model is written only by its P ranks (deepnet.formats.shards), and a shard file never
    after it is placed: refuse opening either for writing, in one line saying what to do instead."""
    if meta.get("shards"):
        count = meta["shards"]
        raise ModelFileError(f"{path} is a sharded model ({count} shards): train it with `mpiexec -n {count} "
                             f"deepnet train {path}`, or join it into one file with `deepnet gather {path} -o OUT`")
    if layout.SHARD_SET_ATTR in f.attrs:
        raise ModelFileError(f"{path} is a shard file of a sharded model, written once and never changed; "
                             f"open its root file instead")


def _still_at(path: str, f: h5py.File, lock_fd: int | None) -> bool:
    """Whether the file HDF5 opened (and deepnet's lock, if it took one) is still the file at `path`."""
    fds = [] if lock_fd is None else [lock_fd]
    if f.driver == "sec2":
        try:
            fds.append(int(f.id.get_vfd_handle()))
        except Exception:  # pragma: no cover - a driver without a plain descriptor
            pass
    return all(same_file(fd, path) for fd in fds)


def head_shapes(width: int, input_dim: int, n_classes: int) -> dict[str, tuple[int, ...]]:
    """The shape of each head array of a dense model."""
    return {
        "input_weight": (input_dim, width),
        "input_bias": (width,),
        "output_weight": (width, n_classes),
        "output_bias": (n_classes,),
    }


def validate(f: h5py.File, path: str) -> dict[str, Any]:
    """Check a just-opened file is a complete deepnet v1 dense model; return its metadata (the root
    attributes as Python values, plus ``storage_chunk_layers``)."""
    meta = _root_attributes(f, path)
    layers, width = meta["layers"], meta["width"]
    row_size = width * width + width
    implied = f"layers={layers}, width={width}"

    weights = dataset(f, path, layout.CORE_WEIGHTS)
    check_dataset(weights, path, np.dtype("<f4"), (layers, row_size), implied)
    chunks = weights.chunks
    if weights.is_virtual:  # the root of a sharded model: its shard files must be there, of its step
        chunk_layers = shard_files.check_root(f, path, meta)
        meta["shards"] = len(shard_files.read_specs(f, path, layers))
    elif chunks is None or chunks[1] != row_size:
        raise ModelFileError(
            f"{path}: dataset /{layout.CORE_WEIGHTS} must be chunked along layers in whole rows, has chunks {chunks}"
        )
    else:
        chunk_layers = chunks[0]
    n_chunks = -(-layers // chunk_layers)
    chunk_step = dataset(f, path, layout.CORE_CHUNK_STEP)
    check_dataset(chunk_step, path, np.dtype("<i8"), (n_chunks,), f"{implied} and {chunk_layers}-layer storage chunks")

    shapes = head_shapes(width, meta["input_dim"], meta["n_classes"])
    for key in layout.HEAD_KEYS:
        ds = dataset(f, path, layout.HEAD_PATHS[key])
        check_dataset(ds, path, np.dtype("<f4"), shapes[key],
                      f"width={width}, input_dim={meta['input_dim']}, n_classes={meta['n_classes']}")

    log = dataset(f, path, layout.TRAIN_LOG)
    if log.dtype != layout.LOG_DTYPE:
        raise ModelFileError(f"{path}: dataset /{layout.TRAIN_LOG} has dtype {log.dtype} but {layout.LOG_DTYPE} is required")
    if log.ndim != 1 or log.maxshape != (None,):
        raise ModelFileError(f"{path}: dataset /{layout.TRAIN_LOG} has shape {log.shape} (max {log.maxshape}) "
                             f"but must be 1-D and resizable")

    _evals.check_dataset(f, path)

    meta["storage_chunk_layers"] = chunk_layers
    return meta


def _root_attributes(f: h5py.File, path: str) -> dict[str, Any]:
    attrs = f.attrs
    if "format" not in attrs:
        raise ModelFileError(f"{path} is not a deepnet model file (no 'format' attribute)")
    fmt = attrs["format"]
    if not isinstance(fmt, (str, bytes, np.bytes_)) or decode(fmt) != layout.FORMAT:
        raise ModelFileError(f"{path} is not a deepnet model file (format is {show(fmt)}, expected {layout.FORMAT!r})")
    if "format_version" not in attrs:
        raise ModelFileError(f"{path} is missing the attribute format_version")
    version = attrs["format_version"]
    if not is_int_attr(version):
        raise ModelFileError(f"{path} has format_version {show(version)}, which is not an integer")
    if int(version) != layout.FORMAT_VERSION:
        raise ModelFileError(f"{path} has format_version {int(version)} but this deepnet reads format_version "
                             f"{layout.FORMAT_VERSION}")

    names = layout.DENSE_INT_ATTRS + layout.DENSE_FLOAT_ATTRS + layout.DENSE_STR_ATTRS
    missing = [n for n in names if n not in attrs]
    if missing:
        raise ModelFileError(f"{path} is missing the attribute(s) {', '.join(missing)}")
    meta: dict[str, Any] = {}
    for name in layout.DENSE_INT_ATTRS:
        value = attrs[name]
        if not is_int_attr(value):
            raise ModelFileError(f"{path}: attribute {name} is {show(value)}, not an integer")
        meta[name] = int(value)
    for name in layout.DENSE_FLOAT_ATTRS:
        value = attrs[name]
        if not (is_int_attr(value) or isinstance(value, (float, np.floating))) or not math.isfinite(float(value)):
            raise ModelFileError(f"{path}: attribute {name} is {show(value)}, not a finite number")
        meta[name] = float(value)
    for name in layout.DENSE_STR_ATTRS:
        value = attrs[name]
        if not isinstance(value, (str, bytes, np.bytes_)):
            raise ModelFileError(f"{path}: attribute {name} is {show(value)}, not a string")
        meta[name] = decode(value)

    for name in layout.DENSE_OPTIONAL_STR_ATTRS:
        value = attrs.get(name)
        if value is not None and not isinstance(value, (str, bytes, np.bytes_)):
            raise ModelFileError(f"{path}: attribute {name} is {show(value)}, not a string")
        meta[name] = None if value is None else decode(value)

    if meta["kind"] != layout.KIND_DENSE:
        raise ModelFileError(f"{path} holds a model of kind {meta['kind']!r}; this deepnet reads kind "
                             f"{layout.KIND_DENSE!r}")
    for name, minimum in (("width", 1), ("layers", 1), ("input_dim", 1), ("n_classes", 2), ("step", 0), ("seed", 0)):
        if meta[name] < minimum:
            raise ModelFileError(f"{path}: attribute {name} is {meta[name]}, must be >= {minimum}")
    if not meta["alpha"] > 0:
        raise ModelFileError(f"{path}: attribute alpha is {meta['alpha']}, must be > 0")
    if not meta["init_scale"] >= 0:
        raise ModelFileError(f"{path}: attribute init_scale is {meta['init_scale']}, must be >= 0")
    if not meta["activation"]:
        raise ModelFileError(f"{path}: attribute activation is empty")
    return meta


def dataset(f: h5py.File, path: str, name: str) -> h5py.Dataset:
    """The dataset `name` of `f`; a one-line error if it is missing or is a group."""
    obj = f.get(name)
    if obj is None:
        raise ModelFileError(f"{path} is missing the dataset /{name}")
    if not isinstance(obj, h5py.Dataset):
        raise ModelFileError(f"{path}: /{name} is a {type(obj).__name__}, not a dataset")
    return obj


def check_dataset(ds: h5py.Dataset, path: str, dtype: np.dtype, shape: tuple[int, ...], implied: str) -> None:
    """A one-line error unless `ds` has `dtype` and `shape` (which `implied` explains)."""
    if ds.dtype != dtype:
        raise ModelFileError(f"{path}: dataset {ds.name} has dtype {ds.dtype} but {dtype} is required")
    if ds.shape != shape:
        raise ModelFileError(f"{path}: dataset {ds.name} has shape {ds.shape} but {implied} imply {shape}")


def check_heads(heads: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], path: str) -> dict[str, np.ndarray]:
    """The four head arrays, checked (exactly the HEAD_KEYS, float32 numpy arrays of `shapes`), C-contiguous;
    else ConfigError."""
    missing = [k for k in layout.HEAD_KEYS if k not in heads]
    extra = sorted(set(heads) - set(layout.HEAD_KEYS))
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) \
            + ([f"unknown {', '.join(map(str, extra))}"] if extra else [])
        raise ConfigError(f"heads must have keys {', '.join(layout.HEAD_KEYS)} ({'; '.join(parts)})")
    arrays = {}
    for key in layout.HEAD_KEYS:
        value = heads[key]
        if not isinstance(value, np.ndarray):
            raise ConfigError(f"head {key} must be a numpy array, got {type(value).__name__}")
        if value.dtype != np.float32:
            raise ConfigError(f"head {key} has dtype {value.dtype} but float32 is required")
        if value.shape != shapes[key]:
            raise ConfigError(f"head {key} has shape {value.shape} but {path} needs {shapes[key]}")
        arrays[key] = np.ascontiguousarray(value)
    return arrays


def check_expect(meta: Mapping[str, Any], expect: Mapping[str, Any], path: str) -> None:
    """A one-line error if the file disagrees with a value the caller's flags asked for."""
    for key in EXPECT_KEYS:
        want = expect.get(key)
        if want is None:
            continue
        have = meta[key]
        if key == "activation":
            same = str(want) == have
        else:
            same = is_int(want) and operator.index(want) == have
        if not same:
            raise ModelFileError(f"{path} has {key} {have} but --{key.replace('_', '-')} {want} was given")
