"""The HDF5 model file: one file is one model (see DESIGN.md, "Files").

Layout (format "deepnet", format_version 1, kind "dense")::

    /                    attrs: format, format_version, kind, width, layers, activation, alpha,
                                input_dim, n_classes, step, seed, rng_state, created, updated, init_scale
    /core/weights        float32 (L, w*w + w), chunked along layers; row i = [W_i (in, out) row-major | b_i]
    /core/chunk_step     int64 (n_storage_chunks,): the step that last wrote each storage chunk
    /head/input/weight   float32 (input_dim, w)      /head/input/bias   float32 (w,)
    /head/output/weight  float32 (w, n_classes)      /head/output/bias  float32 (n_classes,)
    /train/log           compound (step i8, loss f8, batch_acc f8, seconds f8), resizable
    /train/commit        uint8 (2, COMMIT_SLOT_BYTES), contiguous: two slots of the commit record

The commit record (``/train/commit``) is what makes a step durable. It holds the committed step, the
minibatch generator's state, the training settings, a CRC-32 of the heads, how many rows of
/train/log belong to the committed history and the log rows not yet appended there. It is written as
raw data into a pre-allocated dataset (never HDF5 metadata), alternately into two slots, each slot
checksummed: a write cut short by a kill leaves the other slot, the previous commit, intact. Readers
take the valid slot with the highest sequence number; the root attributes ``step``/``rng_state``/
``updated`` mirror it at report boundaries (files without the dataset, written before it existed, are
read from those attributes and get it on their first commit).

A step is committed in this order: every storage chunk's ``chunk_step`` is set to the new step before
the chunk is modified, the heads are written, then the record. So a file is in one of three states:

- healthy: every ``chunk_step`` <= the record's step and the heads match its checksum;
- torn: some ``chunk_step`` = step + 1 (a step was being written when the writer died), or the heads
  differ from the record (it died between the heads and the record);
- damaged: anything else (see :mod:`deepnet.tools.check`).

What survives what. Against the death of the writing process (SIGKILL, the OOM killer, a crash, a
second Ctrl-C) every write already made is in the OS page cache and reaches the disk, so the file is
always a committed step or a torn step that ``deepnet check`` describes. Against power loss or an OS
crash only what was fsync'd is safe: an in-memory checkpoint (the new file and its directory are
fsync'd before and after the rename), and in streamed mode the file at every checkpoint and at the end of
a run (``--checkpoint-every``; the memory-mapped core is written back by the same fsync); between those
the OS writes dirty pages back in an order of its choosing. An fsync after every step would make that
per-step too, at about 0.3 s per step on a 10M-layer model (a third of a step), so it is not done.

Choices worth knowing about:

- Creation writes a temporary file next to the target and ``os.replace``-s it into place after an
  fsync, so an interrupted ``init`` never leaves a file that looks complete.
- The per-step write path (``write_layers``) only writes raw data into datasets whose every chunk was
  written at creation, so it never changes HDF5 metadata: a process killed mid-step leaves a file
  that still opens, and ``chunk_step`` says which storage chunks the interrupted step had reached.
  ``chunk_step`` is marked *before* the rows are written, so a torn chunk is never mistaken for an
  untouched one.
- Attributes rewritten during training (``updated``, ``rng_state``) are stored as fixed-length ASCII
  strings: rewriting a variable-length string attribute leaks its old value in the file's global heap
  (about 50 bytes per rewrite, forever), which over millions of steps would grow the file.
- Raw chunk I/O bypasses HDF5's chunk cache (``rdcc_nbytes=0``): chunks are read and written whole
  and sequentially, the OS page cache already holds recent ones, and the cache would only add a copy.
- HDF5's data sieve buffer is off too (``sieve_buf_size=0``): with it, a small raw write (a
  ``chunk_step`` mark) could sit in HDF5's buffer while a later, larger one (the rows it guards) went
  straight to the file, reversing the order a kill must see; and the memory-mapped writers would have
  h5py read stale copies. Raw writes to contiguous datasets (heads, commit record, ``chunk_step``) go
  to the file with one ``pwrite`` each.
- One writer: HDF5 locks the file (flock) while it is open, exclusively for writing; a second writer or
  a reader during training is refused with a one-line message. Where HDF5's locking is switched off
  (``HDF5_USE_FILE_LOCKING=FALSE``, as on some network file systems) deepnet takes the same flock itself.
"""

from __future__ import annotations

import datetime as _dt
import errno as _errno
import json
import math
import operator
import os
import re
from collections.abc import Mapping
from typing import Any

import h5py
import numpy as np

from deepnet.errors import ConfigError, ModelFileError
from deepnet.formats.commit import (  # noqa: F401 - FileState and the slot sizes are part of this module's API
    COMMIT_SLOT_BYTES,
    COMMIT_SLOTS,
    FileState,
    decode_record,
    encode_record,
    json_default,
    new_record,
)
from deepnet.formats.commit import heads_crc32 as _heads_crc32

FORMAT = "deepnet"
FORMAT_VERSION = 1
KIND = "dense"

#: Target size in bytes of one HDF5 storage chunk of /core/weights.
STORAGE_CHUNK_BYTES = 1 << 20
#: Target size in bytes of one block written at a time by create() and write_core().
WRITE_BLOCK_BYTES = 4 << 20

LOG_DTYPE = np.dtype(
    [("step", "<i8"), ("loss", "<f8"), ("batch_acc", "<f8"), ("seconds", "<f8")]
)
LOG_CHUNK_ROWS = 4096

HEAD_KEYS = ("input_weight", "input_bias", "output_weight", "output_bias")
_HEAD_PATHS = {
    "input_weight": "head/input/weight",
    "input_bias": "head/input/bias",
    "output_weight": "head/output/weight",
    "output_bias": "head/output/bias",
}

#: Log rows carried in the commit record before they are appended to /train/log (which changes HDF5
#: metadata, so it happens at report boundaries or when this many rows are waiting).
LOG_PENDING_MAX = 128
# Passed for "leave this part of the record as it is".
_KEEP: Any = object()

# Fixed-length ASCII attributes (see the module docstring for why they are not variable-length).
_TIME_ATTR_LEN = 32
_RNG_ATTR_QUANTUM = 512

# Which `expect` keys open() understands, and the flag each corresponds to.
_EXPECT_KEYS = ("width", "layers", "activation", "input_dim", "n_classes")

_INT_ATTRS = ("format_version", "width", "layers", "input_dim", "n_classes", "step", "seed")
_FLOAT_ATTRS = ("alpha", "init_scale")
_STR_ATTRS = ("format", "kind", "activation", "rng_state", "created", "updated")


def default_alpha(layers: int) -> float:
    """The residual scale of the original experiment: 1/sqrt(L)."""
    layers = _check_int("layers", layers, minimum=1)
    return 1.0 / math.sqrt(layers)


