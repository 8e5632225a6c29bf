"""Making a dense model file: the initial weights, the datasets, and placing the file atomically.

Also the dataset allocation that a checkpoint's rewrite (:meth:`ModelFile.rewrite`) shares: every
dataset written per step is allocated whole here, so the per-step path never changes HDF5 metadata.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import h5py
import numpy as np

from deepnet import activations
from deepnet.errors import ConfigError, ModelFileError
from deepnet.formats import evals as _evals
from deepnet.formats import h5io, layout
from deepnet.formats.atomic import atomic_path, check_output, space_shortfall
from deepnet.formats.commit import COMMIT_SLOTS, encode_record, heads_crc32, new_record
from deepnet.formats.h5io import RNG_ATTR_QUANTUM, TIME_ATTR_LEN, open_h5, set_attrs, set_fixed_ascii_attr
from deepnet.formats.locking import flock
from deepnet.formats.record import empty_commit_slots
from deepnet.formats.values import check_float, check_int, now, os_reason, rng_text

#: Target size in bytes of one HDF5 storage chunk of /core/weights.
STORAGE_CHUNK_BYTES = 1 << 20
#: Room for what a model file holds besides its arrays: HDF5 metadata, the commit slots, the log's first chunk.
FILE_OVERHEAD_BYTES = 1 << 20
# An HDF5 dataset's byte size and a NumPy array's both must fit in a signed 64-bit count.
_MAX_BYTES = 2**63 - 1


def default_alpha(layers: int) -> float:
    """The residual scale of the original experiment: 1/sqrt(L)."""
    layers = check_int("layers", layers, minimum=1)
    return 1.0 / math.sqrt(layers)


def default_storage_chunk_layers(layers: int, width: int) -> int:
    """Layers per HDF5 storage chunk: about 1 MiB of float32 rows, at least 1, at most L."""
    row_bytes = 4 * (width * width + width)
    return min(layers, max(1, STORAGE_CHUNK_BYTES // row_bytes))


def model_file_bytes(layers: int, width: int, input_dim: int, n_classes: int, extra_bytes: int = 0) -> int:
    """About the size of a dense model file (its arrays plus FILE_OVERHEAD_BYTES), for the free-space check;
    a ConfigError (one line) for shapes no file or array can hold."""
    row = width * width + width
    core = 4 * layers * row
    heads = 4 * (input_dim * width + width + width * n_classes + n_classes)
    if 4 * row > _MAX_BYTES or core > _MAX_BYTES or heads > _MAX_BYTES:
        raise ConfigError(f"layers={layers:,}, width={width:,}, input_dim={input_dim:,} make arrays of "
                          f"{max(core, heads):,} bytes, more than a file or an array can hold (2**63 - 1)")
    chunk_steps = 8 * -(-layers // default_storage_chunk_layers(layers, width))
    return core + heads + chunk_steps + FILE_OVERHEAD_BYTES + extra_bytes


# ----------------------------------------------------------------------------------------------
# datasets shared by a new file and a rewritten one


def core_stream(seed: int, first_layer: int = 0, width: int = 1) -> np.random.Generator:
    """The generator a new model's core is drawn from (the heads after it), positioned before layer
    ``first_layer``'s draws of a core of ``width``: one 64-bit output per weight, w*w per layer."""
    rng = np.random.default_rng([seed, 0])
    rng.bit_generator.advance(first_layer * width * width)
    return rng


def create_core(f: h5py.File, layers: int, row_size: int, chunk_layers: int) -> h5py.Dataset:
    """Allocate /core/weights, chunked along layers in whole rows."""
    return f.create_dataset(layout.CORE_WEIGHTS, shape=(layers, row_size), dtype="<f4",
                            chunks=(chunk_layers, row_size), fillvalue=0.0)


def create_chunk_step(f: h5py.File, n_chunks: int, step: int) -> None:
    """Allocate /core/chunk_step with every storage chunk at `step` (contiguous: raw writes go to it)."""
    f.create_dataset(layout.CORE_CHUNK_STEP, data=np.full(n_chunks, step, dtype="<i8"))


def create_log(f: h5py.File, rows: np.ndarray) -> None:
    """Allocate /train/log (resizable) holding `rows`."""
    log = f.create_dataset(layout.TRAIN_LOG, shape=(rows.shape[0],), maxshape=(None,), dtype=layout.LOG_DTYPE,
                           chunks=(layout.LOG_CHUNK_ROWS,))
    if rows.shape[0]:
        log.write_direct(np.ascontiguousarray(rows, dtype=layout.LOG_DTYPE))


