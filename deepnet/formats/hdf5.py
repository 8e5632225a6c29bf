"""The HDF5 model file: one file is one model (see DESIGN.md, "Files").

Layout (format "deepnet", format_version 1, kind "dense")::

    /                    attrs: format, format_version, kind, width, layers, activation, alpha,
                                input_dim, n_classes, step, seed, rng_state, created, updated, init_scale
    /core/weights        float32 (L, w*w + w), chunked along layers; row i = [W_i (in, out) row-major | b_i]
    /core/chunk_step     int64 (n_storage_chunks,): the step that last wrote each storage chunk
    /head/input/weight   float32 (input_dim, w)      /head/input/bias   float32 (w,)
    /head/output/weight  float32 (w, n_classes)      /head/output/bias  float32 (n_classes,)
    /train/log           compound (step i8, loss f8, batch_acc f8, seconds f8), resizable

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
    attrs.create(name, data, dtype=dtype)


def _write_block(dset: h5py.Dataset, start: int, block: np.ndarray) -> None:
    """Write `block` into rows [start, start + len(block)) of `dset` (one hook for tests)."""
    dset.write_direct(block, dest_sel=np.s_[start : start + block.shape[0]])


def _open_h5(path: str, mode: str) -> h5py.File:
    # rdcc_nbytes=0: whole-chunk sequential I/O goes straight between the file and the caller's buffer.
    return h5py.File(path, mode, rdcc_nbytes=0)


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
        self._weights: h5py.Dataset = h5file["core/weights"]
        self._chunk_step: h5py.Dataset = h5file["core/chunk_step"]
        self._log: h5py.Dataset = h5file["train/log"]

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
    ) -> "ModelFile":
        """Create a new model file at `path`, initialised, and return it open in mode "r+".

        Core weights are uniform in [-init_scale, init_scale] with zero biases, drawn block by block
        from ``np.random.default_rng([seed, 0])`` as float64 and cast to float32 (so the result does
        not depend on the block or storage chunk size); the heads are Xavier-uniform with zero biases,
        drawn afterwards from the same generator (input head, then output head). With `core_weights`
        the given (L, w*w + w) array is written instead of drawn, and the generator is advanced past
        the draws it replaces, so the heads are the same as without it.

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
        if not os.path.isdir(directory):
            raise ModelFileError(f"cannot create {path}: directory {directory} does not exist")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise ModelFileError(f"cannot create {path}: directory {directory} is not writable")

        tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
        try:
            with h5py.File(tmp, "w", rdcc_nbytes=0) as f:
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
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
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
        _fsync_dir(directory)
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
        try:
            f = _open_h5(path, mode)
        except OSError as exc:
            if "unable to lock file" in str(exc):
                raise ModelFileError(
                    f"could not open {path} in mode {mode!r}: it is locked by another process (a training run?)"
                ) from exc
            raise ModelFileError(f"could not open {path} in mode {mode!r}: {_os_reason(exc)}") from exc
        try:
            meta = _validate(f, path)
            _check_expect(meta, expect, path)
            return cls(f, path, mode, meta)
        except BaseException:
            f.close()
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
        """Training steps completed; setting it also stamps `updated`."""
        return int(self._file().attrs["step"])

    @step.setter
    def step(self, value: int) -> None:
        value = _check_int("step", value, minimum=0)
        f = self._writable()
        f.attrs["step"] = np.int64(value)
        self._touch()

    @property
    def rng_state(self) -> dict | None:
        """The training generator's ``bit_generator.state`` (None until the trainer stores one)."""
        text = _decode(self._file().attrs["rng_state"])
        if not text:
            return None
        try:
            state = json.loads(text)
        except ValueError as exc:
            raise ModelFileError(f"{self._path}: attribute rng_state is not valid JSON ({exc})") from None
        if not isinstance(state, dict):
            raise ModelFileError(f"{self._path}: attribute rng_state is not a JSON object")
        return state

    @rng_state.setter
    def rng_state(self, state: Mapping | None) -> None:
        if state is None:
            text = ""
        else:
            if not isinstance(state, Mapping):
                raise ConfigError(f"rng_state must be a dict (a bit_generator.state) or None, got {type(state).__name__}")
            try:
                text = json.dumps(dict(state), default=_json_default)
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"rng_state is not JSON-serialisable: {exc}") from None
        f = self._writable()
        _set_fixed_ascii_attr(f.attrs, "rng_state", text, _RNG_ATTR_QUANTUM)
        self._touch()

    @property
    def created(self) -> str:
        return _decode(self._file().attrs["created"])

    @property
    def updated(self) -> str:
        return _decode(self._file().attrs["updated"])

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
        self._chunk_step.write_direct(np.full(c1 - c0, step, dtype=np.int64), dest_sel=np.s_[c0:c1])
        self._weights.write_direct(rows, dest_sel=np.s_[start:stop])

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
        self._chunk_step.write_direct(np.full(c1 - c0, _check_int("step", step, minimum=0), dtype=np.int64),
                                      dest_sel=np.s_[c0:c1])

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
        self._chunk_step[...] = np.full(self.n_storage_chunks, step, dtype=np.int64)
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
        """Overwrite the four head arrays; each must be float32 of the file's shape."""
        f = self._writable()
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
        for key, value in arrays.items():
            f[_HEAD_PATHS[key]].write_direct(value)
        self._touch()

    # ------------------------------------------------------------------ training log

    def append_log(self, step, loss, batch_acc, seconds) -> None:
        """Append rows to /train/log; each argument is a scalar or a 1-D sequence of equal length."""
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
        old = self._log.shape[0]
        self._log.resize((old + n,))
        self._log.write_direct(rows, dest_sel=np.s_[old : old + n])

    def read_log(self) -> np.ndarray:
        """The whole training log as a structured array (fields step, loss, batch_acc, seconds)."""
        self._file()
        return self._log[()]

    @property
    def log_rows(self) -> int:
        self._file()
        return int(self._log.shape[0])

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
        n_log = int(self._log.shape[0])
        last = None
        if n_log:
            row = self._log[n_log - 1]
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


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


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


def _fsync_dir(directory: str) -> None:
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