def default_storage_chunk_layers(layers: int, width: int) -> int:
    """Layers per HDF5 storage chunk: about 1 MiB of float32 rows, at least 1, at most L."""
    row_bytes = 4 * (width * width + width)
    return min(layers, max(1, STORAGE_CHUNK_BYTES // row_bytes))


# ----------------------------------------------------------------------------------------------
# small helpers


def _check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{name} must be an integer, got {_show(value)}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ConfigError(f"{name} must be an integer, got {_show(value)}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_float(name: str, value: Any, *, positive: bool = False, nonnegative: bool = False) -> float:
    if isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{name} must be a number, got {_show(value)}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {_show(value)}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value}")
    if positive and not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value}")
    if nonnegative and not value >= 0:
        raise ConfigError(f"{name} must be >= 0, got {value}")
    return value


def _now() -> str:
    """Current UTC time as ISO-8601 with a fixed length (25 characters)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _os_reason(exc: BaseException) -> str:
    """A short one-line reason for an OSError, including those h5py builds from HDF5's error stack."""
    err = getattr(exc, "errno", None)
    if not err:
        m = re.search(r"errno = (\d+)", str(exc))
        if m:
            err = int(m.group(1))
    if err:
        try:
            return os.strerror(err)
        except ValueError:
            pass
    return _one_line(str(exc)) or type(exc).__name__


def _fixed_ascii(text: str, length: int) -> tuple[np.ndarray, np.dtype]:
    dtype = h5py.string_dtype("ascii", length)
    return np.array(text.encode("ascii"), dtype=dtype), dtype


def _set_fixed_ascii_attr(attrs: h5py.AttributeManager, name: str, text: str, quantum: int) -> None:
    """Write a string attribute as fixed-length ASCII, NUL-padded to a multiple of `quantum` bytes.

    Rewriting it with a value that fits the same length reuses the attribute's storage in the object
    header, so per-step rewrites do not grow the file.
    """
    length = max(quantum, -(-len(text) // quantum) * quantum)
    data, dtype = _fixed_ascii(text, length)
    _rewrite_attr(attrs, name, data, dtype)


def _rewrite_attr(attrs: h5py.AttributeManager, name: str, data: Any, dtype: Any) -> None:
    """Set an attribute, in place when one of the same type and shape exists.

    h5py's ``attrs[name] = x`` replaces an existing attribute by creating a temporary, deleting the old
    one and renaming, in three calls: a Ctrl-C between them (Python runs signal handlers between C
    calls) would leave the attribute missing and the file unreadable. Writing in place is one call.
    """
    value = np.asarray(data, dtype=dtype)
    if name in attrs:
        attr = h5py.h5a.open(attrs._id, name.encode())
        if attr.dtype == value.dtype and attr.shape == value.shape:
            attr.write(value)
            return
    attrs.create(name, value, dtype=dtype)


def _write_block(dset: h5py.Dataset, start: int, block: np.ndarray) -> None:
    """Write `block` into rows [start, start + len(block)) of `dset` (one hook for tests)."""
    dset.write_direct(block, dest_sel=np.s_[start : start + block.shape[0]])


def _file_access() -> Any:
    """HDF5 file access properties: no chunk cache and no data sieve buffer (see the module docstring)."""
    try:
        from h5py._hl.files import make_fapl

        fapl = make_fapl(None, rdcc_nbytes=0)
        fapl.set_sieve_buf_size(0)
        return fapl
    except Exception:  # pragma: no cover - an h5py without these internals: its defaults still work
        return None


def _open_h5(path: str, mode: str) -> h5py.File:
    """Open ("r", "r+") or create ("w") an HDF5 file with deepnet's access properties."""
    fapl = _file_access()
    if fapl is None:  # pragma: no cover
        return h5py.File(path, mode, rdcc_nbytes=0)
    name = os.fsencode(path)
    if mode == "r":
        fid = h5py.h5f.open(name, h5py.h5f.ACC_RDONLY, fapl=fapl)
    elif mode == "r+":
        fid = h5py.h5f.open(name, h5py.h5f.ACC_RDWR, fapl=fapl)
    elif mode == "w":
        fid = h5py.h5f.create(name, h5py.h5f.ACC_TRUNC, fapl=fapl)
    else:
        raise ValueError(f"mode {mode!r}")
    return h5py.File(fid)


def _hdf5_locking_disabled() -> bool:
    """True when HDF5 will not lock files (then deepnet takes the same flock itself)."""
    return os.environ.get("HDF5_USE_FILE_LOCKING", "").strip().upper() in ("FALSE", "0")


def _flock(path: str, exclusive: bool) -> int:
    """Take the lock HDF5 would take (a non-blocking flock on the file); return the descriptor holding it."""
    import fcntl

    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _pwrite_all(fd: int, data: Any, offset: int) -> None:
    view = memoryview(data).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _contiguous_offset(ds: h5py.Dataset) -> int | None:
    """Byte offset of a contiguous, allocated, unfiltered dataset in the file (None otherwise)."""
    if ds.chunks is not None or ds.compression or ds.shuffle or ds.fletcher32 or ds.scaleoffset is not None:
        return None
    try:
        offset = ds.id.get_offset()
    except Exception:  # pragma: no cover
        return None
    return None if offset is None else int(offset)


def heads_crc32(heads: Mapping[str, np.ndarray]) -> int:
    """CRC-32 of the four head arrays' bytes, in HEAD_KEYS order (recorded with every commit)."""
    return _heads_crc32(heads, HEAD_KEYS)


# ----------------------------------------------------------------------------------------------


class ModelFile:
    """One deepnet model in one HDF5 file.

    Use :meth:`create` to make a new file and :meth:`open` to open an existing one; both validate
    everything and raise :class:`ModelFileError` (file problems) or :class:`ConfigError` (bad argument
    values) with a one-line message. The object is a context manager.
    """

    # ------------------------------------------------------------------ construction

    def __init__(self, h5file: h5py.File, path: str, mode: str, meta: dict[str, Any]):
        # Use create() / open(); this only wires up an already validated file.
        self._f: h5py.File | None = h5file
        self._path = path
        self._mode = mode
        self._layers = meta["layers"]
        self._width = meta["width"]
        self._activation = meta["activation"]
        self._alpha = meta["alpha"]
        self._input_dim = meta["input_dim"]
        self._n_classes = meta["n_classes"]
        self._seed = meta["seed"]
        self._init_scale = meta["init_scale"]
        self._chunk_layers = meta["storage_chunk_layers"]
        self._lock_fd: int | None = None
        self._bind(h5file)
        self._record: dict = self._load_record(meta)

    def _bind(self, h5file: h5py.File) -> None:
        """(Re)attach the dataset handles and raw-write offsets to an open HDF5 file."""
        self._f = h5file
        self._weights: h5py.Dataset = h5file["core/weights"]
        self._chunk_step: h5py.Dataset = h5file["core/chunk_step"]
        self._log: h5py.Dataset = h5file["train/log"]
        commit = h5file.get("train/commit")
        self._commit: h5py.Dataset | None = commit if isinstance(commit, h5py.Dataset) else None
        # Raw writes to contiguous datasets go straight to HDF5's own descriptor (one pwrite each).
        self._fd: int | None = None
        if self._mode == "r+" and h5file.driver == "sec2":
            try:
                self._fd = int(h5file.id.get_vfd_handle())
            except Exception:  # pragma: no cover
                self._fd = None
        self._offsets: dict[str, int | None] = {}
        try:  # which file this is, to notice it being replaced under us (see rewrite)
            self._inode = os.stat(self._path).st_ino
        except OSError:  # pragma: no cover
            self._inode = None

    def _offset(self, name: str) -> int | None:
        if name not in self._offsets:
            self._offsets[name] = _contiguous_offset(self._f[name]) if self._fd is not None else None
        return self._offsets[name]

    def _raw_write(self, name: str, array: np.ndarray, byte_offset: int = 0) -> None:
        """Write `array`'s bytes into dataset `name` at `byte_offset`: a pwrite when the dataset is
        contiguous (no HDF5 call at all), else through h5py. Never changes HDF5 metadata."""
        offset = self._offset(name)
        if offset is not None:
            _pwrite_all(self._fd, np.ascontiguousarray(array), offset + byte_offset)
            return
        ds = self._f[name]
        flat = np.ascontiguousarray(array)
        if byte_offset == 0 and flat.shape == ds.shape:
            ds.write_direct(flat)
            return
        # Only the commit record and chunk_step are written partially; both are 1-byte or 8-byte rows.
        item = ds.dtype.itemsize
        start = byte_offset // item
        flat = flat.view(ds.dtype).reshape(-1)
        if ds.ndim == 1:
            ds.write_direct(flat, dest_sel=np.s_[start : start + flat.size])
        else:
            row, col = divmod(start, ds.shape[1])
            ds.write_direct(flat, dest_sel=np.s_[row, col : col + flat.size])

    @classmethod
    def create(
        cls,
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
        extra: Any = None,
    ) -> "ModelFile":
        """Create a new model file at `path`, initialised, and return it open in mode "r+".

        Core weights are uniform in [-init_scale, init_scale] with zero biases, drawn block by block
        from ``np.random.default_rng([seed, 0])`` as float64 and cast to float32 (so the result does
        not depend on the block or storage chunk size); the heads are Xavier-uniform with zero biases,
        drawn afterwards from the same generator (input head, then output head). With `core_weights`
        the given (L, w*w + w) array is written instead of drawn, and the generator is advanced past
        the draws it replaces, so the heads are the same as without it. `extra`, if given, is called
        with the new h5py file to add optional parts (e.g. deepnet.nn.branch's MLP branch) before it is placed.

        The file is written under a temporary name in the same directory and renamed into place only
        when complete; on any failure the temporary file is removed.
        """
        path = os.fspath(path)
        layers = _check_int("layers", layers, minimum=1)
        width = _check_int("width", width, minimum=1)
        input_dim = _check_int("input_dim", input_dim, minimum=1)
        n_classes = _check_int("n_classes", n_classes, minimum=2)
        seed = _check_int("seed", seed, minimum=0)
        if not isinstance(activation, str) or not activation.strip():
            raise ConfigError(f"activation must be a non-empty name, got {activation!r}")
        if activation != activation.strip():
            raise ConfigError(f"activation name {activation!r} has leading or trailing whitespace")
        alpha = default_alpha(layers) if alpha is None else _check_float("alpha", alpha, positive=True)
        init_scale = _check_float("init_scale", init_scale, nonnegative=True)
        row_size = width * width + width
        if storage_chunk_layers is None:
            chunk_layers = default_storage_chunk_layers(layers, width)
        else:
            chunk_layers = min(layers, _check_int("storage_chunk_layers", storage_chunk_layers, minimum=1))
        if core_weights is not None:
            core_weights = np.asarray(core_weights)
            if core_weights.shape != (layers, row_size):
                raise ConfigError(
                    f"core_weights has shape {core_weights.shape} but layers={layers}, width={width} "
                    f"need {(layers, row_size)}"
                )
            if not (np.issubdtype(core_weights.dtype, np.floating) or np.issubdtype(core_weights.dtype, np.integer)):
                raise ConfigError(f"core_weights must be a float array, got dtype {core_weights.dtype}")

        # Where the file goes: refuse what would fail anyway, before writing hundreds of MB.
        directory = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path):
            raise ModelFileError(f"cannot create {path}: it is a directory")
        if os.path.lexists(path) and not overwrite:
            raise ModelFileError(f"{path} already exists (pass overwrite=True / --overwrite to replace it)")
        if overwrite:
            _refuse_if_in_use(path)
        if not os.path.isdir(directory):
            raise ModelFileError(f"cannot create {path}: directory {directory} does not exist")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise ModelFileError(f"cannot create {path}: directory {directory} is not writable")

        tmp = _temporary_name(path)
        try:
            with _open_h5(tmp, "w") as f:
                cls._write_new(
                    f,
                    name=path,
                    layers=layers,
                    width=width,
                    activation=activation,
                    input_dim=input_dim,
                    n_classes=n_classes,
                    alpha=alpha,
                    seed=seed,
                    init_scale=init_scale,
                    chunk_layers=chunk_layers,
                    progress=progress,
                    core_weights=core_weights,
                )
                if extra is not None:
                    extra(f)
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if overwrite:
                _refuse_if_in_use(path)
            _place(tmp, path, overwrite)
        except BaseException as exc:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            if isinstance(exc, FileExistsError):
                raise ModelFileError(
                    f"{path} already exists (pass overwrite=True / --overwrite to replace it)"
                ) from None
            if isinstance(exc, OSError):
                raise ModelFileError(f"could not write {path}: {_os_reason(exc)}") from exc
            raise
        fsync_dir(directory)
        return cls.open(path, "r+")

    @staticmethod
    def _write_new(
        f: h5py.File,
        *,
        name: str,
        layers: int,
        width: int,
        activation: str,
        input_dim: int,
        n_classes: int,
        alpha: float,
        seed: int,
        init_scale: float,
        chunk_layers: int,
        progress: bool,
        core_weights: np.ndarray | None,
    ) -> None:
        ww = width * width
        row_size = ww + width
        n_chunks = -(-layers // chunk_layers)
        now = _now()

        a = f.attrs
        a["format"] = FORMAT
        a["format_version"] = np.int64(FORMAT_VERSION)
        a["kind"] = KIND
        a["width"] = np.int64(width)
        a["layers"] = np.int64(layers)
        a["activation"] = activation
        a["alpha"] = np.float64(alpha)
        a["input_dim"] = np.int64(input_dim)
        a["n_classes"] = np.int64(n_classes)
        a["step"] = np.int64(0)
        a["seed"] = np.int64(seed)
        _set_fixed_ascii_attr(a, "rng_state", "", _RNG_ATTR_QUANTUM)
        _set_fixed_ascii_attr(a, "created", now, _TIME_ATTR_LEN)
        _set_fixed_ascii_attr(a, "updated", now, _TIME_ATTR_LEN)
        a["init_scale"] = np.float64(init_scale)

        weights = f.create_dataset(
            "core/weights",
            shape=(layers, row_size),
            dtype="<f4",
            chunks=(chunk_layers, row_size),
            fillvalue=0.0,
        )
        f.create_dataset("core/chunk_step", data=np.zeros(n_chunks, dtype="<i8"))
        f.create_dataset(
            "train/log",
            shape=(0,),
            maxshape=(None,),
            dtype=LOG_DTYPE,
            chunks=(LOG_CHUNK_ROWS,),
        )

        from tqdm.auto import tqdm

        rng = np.random.default_rng([seed, 0])
        block_layers = _block_layers(chunk_layers, row_size)
        buf = None if core_weights is not None else np.zeros((min(block_layers, layers), row_size), np.float32)
        with tqdm(
            total=layers,
            desc=f"init {os.path.basename(name)}",
            unit="layer",
            unit_scale=True,
            disable=not progress,
            leave=False,
        ) as bar:
            for start in range(0, layers, block_layers):
                n = min(block_layers, layers - start)
                if core_weights is not None:
                    block = np.ascontiguousarray(core_weights[start : start + n], dtype=np.float32)
                else:
                    # float64 draws, then cast: the stream is consumed identically for any block size.
                    buf[:n, :ww] = rng.uniform(-init_scale, init_scale, size=(n, ww))
                    block = buf[:n]
                _write_block(weights, start, block)
                bar.update(n)
        if core_weights is not None:
            # Skip the draws the given array replaced (one 64-bit output per float64 uniform), so the
            # heads below are the ones a drawn core would have been followed by.
            rng.bit_generator.advance(layers * ww)

        lim_in = math.sqrt(6.0 / (input_dim + width))
        lim_out = math.sqrt(6.0 / (width + n_classes))
        w_in = rng.uniform(-lim_in, lim_in, size=(input_dim, width)).astype(np.float32)
        w_out = rng.uniform(-lim_out, lim_out, size=(width, n_classes)).astype(np.float32)
        f.create_dataset("head/input/weight", data=w_in)
        f.create_dataset("head/input/bias", data=np.zeros(width, dtype=np.float32))
        f.create_dataset("head/output/weight", data=w_out)
        f.create_dataset("head/output/bias", data=np.zeros(n_classes, dtype=np.float32))
        heads = {"input_weight": w_in, "input_bias": np.zeros(width, np.float32), "output_weight": w_out,
                 "output_bias": np.zeros(n_classes, np.float32)}
        commit = f.create_dataset("train/commit", data=np.zeros((COMMIT_SLOTS, COMMIT_SLOT_BYTES), np.uint8))
        record = encode_record(new_record(step=0, heads_crc=heads_crc32(heads), updated=now))
        commit.write_direct(np.frombuffer(record, np.uint8), dest_sel=np.s_[0, 0 : len(record)])
        f.flush()

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r", *, expect: Mapping[str, Any] | None = None) -> "ModelFile":
        """Open and validate an existing model file ("r": read-only, "r+": read/write).

        `expect` holds values the caller's flags asked for (any of width, layers, activation,
        input_dim, n_classes; None values are ignored); a disagreement with the file is an error.
        """
        path = os.fspath(path)
        if mode not in ("r", "r+"):
            raise ConfigError(f"mode must be 'r' or 'r+', got {mode!r}")
        expect = dict(expect or {})
        unknown = sorted(set(expect) - set(_EXPECT_KEYS))
        if unknown:
            raise ConfigError(f"cannot check {', '.join(unknown)} against a model file (known: {', '.join(_EXPECT_KEYS)})")

        if not os.path.exists(path):
            raise ModelFileError(f"no model file at {path}")
        if os.path.isdir(path):
            raise ModelFileError(f"{path} is a directory, not a model file")
        if not os.access(path, os.R_OK if mode == "r" else os.R_OK | os.W_OK):
            raise ModelFileError(f"could not open {path} in mode {mode!r}: {os.strerror(_errno.EACCES)}")
        try:
            is_hdf5 = h5py.is_hdf5(path)
        except OSError as exc:
            raise ModelFileError(f"could not open {path}: {_os_reason(exc)}") from exc
        if not is_hdf5:
            raise ModelFileError(f"{path} is not a deepnet model file (not an HDF5 file)")
        locked = f"could not open {path} in mode {mode!r}: it is locked by another process (a training run?)"
        lock_fd = None
        if _hdf5_locking_disabled():
            try:
                lock_fd = _flock(path, exclusive=(mode == "r+"))
            except BlockingIOError:
                raise ModelFileError(locked) from None
            except OSError as exc:
                raise ModelFileError(f"could not open {path} in mode {mode!r}: {_os_reason(exc)}") from exc
        try:
            f = _open_h5(path, mode)
        except OSError as exc:
            if lock_fd is not None:
                os.close(lock_fd)
            if "unable to lock file" in str(exc):
                raise ModelFileError(locked) from exc
            raise ModelFileError(f"could not open {path} in mode {mode!r}: {_os_reason(exc)}") from exc
        try:
            meta = _validate(f, path)
            _check_expect(meta, expect, path)
            model_file = cls(f, path, mode, meta)
            model_file._lock_fd = lock_fd
            return model_file
        except BaseException:
            f.close()
            if lock_fd is not None:
                os.close(lock_fd)
            raise

    # ------------------------------------------------------------------ properties

    @property
    def path(self) -> str:
        return self._path

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def closed(self) -> bool:
        return self._f is None

    @property
    def h5(self) -> h5py.File:
        """The open h5py file, for the optional parts stored beside the model (deepnet.nn.branch: /branch,
        deepnet.training.ema: /ema, deepnet.training.heldout: /train/heldout), which this class carries along unread."""
        return self._file()

    @property
    def layers(self) -> int:
        return self._layers

    @property
    def width(self) -> int:
        return self._width

    @property
    def activation(self) -> str:
        return self._activation

    @property
    def alpha(self) -> float:
        return self._alpha

    @property
    def input_dim(self) -> int:
        return self._input_dim

    @property
    def n_classes(self) -> int:
        return self._n_classes

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def init_scale(self) -> float:
        return self._init_scale

    @property
    def row_size(self) -> int:
        """Floats per layer row: w*w weights then w biases."""
        return self._width * self._width + self._width

    @property
    def storage_chunk_layers(self) -> int:
        """Layers per HDF5 storage chunk of /core/weights (the last chunk may be shorter)."""
        return self._chunk_layers

    @property
    def n_storage_chunks(self) -> int:
        return -(-self._layers // self._chunk_layers)

    @property
    def step(self) -> int:
        """The committed step (training steps completed); setting it commits that step number."""
        self._file()
        return int(self._record["step"])

    @step.setter
    def step(self, value: int) -> None:
        value = _check_int("step", value, minimum=0)
        f = self._writable()
        self._write_record(step=value)
        _rewrite_attr(f.attrs, "step", value, np.int64)
        self._touch()

    @property
    def rng_state(self) -> dict | None:
        """The training generator's ``bit_generator.state`` at the committed step (None until stored)."""
        self._file()
        if self._rng_error:
            raise ModelFileError(self._rng_error)
        state = self._record.get("rng_state")
        return None if state is None else json.loads(json.dumps(state, default=json_default))  # a copy

    @rng_state.setter
    def rng_state(self, state: Mapping | None) -> None:
        text = _rng_text(state)
        f = self._writable()
        self._write_record(rng_state=None if state is None else json.loads(text))
        _set_fixed_ascii_attr(f.attrs, "rng_state", text, _RNG_ATTR_QUANTUM)
        self._touch()

    @property
    def train_settings(self) -> dict | None:
        """The training settings of the last commit (layer_lr, head_lr, batch, train_limit), if any."""
        self._file()
        settings = self._record.get("train")
        return None if settings is None else dict(settings)

    @property
    def torn_accepted(self) -> dict | None:
        """If this history includes a torn step accepted with --resume-torn: which step and how many layers."""
        self._file()
        note = self._record.get("torn_accepted")
        return None if note is None else dict(note)

    @property
    def created(self) -> str:
        return _decode(self._file().attrs["created"])

    @property
    def updated(self) -> str:
        """When the file was last committed to (UTC, ISO-8601)."""
        f = self._file()
        return self._record.get("updated") or _decode(f.attrs["updated"])

    # ------------------------------------------------------------------ core weights

    def read_layers(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) of the core as a (stop-start, row_size) float32 C-contiguous array.

        With `out` (float32, C-contiguous, shape (n, row_size) with n >= stop-start) the rows are read
        straight into ``out[:stop-start]`` with no intermediate copy, and that view is returned; a
        longer `out` lets one chunk buffer serve a shorter last chunk.
        """
        self._file()
        start, stop = self._check_range(start, stop)
        n = stop - start
        if out is None:
            out = np.empty((n, self.row_size), dtype=np.float32)
            dest = out
        else:
            if not isinstance(out, np.ndarray) or out.dtype != np.float32 or not out.flags.c_contiguous or not out.flags.writeable:
                raise ConfigError("out must be a writeable C-contiguous float32 array")
            if out.ndim != 2 or out.shape[1] != self.row_size or out.shape[0] < n:
                raise ConfigError(f"out has shape {out.shape} but rows [{start}, {stop}) need ({n}, {self.row_size})")
            dest = out if out.shape[0] == n else out[:n]
        if n:
            if dest.shape[0] == out.shape[0]:
                self._weights.read_direct(out, source_sel=np.s_[start:stop])
            else:
                self._weights.read_direct(out, source_sel=np.s_[start:stop], dest_sel=np.s_[0:n])
        return dest

    def write_layers(self, start: int, rows: np.ndarray, step: int) -> None:
        """Write `rows` at layers [start, start+len(rows)) and mark the storage chunks it touches.

        ``chunk_step`` is set to `step` for every touched storage chunk *before* the rows are written,
        so an interruption in between shows up as a torn step rather than as untouched data. Only raw
        data of pre-allocated datasets is written: no HDF5 metadata changes.
        """
        self._writable()
        step = _check_int("step", step, minimum=0)
        start = _check_int("start", start)
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.row_size:
            raise ConfigError(
                f"rows has shape {rows.shape} but a layer row of {self._path} has {self.row_size} floats"
            )
        start, stop = self._check_range(start, start + rows.shape[0])
        if stop == start:
            return
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        c0 = start // self._chunk_layers
        c1 = (stop - 1) // self._chunk_layers + 1
        self._raw_write("core/chunk_step", np.full(c1 - c0, step, dtype="<i8"), 8 * c0)
        _write_block(self._weights, start, rows)

    def mark_chunk_steps(self, start: int, stop: int, step: int) -> None:
        """Record `step` in ``chunk_step`` for every storage chunk that layers [start, stop) touch.

        For writers that update the core outside ``write_layers`` (the memory-mapped streamed mode):
        mark first, then modify, so an interruption shows up as a torn step.
        """
        self._writable()
        start, stop = self._check_range(_check_int("start", start), _check_int("stop", stop))
        if stop == start:
            return
        c0 = start // self._chunk_layers
        c1 = (stop - 1) // self._chunk_layers + 1
        self._raw_write("core/chunk_step", np.full(c1 - c0, _check_int("step", step, minimum=0), dtype="<i8"), 8 * c0)

    def chunk_step_offset(self) -> int | None:
        """Byte offset of /core/chunk_step (contiguous little-endian int64) in the file, for writers that
        memory-map it; None if it is stored any other way."""
        ds = self._chunk_step
        if ds.chunks is not None or ds.dtype != np.dtype("<i8"):
            return None
        offset = ds.id.get_offset()
        return None if offset is None or offset % 8 else int(offset)

    def core_chunk_offsets(self) -> np.ndarray | None:
        """Byte offset in the file of each storage chunk of /core/weights, in layer order, when the core
        can be memory-mapped straight from the file: every chunk allocated, unfiltered, little-endian
        float32, 4-byte aligned, full size. None when it cannot (then use read_layers/write_layers)."""
        ds = self._weights
        if ds.dtype != np.dtype("<f4") or ds.chunks is None or ds.compression or ds.shuffle or ds.fletcher32 \
                or ds.scaleoffset is not None:
            return None
        try:
            n = ds.id.get_num_chunks()
            if n != self.n_storage_chunks:
                return None
            chunk_bytes = self._chunk_layers * self.row_size * 4
            offsets = np.full(n, -1, dtype=np.int64)
            for i in range(n):
                info = ds.id.get_chunk_info(i)
                index = info.chunk_offset[0] // self._chunk_layers
                if info.filter_mask or info.size != chunk_bytes or info.byte_offset % 4 or not 0 <= index < n:
                    return None
                offsets[index] = info.byte_offset
        except (AttributeError, RuntimeError, ValueError, OSError):  # an HDF5 without chunk queries
            return None
        return None if (offsets < 0).any() else offsets

    def read_core(self) -> np.ndarray:
        """The whole core, (layers, row_size) float32, in RAM (for the in-memory mode)."""
        self._file()
        out = np.empty((self._layers, self.row_size), dtype=np.float32)
        block = _block_layers(self._chunk_layers, self.row_size)
        for start in range(0, self._layers, block):
            stop = min(self._layers, start + block)
            self._weights.read_direct(out, source_sel=np.s_[start:stop], dest_sel=np.s_[start:stop])
        return out

    def write_core(self, arr: np.ndarray, step: int) -> None:
        """Write the whole core from `arr` (layers, row_size) and mark every storage chunk with `step`.

        This writes in place (a few MiB of whole storage chunks at a time); all of ``chunk_step`` is
        marked first, so an interrupted write-back is visible as a torn step.
        """
        self._writable()
        step = _check_int("step", step, minimum=0)
        arr = np.asarray(arr)
        if arr.shape != (self._layers, self.row_size):
            raise ConfigError(f"core array has shape {arr.shape} but {self._path} needs {(self._layers, self.row_size)}")
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise ConfigError(f"core array must be float32, got dtype {arr.dtype}")
        self._raw_write("core/chunk_step", np.full(self.n_storage_chunks, step, dtype="<i8"))
        _write_array_blocks(self._weights, arr, _block_layers(self._chunk_layers, self.row_size))
        self._touch()

    def chunk_steps(self) -> np.ndarray:
        """Per storage chunk, the step that last wrote it (int64 copy)."""
        self._file()
        return self._chunk_step[()]

    # ------------------------------------------------------------------ heads

    def read_heads(self) -> dict[str, np.ndarray]:
        """The four head arrays (float32 copies): input_weight, input_bias, output_weight, output_bias."""
        f = self._file()
        return {key: np.ascontiguousarray(f[_HEAD_PATHS[key]][()], dtype=np.float32) for key in HEAD_KEYS}

    def write_heads(self, heads: Mapping[str, np.ndarray]) -> None:
        """Overwrite the four head arrays (each float32 of the file's shape) and commit their checksum
        at the current step. (Training commits heads with :meth:`commit` instead.)"""
        arrays = self._check_heads(heads)
        self._write_heads_raw(arrays)
        self._write_record(heads_crc32=heads_crc32(arrays))
        self._touch()

    def _write_heads_raw(self, arrays: Mapping[str, np.ndarray]) -> None:
        for key in HEAD_KEYS:
            self._raw_write(_HEAD_PATHS[key], arrays[key])

    def _check_heads(self, heads: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._writable()
        missing = [k for k in HEAD_KEYS if k not in heads]
        extra = sorted(set(heads) - set(HEAD_KEYS))
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing)}")
            if extra:
                parts.append(f"unknown {', '.join(map(str, extra))}")
            raise ConfigError(f"heads must have keys {', '.join(HEAD_KEYS)} ({'; '.join(parts)})")
        shapes = self._head_shapes()
        arrays = {}
        for key in HEAD_KEYS:
            value = heads[key]
            if not isinstance(value, np.ndarray):
                raise ConfigError(f"head {key} must be a numpy array, got {type(value).__name__}")
            if value.dtype != np.float32:
                raise ConfigError(f"head {key} has dtype {value.dtype} but float32 is required")
            if value.shape != shapes[key]:
                raise ConfigError(f"head {key} has shape {value.shape} but {self._path} needs {shapes[key]}")
            arrays[key] = np.ascontiguousarray(value)
        return arrays

    # ------------------------------------------------------------------ training log

    def append_log(self, step, loss, batch_acc, seconds) -> None:
        """Append rows to /train/log now; each argument is a scalar or a 1-D sequence of equal length.

        (Training hands its rows to :meth:`commit`, which carries them in the commit record and appends
        them in batches.)"""
        self._writable()
        cols = [np.atleast_1d(np.asarray(v)) for v in (step, loss, batch_acc, seconds)]
        if any(c.ndim != 1 for c in cols):
            raise ConfigError("append_log arguments must be scalars or 1-D sequences")
        n = cols[0].shape[0]
        if any(c.shape[0] != n for c in cols):
            raise ConfigError(f"append_log arguments have different lengths: {[c.shape[0] for c in cols]}")
        if n == 0:
            return
        if not np.issubdtype(cols[0].dtype, np.integer):
            if not np.issubdtype(cols[0].dtype, np.floating) or not np.all(np.mod(cols[0], 1) == 0):
                raise ConfigError("append_log step values must be integers")
        rows = np.empty(n, dtype=LOG_DTYPE)
        for name, col in zip(LOG_DTYPE.names, cols):
            rows[name] = col
        self._append_rows(rows)

    def read_log(self) -> np.ndarray:
        """The committed training log as a structured array (fields step, loss, batch_acc, seconds)."""
        self._file()
        n = int(self._record["log_rows"])
        stored = self._log[:n] if n else np.empty(0, LOG_DTYPE)
        pending = self._record["pending_log"]
        return np.concatenate([stored, _log_rows(pending)]) if pending else stored

    @property
    def log_rows(self) -> int:
        """Rows in the committed training log."""
        self._file()
        return int(self._record["log_rows"]) + len(self._record["pending_log"])

    def flush_log(self) -> None:
        """Append the log rows carried in the commit record to /train/log (an HDF5 metadata change)."""
        self._writable()
        if self._record["pending_log"]:
            self._append_rows(np.empty(0, LOG_DTYPE))

    def _append_rows(self, rows: np.ndarray) -> None:
        # Rows past the committed count (left by an append a kill interrupted) are overwritten.
        rows = np.concatenate([_log_rows(self._record["pending_log"]), rows])
        n = int(self._record["log_rows"])
        try:
            _append_log_rows(self._log, n, rows)
            self._f.flush()
        except (OSError, RuntimeError) as exc:
            raise ModelFileError(
                f"could not append to the training log of {self._path}: {_os_reason(exc)} "
                f"(the file still holds step {self.step})"
            ) from exc
        self._write_record(log_rows=n + rows.shape[0], pending_log=[])

    # ------------------------------------------------------------------ commits

    def commit(self, step: int, heads: Mapping[str, np.ndarray], *, rng_state: Any = _KEEP,
               log: Any = (), train: Any = _KEEP) -> None:
        """Make a training step durable: the heads, then the commit record, as raw writes only.

        Call it once the step's core updates are written (and their chunks marked with `step`).
        `log` holds the rows (step, loss, batch_acc, seconds) of the steps being committed; they are
        carried in the record and appended to /train/log once LOG_PENDING_MAX are waiting (or by
        :meth:`flush_log` / :meth:`sync`). `rng_state` and `train` (the training settings) replace
        the recorded ones when given.
        """
        step = _check_int("step", step, minimum=0)
        arrays = self._check_heads(heads)
        pending = list(self._record["pending_log"])
        for row in log:
            pending.append([int(row[0]), float(row[1]), float(row[2]), float(row[3])])
        changes: dict[str, Any] = {"step": step, "heads_crc32": heads_crc32(arrays), "pending_log": pending}
        if rng_state is not _KEEP:
            if rng_state is not None and not isinstance(rng_state, Mapping):
                raise ConfigError(f"rng_state must be a dict (a bit_generator.state) or None, got {type(rng_state).__name__}")
            changes["rng_state"] = None if rng_state is None else dict(rng_state)
        if train is not _KEEP:
            changes["train"] = None if train is None else dict(train)
        self._write_heads_raw(arrays)
        self._write_record(**changes)
        if len(pending) >= LOG_PENDING_MAX:
            self.flush_log()

    def sync(self, *, durable: bool = False) -> None:
        """Report-boundary housekeeping: append the carried log rows, mirror the committed step, rng
        state and time into the root attributes, flush; with `durable` also fsync the file (which
        writes back the memory-mapped core too)."""
        f = self._writable()
        self.flush_log()
        text = _rng_text(self._record.get("rng_state"))
        if int(f.attrs["step"]) != self.step or _decode(f.attrs["rng_state"]) != text:
            _rewrite_attr(f.attrs, "step", self.step, np.int64)
            _set_fixed_ascii_attr(f.attrs, "rng_state", text, _RNG_ATTR_QUANTUM)
            self._touch()
        try:
            self.flush(sync=durable)
        except (OSError, RuntimeError) as exc:
            raise ModelFileError(f"could not write {self._path}: {_os_reason(exc)}") from exc

    def state(self) -> FileState:
        """Healthy, torn or damaged, from /core/chunk_step and the commit record (weights are not read;
        :func:`deepnet.tools.check.check_model` also checks they are finite)."""
        self._file()
        step = self.step
        cs = self.chunk_steps()
        n = cs.shape[0]
        crc = self._record.get("heads_crc32")
        heads_changed = crc is not None and heads_crc32(self.read_heads()) != crc
        wrong = np.flatnonzero((cs < 0) | (cs > step + 1))
        if wrong.size:
            c = int(wrong[0])
            return FileState("damaged", step, f"storage chunk {c} of /core/chunk_step says step {int(cs[c])} "
                             f"but the committed step is {step} ({wrong.size} such chunks)")
        ahead = np.flatnonzero(cs == step + 1)
        if not ahead.size:
            if heads_changed:
                return FileState("damaged", step, f"the heads differ from the checksum committed with step {step}",
                                 heads_changed=True)
            return FileState("healthy", step, f"healthy: step {step}")
        sizes = np.minimum(self._chunk_layers, self._layers - ahead * self._chunk_layers)
        layers = int(sizes.sum())
        first, last = int(ahead[0]), int(ahead[-1])
        where = f"storage chunk {first}" if first == last else f"storage chunks {first}..{last}"
        message = (f"torn step {step + 1}: {layers} of {self._layers} layers updated ({where} of {n})"
                   + ("; heads updated" if heads_changed else "")
                   + f"; the rest is step {step}")
        return FileState("torn", step, message, torn_step=step + 1, layers_updated=layers,
                         chunks_updated=(first, last), heads_changed=heads_changed)

    def accept_torn(self) -> FileState:
        """Accept a torn step's mixed state as the committed step (``--resume-torn``).

        The record is rewritten first (heads checksum of the heads as they are, and a note of what was
        accepted), then every ``chunk_step`` past the committed step is set back to it; interrupted,
        the file stays torn and this can simply be run again. Returns the state that was accepted.
        """
        self._writable()
        state = self.state()
        if state.status != "torn":
            return state
        self._write_record(heads_crc32=heads_crc32(self.read_heads()),
                           torn_accepted={"step": state.torn_step, "layers_updated": state.layers_updated,
                                          "heads_updated": state.heads_changed})
        self._raw_write("core/chunk_step", np.minimum(self.chunk_steps(), state.step).astype("<i8"))
        self._f.flush()
        return state

    def rewrite(self, core: np.ndarray, *, step: int, heads: Mapping[str, np.ndarray], rng_state: Any = _KEEP,
                log: Any = (), train: Any = _KEEP, progress: bool = False, extra: Any = None) -> None:
        """Replace the whole file atomically with this state (the in-memory mode's checkpoint).

        The new file is written beside this one under a temporary name (the core straight from `core`,
        block by block: no second copy in RAM), fsync'd, then renamed over it; this object then refers
        to it. On any failure the temporary file is removed and the file on disk keeps its last
        committed step. `log` holds the rows of the steps since the last commit. `extra`, if given, is
        called with the new h5py file to write the optional parts (branch, weight average, held-out
        figures) as of this state; what it writes is not copied from the old file.
        """
        self._writable()
        step = _check_int("step", step, minimum=0)
        core = np.asarray(core)
        if core.shape != (self._layers, self.row_size) or core.dtype != np.float32:
            raise ConfigError(f"core array must be float32 of shape {(self._layers, self.row_size)}, "
                              f"got {core.dtype} {core.shape}")
        arrays = self._check_heads(heads)
        rows = np.concatenate([self.read_log(), _log_rows([list(r) for r in log])])
        record = dict(self._record)
        record.update(step=step, heads_crc32=heads_crc32(arrays), log_rows=int(rows.shape[0]), pending_log=[])
        if rng_state is not _KEEP:
            record["rng_state"] = None if rng_state is None else dict(rng_state)
        if train is not _KEEP:
            record["train"] = None if train is None else dict(train)
        record["seq"] = self._record["seq"] + 1
        record["updated"] = _now()
        encoded = encode_record(record)
        if len(encoded) > COMMIT_SLOT_BYTES:
            raise ModelFileError(f"{self._path}: the commit record would take {len(encoded)} bytes, "
                                 f"more than a slot's {COMMIT_SLOT_BYTES}")

        old_step = self.step
        directory = os.path.dirname(os.path.abspath(self._path))
        tmp = _temporary_name(self._path)
        new: h5py.File | None = None
        lock_fd = None
        try:
            new = _open_h5(tmp, "w")
            self._write_copy(new, core, record, encoded, arrays, rows, progress, extra)
            new.flush()
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if self._lock_fd is not None:
                lock_fd = _flock(tmp, exclusive=True)
            if self._inode is not None and os.stat(self._path).st_ino != self._inode:
                raise ModelFileError(f"{self._path} was replaced by another process while this one was training it; "
                                     f"not overwriting it (the checkpoint of step {step} is lost)")
            os.replace(tmp, self._path)
        except BaseException as exc:
            if new is not None:
                try:
                    new.close()
                except Exception:
                    pass
            if lock_fd is not None:
                os.close(lock_fd)
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            if isinstance(exc, (OSError, RuntimeError)):
                raise ModelFileError(
                    f"could not write a checkpoint of {self._path}: {_os_reason(exc)} "
                    f"(the file still holds step {old_step})"
                ) from exc
            raise
        fsync_dir(directory)
        old, old_lock = self._f, self._lock_fd
        self._bind(new)
        self._record = record
        self._lock_fd = lock_fd
        try:
            old.close()
        finally:
            if old_lock is not None:
                os.close(old_lock)

    def _write_copy(self, new: h5py.File, core: np.ndarray, record: dict, encoded: bytes,
                    heads: Mapping[str, np.ndarray], rows: np.ndarray, progress: bool, extra: Any = None) -> None:
        """Fill a new HDF5 file with this model in the given state (see :meth:`rewrite`)."""
        old = self._file()
        for name in old.attrs:  # every root attribute, with its own type (fixed-length strings stay so)
            new.attrs.create(name, old.attrs[name], dtype=old.attrs.get_id(name).dtype)
        new.attrs["step"] = np.int64(record["step"])
        _set_fixed_ascii_attr(new.attrs, "rng_state", _rng_text(record.get("rng_state")), _RNG_ATTR_QUANTUM)
        _set_fixed_ascii_attr(new.attrs, "updated", record["updated"], _TIME_ATTR_LEN)
        weights = new.create_dataset("core/weights", shape=self._weights.shape, dtype="<f4",
                                     chunks=self._weights.chunks, fillvalue=0.0)
        _write_array_blocks(weights, core, _block_layers(self._chunk_layers, self.row_size))
        new.create_dataset("core/chunk_step", data=np.full(self.n_storage_chunks, record["step"], dtype="<i8"))
        for key in HEAD_KEYS:
            new.create_dataset(_HEAD_PATHS[key], data=heads[key])
        new.create_dataset("train/log", data=rows, maxshape=(None,), chunks=(LOG_CHUNK_ROWS,))
        commit = new.create_dataset("train/commit", data=np.zeros((COMMIT_SLOTS, COMMIT_SLOT_BYTES), np.uint8))
        slot = record["seq"] % COMMIT_SLOTS
        commit.write_direct(np.frombuffer(encoded, np.uint8), dest_sel=np.s_[slot, 0 : len(encoded)])
        known = {"core/weights", "core/chunk_step", "train/log", "train/commit", *_HEAD_PATHS.values()}

        def copy_unknown(name: str, obj: Any) -> None:
            # Anything this deepnet does not know about (a newer writer's addition) travels along.
            if isinstance(obj, h5py.Dataset) and name not in known and name not in new:
                parent = name.rpartition("/")[0]
                old.copy(obj, new.require_group(parent) if parent else new, name=name.rpartition("/")[2])

        if extra is not None:
            extra(new)
        old.visititems(copy_unknown)

    def _load_record(self, meta: dict[str, Any]) -> dict:
        """The latest valid commit record; for a file without one, the same fields from its attributes."""
        self._rng_error: str | None = None
        legacy = {"seq": 0, "step": meta["step"], "rng_state": None, "log_rows": int(self._log.shape[0]),
                  "pending_log": [], "heads_crc32": None, "train": None, "updated": meta["updated"]}
        text = meta["rng_state"]
        if text:
            try:
                state = json.loads(text)
                if not isinstance(state, dict):
                    raise ValueError("not a JSON object")
                legacy["rng_state"] = state
            except ValueError as exc:
                legacy_error = f"{self._path}: attribute rng_state is not valid JSON ({exc})"
            else:
                legacy_error = None
        else:
            legacy_error = None
        if self._commit is None:
            self._rng_error = legacy_error
            return legacy
        if self._commit.dtype != np.uint8 or self._commit.shape != (COMMIT_SLOTS, COMMIT_SLOT_BYTES):
            raise ModelFileError(f"{self._path}: dataset /train/commit has dtype {self._commit.dtype} and shape "
                                 f"{self._commit.shape} but uint8 {(COMMIT_SLOTS, COMMIT_SLOT_BYTES)} is required")
        raw = self._commit[()]
        records = [r for r in (decode_record(raw[i].tobytes()) for i in range(COMMIT_SLOTS)) if r is not None]
        if not records:
            if not raw.any():  # allocated, never written
                self._rng_error = legacy_error
                return legacy
            raise ModelFileError(f"{self._path}: the commit record is damaged (no slot of /train/commit passes "
                                 f"its checksum)")
        record = max(records, key=lambda r: r["seq"])
        if meta["step"] > record["step"]:
            # A writer that only knows the attributes (an older deepnet) trained it since.
            self._rng_error = legacy_error
            legacy["seq"] = record["seq"]
            return legacy
        if record["log_rows"] > self._log.shape[0]:
            raise ModelFileError(f"{self._path}: the commit record counts {record['log_rows']} rows of /train/log "
                                 f"but the dataset has {self._log.shape[0]}")
        return record

    def _write_record(self, **changes: Any) -> None:
        """Write the current record with `changes` into the next slot (one raw write)."""
        f = self._writable()
        record = dict(self._record)
        record.update(changes)
        record["seq"] = self._record["seq"] + 1
        record["updated"] = _now()
        try:
            encoded = encode_record(record)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"the commit record is not JSON-serialisable: {exc}") from None
        if len(encoded) > COMMIT_SLOT_BYTES:
            raise ModelFileError(f"{self._path}: the commit record would take {len(encoded)} bytes, "
                                 f"more than a slot's {COMMIT_SLOT_BYTES}")
        if self._commit is None:
            # A file from before the commit record: it gets the dataset now (once; a metadata change).
            self._commit = f.create_dataset("train/commit", data=np.zeros((COMMIT_SLOTS, COMMIT_SLOT_BYTES), np.uint8))
            self._offsets.pop("train/commit", None)
            f.flush()
        slot = record["seq"] % COMMIT_SLOTS
        self._raw_write("train/commit", np.frombuffer(encoded, np.uint8), slot * COMMIT_SLOT_BYTES)
        self._record = record
        if "rng_state" in changes:
            self._rng_error = None

    # ------------------------------------------------------------------ lifecycle

    def flush(self, *, sync: bool = False) -> None:
        """Flush HDF5's buffers to the OS; with `sync` also fsync the file to disk."""
        f = self._file()
        f.flush()
        if sync:
            fd = os.open(self._path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def close(self) -> None:
        """Close the file (idempotent)."""
        if self._f is not None:
            try:
                self._f.close()
            finally:
                self._f = None
                if self._lock_fd is not None:
                    os.close(self._lock_fd)
                    self._lock_fd = None

    def __enter__(self) -> "ModelFile":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        if self._f is None:
            return f"<ModelFile {self._path!r} (closed)>"
        return (
            f"<ModelFile {self._path!r} mode={self._mode!r} layers={self._layers} width={self._width} "
            f"activation={self._activation!r} step={self.step}>"
        )

    def summary(self) -> dict[str, Any]:
        """Everything `deepnet info` shows, as plain Python values."""
        f = self._file()
        n_log = self.log_rows
        last = None
        if n_log:
            pending = self._record["pending_log"]
            row = _log_rows(pending[-1:])[0] if pending else self._log[n_log - 1]
            last = {
                "step": int(row["step"]),
                "loss": float(row["loss"]),
                "batch_acc": float(row["batch_acc"]),
                "seconds": float(row["seconds"]),
            }
        if self._mode == "r+":
            f.flush()  # so the size below counts what this process has written
        return {
            "path": self._path,
            "kind": _decode(f.attrs["kind"]),
            "format_version": int(f.attrs["format_version"]),
            "layers": self._layers,
            "width": self._width,
            "activation": self._activation,
            "alpha": self._alpha,
            "input_dim": self._input_dim,
            "n_classes": self._n_classes,
            "step": self.step,
            "seed": self._seed,
            "init_scale": self._init_scale,
            "file_size_bytes": os.path.getsize(self._path),
            "storage_chunk_layers": self._chunk_layers,
            "created": self.created,
            "updated": self.updated,
            "log_rows": n_log,
            "last_log": last,
            "state": self.state().message,
        }

    # ------------------------------------------------------------------ internals

    def _file(self) -> h5py.File:
        if self._f is None:
            raise ModelFileError(f"{self._path} is closed")
        return self._f

    def _writable(self) -> h5py.File:
        f = self._file()
        if self._mode != "r+":
            raise ModelFileError(f"{self._path} is open read-only (mode 'r')")
        return f

    def _touch(self) -> None:
        _set_fixed_ascii_attr(self._file().attrs, "updated", _now(), _TIME_ATTR_LEN)

    def _check_range(self, start, stop) -> tuple[int, int]:
        start = _check_int("start", start)
        stop = _check_int("stop", stop)
        if not 0 <= start <= stop <= self._layers:
            raise ConfigError(f"layer range [{start}, {stop}) is outside 0..{self._layers} of {self._path}")
        return start, stop

    def _head_shapes(self) -> dict[str, tuple[int, ...]]:
        return _head_shapes(self._width, self._input_dim, self._n_classes)


# ----------------------------------------------------------------------------------------------
# module internals


def _is_int(value: Any) -> bool:
    try:
        operator.index(value)
        return not isinstance(value, (bool, np.bool_))
    except TypeError:
        return False


def _show(value: Any) -> str:
    """An attribute value for a one-line message: plain Python repr, shortened."""
    if isinstance(value, (np.generic, np.ndarray)):
        value = value.tolist()
    if isinstance(value, (bytes, np.bytes_)):
        value = _decode(value)
    text = _one_line(repr(value))
    return text if len(text) <= 60 else text[:57] + "..."


def _decode(value: Any) -> str:
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def _head_shapes(width: int, input_dim: int, n_classes: int) -> dict[str, tuple[int, ...]]:
    return {
        "input_weight": (input_dim, width),
        "input_bias": (width,),
        "output_weight": (width, n_classes),
        "output_bias": (n_classes,),
    }


def _block_layers(chunk_layers: int, row_size: int) -> int:
    """Layers per write/read block: a whole number of storage chunks, about WRITE_BLOCK_BYTES."""
    chunk_bytes = 4 * row_size * chunk_layers
    return chunk_layers * max(1, WRITE_BLOCK_BYTES // chunk_bytes)


def _write_array_blocks(dset: h5py.Dataset, arr: np.ndarray, block_layers: int) -> None:
    for start in range(0, arr.shape[0], block_layers):
        block = np.ascontiguousarray(arr[start : start + block_layers], dtype=np.float32)
        _write_block(dset, start, block)


def _rng_text(state: Any) -> str:
    """A generator state as the JSON text of the rng_state attribute ("" for None)."""
    if state is None:
        return ""
    if not isinstance(state, Mapping):
        raise ConfigError(f"rng_state must be a dict (a bit_generator.state) or None, got {type(state).__name__}")
    try:
        return json.dumps(dict(state), default=json_default)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"rng_state is not JSON-serialisable: {exc}") from None


def _log_rows(rows: list) -> np.ndarray:
    """Log rows [step, loss, batch_acc, seconds] as a LOG_DTYPE array."""
    out = np.empty(len(rows), dtype=LOG_DTYPE)
    for i, row in enumerate(rows):
        out[i] = tuple(row)
    return out


def _append_log_rows(log: h5py.Dataset, at: int, rows: np.ndarray) -> None:
    """Make /train/log `at` + len(rows) rows long with `rows` from row `at` (one hook for tests)."""
    if rows.shape[0] == 0 and log.shape[0] == at:
        return
    log.resize((at + rows.shape[0],))
    if rows.shape[0]:
        log.write_direct(rows, dest_sel=np.s_[at : at + rows.shape[0]])


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


def _temporary_name(path: str) -> str:
    """Where a new version of `path` is written before it is renamed into place."""
    return os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.tmp-{os.getpid()}")


def stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Temporary files beside `path` left by a deepnet process that no longer runs (a killed init or
    checkpoint): safe to remove, never mistaken for the model."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    found = []
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    for name in names:
        m = _TEMPORARY.match(name)
        if not m or m.group("name") != os.path.basename(path):
            continue
        pid = int(m.group("pid"))
        if pid != os.getpid():
            try:
                os.kill(pid, 0)
                continue  # still running: perhaps writing it right now
            except ProcessLookupError:
                pass
            except (PermissionError, OverflowError):
                continue
        else:
            continue
        found.append(os.path.join(directory, name))
    return sorted(found)


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Remove :func:`stale_temporaries` of `path`; returns what was removed."""
    removed = []
    for tmp in stale_temporaries(path):
        try:
            os.unlink(tmp)
            removed.append(tmp)
        except OSError:
            pass
    return removed


def _refuse_if_in_use(path: str) -> None:
    """Refuse to replace a file another process has open for training (it holds HDF5's lock)."""
    import fcntl

    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ModelFileError(f"cannot replace {path}: another process has it open (a training run?)") from None
    except OSError:
        pass
    finally:
        os.close(fd)


def _place(tmp: str, path: str, overwrite: bool) -> None:
    """Move the finished temporary file onto `path` atomically."""
    if overwrite:
        os.replace(tmp, path)
        return
    # Without overwrite, a hard link fails atomically if `path` appeared meanwhile.
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise
    except OSError as exc:
        if exc.errno not in (_errno.EPERM, _errno.EOPNOTSUPP, _errno.EXDEV, _errno.EMLINK, _errno.ENOSYS):
            raise
        if os.path.lexists(path):
            raise FileExistsError(_errno.EEXIST, "File exists", path) from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def fsync_dir(directory: str) -> None:
    """fsync a directory, so a rename inside it survives power loss (best effort: some filesystems refuse)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _validate(f: h5py.File, path: str) -> dict[str, Any]:
    """Check a just-opened file is a complete deepnet v1 model; return its metadata."""
    attrs = f.attrs
    if "format" not in attrs:
        raise ModelFileError(f"{path} is not a deepnet model file (no 'format' attribute)")
    fmt = attrs["format"]
    if not isinstance(fmt, (str, bytes, np.bytes_)) or _decode(fmt) != FORMAT:
        raise ModelFileError(f"{path} is not a deepnet model file (format is {_show(fmt)}, expected {FORMAT!r})")
    if "format_version" not in attrs:
        raise ModelFileError(f"{path} is missing the attribute format_version")
    version = attrs["format_version"]
    if not _is_int_attr(version):
        raise ModelFileError(f"{path} has format_version {_show(version)}, which is not an integer")
    if int(version) != FORMAT_VERSION:
        raise ModelFileError(
            f"{path} has format_version {int(version)} but this deepnet reads format_version {FORMAT_VERSION}"
        )

    missing = [n for n in _INT_ATTRS + _FLOAT_ATTRS + _STR_ATTRS if n not in attrs]
    if missing:
        raise ModelFileError(f"{path} is missing the attribute(s) {', '.join(missing)}")
    meta: dict[str, Any] = {}
    for name in _INT_ATTRS:
        value = attrs[name]
        if not _is_int_attr(value):
            raise ModelFileError(f"{path}: attribute {name} is {_show(value)}, not an integer")
        meta[name] = int(value)
    for name in _FLOAT_ATTRS:
        value = attrs[name]
        if not (_is_int_attr(value) or isinstance(value, (float, np.floating))) or not math.isfinite(float(value)):
            raise ModelFileError(f"{path}: attribute {name} is {_show(value)}, not a finite number")
        meta[name] = float(value)
    for name in _STR_ATTRS:
        value = attrs[name]
        if not isinstance(value, (str, bytes, np.bytes_)):
            raise ModelFileError(f"{path}: attribute {name} is {_show(value)}, not a string")
        meta[name] = _decode(value)

    if meta["kind"] != KIND:
        raise ModelFileError(f"{path} holds a model of kind {meta['kind']!r}; this deepnet reads kind {KIND!r}")
    for name, minimum in (("width", 1), ("layers", 1), ("input_dim", 1), ("n_classes", 2), ("step", 0), ("seed", 0)):
        if meta[name] < minimum:
            raise ModelFileError(f"{path}: attribute {name} is {meta[name]}, must be >= {minimum}")
    if not meta["alpha"] > 0:
        raise ModelFileError(f"{path}: attribute alpha is {meta['alpha']}, must be > 0")
    if not meta["init_scale"] >= 0:
        raise ModelFileError(f"{path}: attribute init_scale is {meta['init_scale']}, must be >= 0")
    if not meta["activation"]:
        raise ModelFileError(f"{path}: attribute activation is empty")

    layers, width = meta["layers"], meta["width"]
    row_size = width * width + width
    implied = f"layers={layers}, width={width}"

    weights = _dataset(f, path, "core/weights")
    _check_dataset(weights, path, np.dtype("<f4"), (layers, row_size), implied)
    chunks = weights.chunks
    if chunks is None or chunks[1] != row_size:
        raise ModelFileError(
            f"{path}: dataset /core/weights must be chunked along layers in whole rows, has chunks {chunks}"
        )
    chunk_layers = chunks[0]
    n_chunks = -(-layers // chunk_layers)
    chunk_step = _dataset(f, path, "core/chunk_step")
    _check_dataset(chunk_step, path, np.dtype("<i8"), (n_chunks,), f"{implied} and {chunk_layers}-layer storage chunks")

    shapes = _head_shapes(width, meta["input_dim"], meta["n_classes"])
    for key in HEAD_KEYS:
        ds = _dataset(f, path, _HEAD_PATHS[key])
        _check_dataset(ds, path, np.dtype("<f4"), shapes[key], f"width={width}, input_dim={meta['input_dim']}, n_classes={meta['n_classes']}")

    log = _dataset(f, path, "train/log")
    if log.dtype != LOG_DTYPE:
        raise ModelFileError(
            f"{path}: dataset /train/log has dtype {log.dtype} but {LOG_DTYPE} is required"
        )
    if log.ndim != 1 or log.maxshape != (None,):
        raise ModelFileError(
            f"{path}: dataset /train/log has shape {log.shape} (max {log.maxshape}) but must be 1-D and resizable"
        )

    meta["storage_chunk_layers"] = chunk_layers
    return meta


def _is_int_attr(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _dataset(f: h5py.File, path: str, name: str) -> h5py.Dataset:
    obj = f.get(name)
    if obj is None:
        raise ModelFileError(f"{path} is missing the dataset /{name}")
    if not isinstance(obj, h5py.Dataset):
        raise ModelFileError(f"{path}: /{name} is a {type(obj).__name__}, not a dataset")
    return obj


def _check_dataset(ds: h5py.Dataset, path: str, dtype: np.dtype, shape: tuple[int, ...], implied: str) -> None:
    if ds.dtype != dtype:
        raise ModelFileError(f"{path}: dataset {ds.name} has dtype {ds.dtype} but {dtype} is required")
    if ds.shape != shape:
        raise ModelFileError(f"{path}: dataset {ds.name} has shape {ds.shape} but {implied} imply {shape}")


def _check_expect(meta: dict[str, Any], expect: dict[str, Any], path: str) -> None:
    for key in _EXPECT_KEYS:
        want = expect.get(key)
        if want is None:
            continue
        have = meta[key]
        if key == "activation":
            same = str(want) == have
        else:
            same = _is_int(want) and operator.index(want) == have
        if not same:
            raise ModelFileError(f"{path} has {key} {have} but --{key.replace('_', '-')} {want} was given")