def create_heads(f: h5py.File, heads: Mapping[str, np.ndarray]) -> None:
    """Allocate and write the four head datasets (contiguous: raw writes go to them)."""
    for key in layout.HEAD_KEYS:
        f.create_dataset(layout.HEAD_PATHS[key], data=heads[key])


def create_commit(f: h5py.File, record: Mapping[str, Any]) -> None:
    """Allocate /train/commit and write `record` into the slot its sequence number selects."""
    encoded = encode_record(record)
    commit = f.create_dataset(layout.TRAIN_COMMIT, data=empty_commit_slots())
    slot = record["seq"] % COMMIT_SLOTS
    commit.write_direct(np.frombuffer(encoded, np.uint8), dest_sel=np.s_[slot, 0 : len(encoded)])


def write_copy(old: h5py.File, new: h5py.File, core: np.ndarray, record: Mapping[str, Any],
               heads: Mapping[str, np.ndarray], rows: np.ndarray, chunk_layers: int,
               extra: Callable[[h5py.File], None] | None, evals: np.ndarray | None = None) -> None:
    """Fill `new` with the model of `old` in the given state (a checkpoint: :meth:`ModelFile.rewrite`).

    Root attributes keep their types; `extra` writes the optional parts as of this state; `evals` are
    the evaluations the record counts (None: /train/evals is copied as it is); any other dataset of
    `old` this deepnet does not know (a newer writer's addition) is copied along.
    """
    for name in old.attrs:
        new.attrs.create(name, old.attrs[name], dtype=old.attrs.get_id(name).dtype)
    new.attrs["step"] = np.int64(record["step"])
    set_fixed_ascii_attr(new, "rng_state", rng_text(record.get("rng_state")), RNG_ATTR_QUANTUM)
    set_fixed_ascii_attr(new, "updated", record["updated"], TIME_ATTR_LEN)
    layers, row_size = core.shape
    weights = create_core(new, layers, row_size, chunk_layers)
    h5io.write_array_blocks(weights, core, h5io.block_layers(chunk_layers, row_size))
    create_chunk_step(new, -(-layers // chunk_layers), record["step"])
    create_heads(new, heads)
    create_log(new, rows)
    create_commit(new, record)
    known = {layout.CORE_WEIGHTS, layout.CORE_CHUNK_STEP, layout.TRAIN_LOG, layout.TRAIN_COMMIT,
             *layout.HEAD_PATHS.values()}
    if evals is not None:
        _evals.create(new, evals)
        known.add(layout.TRAIN_EVALS)

    def copy_unknown(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and name not in known and name not in new:
            parent = name.rpartition("/")[0]
            old.copy(obj, new.require_group(parent) if parent else new, name=name.rpartition("/")[2])

    if extra is not None:
        extra(new)
    old.visititems(copy_unknown)


def write_checkpoint(path: str, old: h5py.File, core: np.ndarray, record: Mapping[str, Any],
                     heads: Mapping[str, np.ndarray], rows: np.ndarray, chunk_layers: int,
                     extra: Callable[[h5py.File], None] | None, *, lock: bool, inode: int | None,
                     old_step: int, evals: np.ndarray | None = None) -> tuple[h5py.File, int | None]:
    """Replace the file at `path` atomically with a copy of `old` in the given state (:func:`write_copy`);
    return the new file, open, and with `lock` the descriptor of the flock taken on it. Refuses if
    `path` is no longer the file `inode` names (another process replaced it). `evals`: as for write_copy."""
    new: h5py.File | None = None
    lock_fd = None
    layers, row_size = core.shape
    heads_bytes = sum(int(np.asarray(a).nbytes) for a in heads.values())
    size = 4 * layers * row_size + heads_bytes + int(rows.nbytes) + FILE_OVERHEAD_BYTES
    size += 0 if evals is None else int(evals.nbytes)
    try:  # the optional parts (a weight average is a second core) are about as big as in the old file
        size = max(size, os.path.getsize(path))
    except OSError:
        pass
    short = space_shortfall(path, size)
    if short:
        raise ModelFileError(f"could not write a checkpoint of {path}: {short} (the file still holds step {old_step})")
    try:
        # This process holds the file's lock (HDF5's, or its own flock): the new file takes it over.
        with atomic_path(path, lock=False) as tmp:
            new = open_h5(tmp, "w")
            write_copy(old, new, core, record, heads, rows, chunk_layers, extra, evals)
            new.flush()
            if lock:
                lock_fd = flock(tmp, exclusive=True)
            if inode is not None and os.stat(path).st_ino != inode:
                raise ModelFileError(f"{path} was replaced by another process while this one was training it; "
                                     f"not overwriting it (the checkpoint of step {record['step']} is lost)")
    except BaseException as exc:
        if new is not None:
            try:
                new.close()
            except Exception:
                pass
        if lock_fd is not None:
            os.close(lock_fd)
        if isinstance(exc, (OSError, RuntimeError)):
            raise ModelFileError(f"could not write a checkpoint of {path}: {os_reason(exc)} "
                                 f"(the file still holds step {old_step})") from exc
        raise
    return new, lock_fd


# ----------------------------------------------------------------------------------------------
# a new file


def create_file(
    path: str | os.PathLike,
    *,
    layers: int,
    width: int,
    activation: str,
    input_dim: int = 784,
    n_classes: int = 10,
    alpha: float | None = None,
    seed: int = 0,
    init_scale: float = 1e-3,
    storage_chunk_layers: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
    core_weights: np.ndarray | None = None,
    heads: Mapping[str, np.ndarray] | None = None,
    extra: Callable[[h5py.File], None] | None = None,
    extra_bytes: int = 0,
) -> str:
    """Write a new, initialised model file at `path` (see :meth:`ModelFile.create`); returns the path.

    `heads` (the four arrays of layout.HEAD_KEYS) are written instead of the drawn ones (a teacher's).
    `extra_bytes` is what `extra` will add, counted in the free-space check made before anything is written."""
    path = os.fspath(path)
    layers = check_int("layers", layers, minimum=1)
    width = check_int("width", width, minimum=1)
    input_dim = check_int("input_dim", input_dim, minimum=1)
    n_classes = check_int("n_classes", n_classes, minimum=2)
    seed = check_int("seed", seed, minimum=0)
    if not isinstance(activation, str) or not activation.strip():
        raise ConfigError(f"activation must be a non-empty name, got {activation!r}")
    if activation != activation.strip():
        raise ConfigError(f"activation name {activation!r} has leading or trailing whitespace")
    alpha = default_alpha(layers) if alpha is None else check_float("alpha", alpha, positive=True)
    init_scale = check_float("init_scale", init_scale, nonnegative=True)
    row_size = width * width + width
    if storage_chunk_layers is None:
        chunk_layers = default_storage_chunk_layers(layers, width)
    else:
        chunk_layers = min(layers, check_int("storage_chunk_layers", storage_chunk_layers, minimum=1))
    if core_weights is not None:
        core_weights = np.asarray(core_weights)
        if core_weights.shape != (layers, row_size):
            raise ConfigError(f"core_weights has shape {core_weights.shape} but layers={layers}, width={width} "
                              f"need {(layers, row_size)}")
        if not (np.issubdtype(core_weights.dtype, np.floating) or np.issubdtype(core_weights.dtype, np.integer)):
            raise ConfigError(f"core_weights must be a float array, got dtype {core_weights.dtype}")
    size = model_file_bytes(layers, width, input_dim, n_classes, check_int("extra_bytes", extra_bytes, minimum=0))
    check_output(path, overwrite=overwrite)

    try:
        with atomic_path(path, overwrite=overwrite, size=size) as tmp:
            with open_h5(tmp, "w") as f:
                stamp = _write_attributes(f, layers=layers, width=width, activation=activation, alpha=alpha,
                                  input_dim=input_dim, n_classes=n_classes, seed=seed, init_scale=init_scale)
                rng = core_stream(seed)
                _write_core(f, os.path.basename(path), rng, layers=layers, width=width, init_scale=init_scale,
                            chunk_layers=chunk_layers, progress=progress, core_weights=core_weights)
                drawn = _draw_heads(rng, width, input_dim, n_classes)
                heads = drawn if heads is None else _given_heads(heads, drawn)
                create_heads(f, heads)
                create_commit(f, new_record(step=0, heads_crc=heads_crc32(heads, layout.HEAD_KEYS),
                                            updated=stamp))
                f.flush()
                if extra is not None:
                    extra(f)
    except OSError as exc:
        raise ModelFileError(f"could not write {path}: {os_reason(exc)}") from exc
    return path


def _write_attributes(f: h5py.File, *, layers: int, width: int, activation: str, alpha: float, input_dim: int,
                      n_classes: int, seed: int, init_scale: float) -> str:
    """The root attributes of a new file; returns its creation time."""
    stamp = now()
    set_attrs(f, {"format": layout.FORMAT, "format_version": np.int64(layout.FORMAT_VERSION),
                  "kind": layout.KIND_DENSE, "width": np.int64(width), "layers": np.int64(layers),
                  "activation": activation, "alpha": np.float64(alpha), "input_dim": np.int64(input_dim),
                  "n_classes": np.int64(n_classes), "step": np.int64(0), "seed": np.int64(seed)})
    # Rewritten during training: fixed-length, so a rewrite reuses the attribute's storage.
    set_fixed_ascii_attr(f, "rng_state", "", RNG_ATTR_QUANTUM)
    set_fixed_ascii_attr(f, "created", stamp, TIME_ATTR_LEN)
    set_fixed_ascii_attr(f, "updated", stamp, TIME_ATTR_LEN)
    f.attrs["init_scale"] = np.float64(init_scale)
    package = activations.package_of(activation)
    if package is not None:  # a plugin's: name the package that provides it (nothing for a built-in)
        set_attrs(f, {layout.ACTIVATION_PACKAGE_ATTR: package.name,
                      layout.ACTIVATION_PACKAGE_VERSION_ATTR: package.version})
    return stamp


def _write_core(f: h5py.File, name: str, rng: np.random.Generator, *, layers: int, width: int, init_scale: float,
                chunk_layers: int, progress: bool, core_weights: np.ndarray | None) -> None:
    """Allocate the core, chunk_step, log and evaluations, and fill the core: drawn, or `core_weights` with the
    generator advanced past the draws they replace (so the heads drawn next are the same)."""
    # tqdm.auto is slow to import (bench/README.md, "deepnet.formats"); only creation needs it.
    from tqdm.auto import tqdm

    ww = width * width
    row_size = ww + width
    weights = create_core(f, layers, row_size, chunk_layers)
    create_chunk_step(f, -(-layers // chunk_layers), 0)
    create_log(f, np.empty(0, layout.LOG_DTYPE))
    _evals.create(f, _evals.empty())
    block_layers = h5io.block_layers(chunk_layers, row_size)
    buf = None if core_weights is not None else np.zeros((min(block_layers, layers), row_size), np.float32)
    written = h5io.WriteBehind(f.filename, 4 * layers * row_size)
    with written, tqdm(total=layers, desc=f"init {name}", unit="layer", unit_scale=True, disable=not progress,
                       leave=False) as bar:
        for start in range(0, layers, block_layers):
            n = min(block_layers, layers - start)
            if core_weights is not None:
                block = np.ascontiguousarray(core_weights[start : start + n], dtype=np.float32)
            else:
                # float64 draws, then cast: the stream is consumed identically for any block size.
                buf[:n, :ww] = rng.uniform(-init_scale, init_scale, size=(n, ww))
                block = buf[:n]
            h5io.write_block(weights, start, block)
            written.wrote()
            bar.update(n)
    if core_weights is not None:
        # One 64-bit output per float64 uniform replaced.
        rng.bit_generator.advance(layers * ww)


def _given_heads(given: Mapping[str, np.ndarray], drawn: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`given` heads as float32, checked to have the shapes of the drawn ones."""
    out = {}
    for key, like in drawn.items():
        value = np.asarray(given[key], dtype=np.float32)
        if value.shape != like.shape or not np.isfinite(value).all():
            raise ConfigError(f"the given {key.replace('_', ' ')} must be finite of shape {like.shape}, got {value.shape}")
        out[key] = value
    return out


def _draw_heads(rng: np.random.Generator, width: int, input_dim: int, n_classes: int) -> dict[str, np.ndarray]:
    """Xavier-uniform head weights (input head, then output head) and zero biases."""
    lim_in = math.sqrt(6.0 / (input_dim + width))
    lim_out = math.sqrt(6.0 / (width + n_classes))
    w_in = rng.uniform(-lim_in, lim_in, size=(input_dim, width)).astype(np.float32)
    w_out = rng.uniform(-lim_out, lim_out, size=(width, n_classes)).astype(np.float32)
    return {"input_weight": w_in, "input_bias": np.zeros(width, np.float32), "output_weight": w_out,
            "output_bias": np.zeros(n_classes, np.float32)}
