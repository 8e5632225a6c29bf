"""ModelFile: one open dense model file (layout: :mod:`deepnet.formats.layout`; design: docs/DESIGN.md, "Files").

Opening validates everything (:mod:`~deepnet.formats.validate`); creation lives in
:mod:`~deepnet.formats.create`, the commit record in :mod:`~deepnet.formats.record`, the one-writer lock
in :mod:`~deepnet.formats.locking`. This class reads and writes an open file: the core rows (raw data
of datasets allocated whole at creation, so the per-step path never changes HDF5 metadata), the heads,
the log, the commits, and the checkpoint rewrite of the in-memory mode.

Why it is near 600 lines: it keeps the whole public surface its callers use (about 50 methods and
properties, each documented); the work behind them is in the modules above and in evals and scan.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping
from typing import Any

import h5py
import numpy as np

from deepnet import activations
from deepnet.errors import ConfigError, ModelFileError
from deepnet.formats import create as _create
from deepnet.formats import evals as _evals
from deepnet.formats import layout
from deepnet.formats.core_rows import CoreRows
from deepnet.formats.commit import EVAL_ROWS, FileState, heads_crc32, torn_state
from deepnet.formats.h5io import RNG_ATTR_QUANTUM, TIME_ATTR_LEN, RawWriter, rewrite_attr, set_fixed_ascii_attr
from deepnet.formats.scan import non_finite_datasets, non_finite_rows
from deepnet.formats.record import LOG_PENDING_MAX, CommitLog, log_array, log_rows
from deepnet.formats.validate import check_heads, head_shapes, open_validated
from deepnet.formats.values import check_int, decode, now, os_reason, rng_text

# Passed for "leave this part of the record as it is".
_KEEP: Any = object()


def _heads_crc(heads: Mapping[str, np.ndarray]) -> int:
    return heads_crc32(heads, layout.HEAD_KEYS)


class ModelFile:
    """One deepnet model in one HDF5 file.

    Use :meth:`create` to make a new file and :meth:`open` to open an existing one; both validate
    everything and raise :class:`ModelFileError` (file problems) or :class:`ConfigError` (bad argument
    values) with a one-line message. The object is a context manager.
    """

    # ------------------------------------------------------------------ construction

    def __init__(self, h5file: h5py.File, path: str, mode: str, meta: dict[str, Any], lock_fd: int | None = None):
        # Use create() / open(); this only wires up an already validated file.
        self._f: h5py.File | None = h5file
        self._path = path
        self._mode = mode
        self._meta = meta
        self._layers: int = meta["layers"]
        self._width: int = meta["width"]
        self._chunk_layers: int = meta["storage_chunk_layers"]
        self._lock_fd = lock_fd
        self._evals = _evals.EvalLog(path)
        self._bind(h5file)

    def _bind(self, h5file: h5py.File, record: dict | None = None) -> None:
        """(Re)attach the dataset handles, raw writer and commit record to an open HDF5 file."""
        self._f = h5file
        self._raw = RawWriter(h5file, self._mode == "r+")
        self._core = CoreRows(h5file, self._path, self._raw, self._layers, self._width, self._chunk_layers)
        self._commits = CommitLog(h5file, self._path, self._raw, self._meta, record)
        self._evals.bind(h5file, self._commits)
        try:  # which file this is, to notice it being replaced under us (see rewrite)
            self._inode: int | None = os.stat(self._path).st_ino
        except OSError:  # pragma: no cover
            self._inode = None

    @classmethod
    def create(cls, path: str | os.PathLike, *, layers: int, width: int, activation: str, input_dim: int = 784,
               n_classes: int = 10, alpha: float | None = None, seed: int = 0, init_scale: float = 1e-3,
               storage_chunk_layers: int | None = None, overwrite: bool = False, progress: bool = True,
               core_weights: np.ndarray | None = None,
               extra: Callable[[h5py.File], None] | None = None, extra_bytes: int = 0) -> "ModelFile":
        """Create a new model file at `path`, initialised, and return it open in mode "r+".

        Core weights are uniform in [-init_scale, init_scale] with zero biases, drawn block by block
        from ``np.random.default_rng([seed, 0])`` as float64 and cast to float32 (so the result does
        not depend on the block or storage chunk size); the heads are Xavier-uniform with zero biases,
        drawn afterwards from the same generator (input head, then output head). With `core_weights`
        the given (L, w*w + w) array is written instead of drawn, and the generator is advanced past
        the draws it replaces, so the heads are the same as without it. `extra`, if given, is called
        with the new h5py file to add optional parts (e.g. the MLP branch) before it is placed; `extra_bytes`
        is their size, counted with the rest in the free-space check made before anything is written.

        The file is written under a temporary name in the same directory and renamed into place only
        when complete; on any failure the temporary file is removed.
        """
        path = _create.create_file(path, layers=layers, width=width, activation=activation, input_dim=input_dim,
                                   n_classes=n_classes, alpha=alpha, seed=seed, init_scale=init_scale,
                                   storage_chunk_layers=storage_chunk_layers, overwrite=overwrite,
                                   progress=progress, core_weights=core_weights, extra=extra,
                                   extra_bytes=extra_bytes)
        return cls.open(path, "r+")

    @classmethod
    def open(cls, path: str | os.PathLike, mode: str = "r", *, expect: Mapping[str, Any] | None = None) -> "ModelFile":
        """Open and validate an existing model file ("r": read-only, "r+": read/write).

        `expect` holds values the caller's flags asked for (any of width, layers, activation,
        input_dim, n_classes; None values are ignored); a disagreement with the file is an error.
        """
        f, meta, lock_fd = open_validated(path, mode, expect)
        try:
            return cls(f, os.fspath(path), mode, meta, lock_fd)
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
        """The open h5py file, for the optional parts stored beside the model (the MLP branch, the weight
        average, the held-out figures), which this class carries along unread."""
        return self._file()

    @property
    def layers(self) -> int:
        """Layers of the core."""
        return self._layers

    @property
    def width(self) -> int:
        """Width of every core layer."""
        return self._width

    @property
    def activation(self) -> str:
        """Name of the core's activation."""
        return self._meta["activation"]

    @property
    def activation_package(self) -> activations.Package | None:
        """The plugin package (name, version) that provided the activation at creation, if recorded."""
        name = self._meta.get(layout.ACTIVATION_PACKAGE_ATTR)
        version = self._meta.get(layout.ACTIVATION_PACKAGE_VERSION_ATTR) or ""
        return activations.Package(name, version) if name else None

    @property
    def alpha(self) -> float:
        """Residual scale of the core."""
        return self._meta["alpha"]

    @property
    def input_dim(self) -> int:
        """Inputs of the input head."""
        return self._meta["input_dim"]

    @property
    def n_classes(self) -> int:
        """Outputs of the output head."""
        return self._meta["n_classes"]

    @property
    def seed(self) -> int:
        """Seed the initial weights were drawn from."""
        return self._meta["seed"]

    @property
    def init_scale(self) -> float:
        """Bound of the core's initial weights."""
        return self._meta["init_scale"]

    @property
    def row_size(self) -> int:
        """Floats per layer row: w*w weights then w biases."""
        return self._core.row_size

    @property
    def storage_chunk_layers(self) -> int:
        """Layers per HDF5 storage chunk of /core/weights (the last chunk may be shorter)."""
        return self._chunk_layers

    @property
    def n_storage_chunks(self) -> int:
        return self._core.n_storage_chunks

    @property
    def step(self) -> int:
        """The committed step (training steps completed); setting it commits that step number."""
        self._file()
        return self._commits.step

    @step.setter
    def step(self, value: int) -> None:
        value = check_int("step", value, minimum=0)
        f = self._writable()
        self._commits.write(step=value)
        rewrite_attr(f, "step", value, np.int64)
        self._touch()

    @property
    def rng_state(self) -> dict | None:
        """The training generator's ``bit_generator.state`` at the committed step (None until stored)."""
        self._file()
        return self._commits.rng_state()

    @rng_state.setter
    def rng_state(self, state: Mapping | None) -> None:
        text = rng_text(state)
        f = self._writable()
        self._commits.write(rng_state=None if state is None else dict(state))
        set_fixed_ascii_attr(f, "rng_state", text, RNG_ATTR_QUANTUM)
        self._touch()

    @property
    def train_settings(self) -> dict | None:
        """The training settings of the last commit (layer_lr, head_lr, batch, train_limit), if any."""
        self._file()
        settings = self._commits.get("train")
        return None if settings is None else dict(settings)

    @property
    def torn_accepted(self) -> dict | None:
        """If this history includes a torn step accepted with --resume-torn: which step and how many layers."""
        self._file()
        note = self._commits.get("torn_accepted")
        return None if note is None else dict(note)

    @property
    def record(self) -> dict:
        """A copy of the latest commit record (for `deepnet check`); see :mod:`deepnet.formats.commit`."""
        self._file()
        return self._commits.record

    @property
    def has_commit_record(self) -> bool:
        """Whether the file has /train/commit with a heads checksum (files written before it existed get
        one at their first commit)."""
        self._file()
        return self._commits.has_dataset and self._commits.get("heads_crc32") is not None

    @property
    def created(self) -> str:
        return decode(self._file().attrs["created"])

    @property
    def updated(self) -> str:
        """When the file was last committed to (UTC, ISO-8601)."""
        f = self._file()
        return self._commits.get("updated") or decode(f.attrs["updated"])

    # ------------------------------------------------------------------ core weights

    def read_layers(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) of the core, float32 (straight into `out` if given): :meth:`CoreRows.read_layers`."""
        self._file()
        return self._core.read_layers(start, stop, out)

    def write_layers(self, start: int, rows: np.ndarray, step: int) -> None:
        """Write `rows` at layers [start, ...), marking their storage chunks with `step` first:
        :meth:`CoreRows.write_layers`."""
        self._writable()
        self._core.write_layers(start, rows, step)

    def mark_chunk_steps(self, start: int, stop: int, step: int) -> None:
        """Mark the storage chunks of layers [start, stop) with `step`, for writers that update the core
        outside write_layers (the memory-mapped streamed mode): :meth:`CoreRows.mark_chunk_steps`."""
        self._writable()
        self._core.mark_chunk_steps(start, stop, step)

    def chunk_step_offset(self) -> int | None:
        """Byte offset of /core/chunk_step in the file, for memory-mapping it (None if it cannot be)."""
        return self._core.chunk_step_offset()

    def core_chunk_offsets(self) -> np.ndarray | None:
        """Byte offset of each storage chunk of the core, for memory-mapping it (None if it cannot be)."""
        return self._core.core_chunk_offsets()

    def read_core(self) -> np.ndarray:
        """The whole core, (layers, row_size) float32, in RAM (for the in-memory mode)."""
        self._file()
        return self._core.read_core()

    def write_core(self, arr: np.ndarray, step: int) -> None:
        """Write the whole core in place, every storage chunk marked with `step` first: :meth:`CoreRows.write_core`."""
        self._writable()
        self._core.write_core(arr, step)
        self._touch()

    def chunk_steps(self) -> np.ndarray:
        """Per storage chunk, the step that last wrote it (int64 copy)."""
        self._file()
        return self._core.chunk_steps()

    def write_raw(self, name: str, array: np.ndarray) -> None:
        """Overwrite the whole pre-allocated dataset `name` with `array`'s bytes as a raw write (no HDF5
        metadata change), e.g. an optional part's parameters at a commit."""
        self._writable()
        self._raw.write(name, array)


    # ------------------------------------------------------------------ heads

    def read_heads(self) -> dict[str, np.ndarray]:
        """The four head arrays (float32 copies): input_weight, input_bias, output_weight, output_bias."""
        f = self._file()
        return {key: np.ascontiguousarray(f[layout.HEAD_PATHS[key]][()], dtype=np.float32) for key in layout.HEAD_KEYS}

    def write_heads(self, heads: Mapping[str, np.ndarray]) -> None:
        """Overwrite the four head arrays (each float32 of the file's shape) and commit their checksum
        at the current step. (Training commits heads with :meth:`commit` instead.)"""
        arrays = self._check_heads(heads)
        self._write_heads_raw(arrays)
        self._commits.write(heads_crc32=_heads_crc(arrays))
        self._touch()

    def _write_heads_raw(self, arrays: Mapping[str, np.ndarray]) -> None:
        for key in layout.HEAD_KEYS:
            self._raw.write(layout.HEAD_PATHS[key], arrays[key])

    def _check_heads(self, heads: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self._writable()
        return check_heads(heads, head_shapes(self._width, self.input_dim, self.n_classes), self._path)

    # ------------------------------------------------------------------ training log

    def append_log(self, step, loss, batch_acc, seconds) -> None:
        """Append rows to /train/log now (scalars or equal 1-D sequences); training goes through commit()."""
        self._writable()
        rows = log_array(step, loss, batch_acc, seconds)
        if rows.shape[0]:
            self._commits.append_rows(rows)

    def read_log(self) -> np.ndarray:
        """The committed training log as a structured array (fields step, loss, batch_acc, seconds)."""
        self._file()
        return self._commits.read_log()

    @property
    def log_rows(self) -> int:
        """Rows in the committed training log."""
        self._file()
        return self._commits.log_rows

    @property
    def stored_log_rows(self) -> int:
        """Rows in the /train/log dataset: the committed ones appended so far, plus any an interrupted
        append left past them (ignored, and overwritten by the next append)."""
        self._file()
        return self._commits.stored_log_rows

    def flush_log(self) -> None:
        """Append the log rows carried in the commit record to /train/log (an HDF5 metadata change)."""
        self._writable()
        self._commits.flush_log()

    # ------------------------------------------------------------------ evaluations

    def record_evaluation(self, step: int, kind: str, samples: int, loss: float, accuracy: float) -> None:
        """Keep an evaluation training made (kind ``heldout`` or ``test``) in /train/evals: committed now
        if the file holds its step, else by the :meth:`rewrite` that writes its step (lost if none does)."""
        self._writable()
        self._evals.record(_evals.evaluation_rows([(step, kind, samples, loss, accuracy)]), self.step)

    def read_evaluations(self) -> np.ndarray:
        """The committed evaluations (EVAL_DTYPE: step, kind, samples, loss, accuracy), in order."""
        self._file()
        return self._evals.read()

    @property
    def eval_rows(self) -> int:
        """Rows of /train/evals the commit record counts."""
        self._file()
        return self._evals.count

    @property
    def waiting_evaluations(self) -> np.ndarray:
        """Evaluations recorded for steps after the one the file holds (not in it yet)."""
        return self._evals.waiting.copy()

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
        step = check_int("step", step, minimum=0)
        arrays = self._check_heads(heads)
        pending = list(self._commits.get("pending_log"))
        for row in log:
            pending.append([int(row[0]), float(row[1]), float(row[2]), float(row[3])])
        changes: dict[str, Any] = {"step": step, "heads_crc32": _heads_crc(arrays), "pending_log": pending}
        changes.update(self._optional_changes(rng_state, train))
        self._write_heads_raw(arrays)
        self._commits.write(**changes)
        if len(pending) >= LOG_PENDING_MAX:
            self.flush_log()

    @staticmethod
    def _optional_changes(rng_state: Any, train: Any) -> dict[str, Any]:
        changes: dict[str, Any] = {}
        if rng_state is not _KEEP:
            if rng_state is not None and not isinstance(rng_state, Mapping):
                raise ConfigError(f"rng_state must be a dict (a bit_generator.state) or None, got {type(rng_state).__name__}")
            changes["rng_state"] = None if rng_state is None else dict(rng_state)
        if train is not _KEEP:
            changes["train"] = None if train is None else dict(train)
        return changes

    def sync(self, *, durable: bool = False) -> None:
        """Report-boundary housekeeping: append the carried log rows, mirror the committed step, rng
        state and time into the root attributes, flush; with `durable` also fsync the file (which
        writes back the memory-mapped core too)."""
        f = self._writable()
        self.flush_log()
        text = rng_text(self._commits.get("rng_state"))
        if int(f.attrs["step"]) != self.step or decode(f.attrs["rng_state"]) != text:
            rewrite_attr(f, "step", self.step, np.int64)
            set_fixed_ascii_attr(f, "rng_state", text, RNG_ATTR_QUANTUM)
            self._touch()
        try:
            self.flush(sync=durable)
        except (OSError, RuntimeError) as exc:
            raise ModelFileError(f"could not write {self._path}: {os_reason(exc)}") from exc

    def state(self) -> FileState:
        """Healthy, torn or damaged, from /core/chunk_step and the commit record (weights are not read;
        :func:`deepnet.tools.check.check_model` also checks they are finite)."""
        self._file()
        crc = self._commits.get("heads_crc32")
        heads_changed = crc is not None and _heads_crc(self.read_heads()) != crc
        return torn_state(self.step, self.chunk_steps(), self._chunk_layers, self._layers, heads_changed)

    def non_finite_layers(self) -> np.ndarray:
        """Indices of the core layers holding a NaN or an infinity (read block by block)."""
        self._file()
        return non_finite_rows(lambda start, stop, out: self.read_layers(start, stop, out), self._layers, self.row_size)

    def non_finite_parts(self) -> list[str]:
        """The float datasets other than the core (heads, branch, weight average, ...) holding a NaN or an
        infinity, by name (read block by block)."""
        return non_finite_datasets(self._file(), layout.CORE_WEIGHTS)

    def accept_torn(self) -> FileState:
        """Accept a torn step's mixed state as the committed step (``--resume-torn``).

        Nothing is written unless the state is usable: a torn state holding a non-finite weight (which
        training would refuse at its first step) is refused first, with the file left as it was. Then
        the record is rewritten (heads checksum of the heads as they are, and a note of what was
        accepted), then every ``chunk_step`` past the committed step is set back to it; interrupted,
        the file stays torn and this can simply be run again. Returns the state that was accepted.
        """
        self._writable()
        state = self.state()
        if state.status != "torn":
            return state
        bad = [f"{n} core layers" for n in [self.non_finite_layers().size] if n] + \
            [f"/{name}" for name in self.non_finite_parts()]
        if bad:
            raise ModelFileError(f"{self._path} holds a torn step {state.torn_step} with non-finite values in "
                                 f"{', '.join(bad)}; not accepting it (nothing was written; see `deepnet check`)")
        self._commits.write(heads_crc32=_heads_crc(self.read_heads()),
                            torn_accepted={"step": state.torn_step, "layers_updated": state.layers_updated,
                                           "heads_updated": state.heads_changed})
        self._raw.write(layout.CORE_CHUNK_STEP, np.minimum(self.chunk_steps(), state.step).astype("<i8"))
        self._f.flush()
        return state

    def rewrite(self, core: np.ndarray, *, step: int, heads: Mapping[str, np.ndarray], rng_state: Any = _KEEP,
                log: Any = (), train: Any = _KEEP, progress: bool = False,
                extra: Callable[[h5py.File], None] | None = None) -> None:
        """Replace the whole file atomically with this state (the in-memory mode's checkpoint).

        The new file is written beside this one under a temporary name (the core straight from `core`,
        block by block: no second copy in RAM), fsync'd, then renamed over it; this object then refers
        to it. On any failure the temporary file is removed and the file on disk keeps its last
        committed step. `log` holds the rows of the steps since the last commit. `extra`, if given, is
        called with the new h5py file to write the optional parts (branch, weight average, held-out
        figures) as of this state; what it writes is not copied from the old file. The evaluations
        recorded for steps up to `step` are written with the committed ones.
        """
        self._writable()
        step = check_int("step", step, minimum=0)
        core = np.asarray(core)
        if core.shape != (self._layers, self.row_size) or core.dtype != np.float32:
            raise ConfigError(f"core array must be float32 of shape {(self._layers, self.row_size)}, "
                              f"got {core.dtype} {core.shape}")
        arrays = self._check_heads(heads)
        rows = np.concatenate([self.read_log(), log_rows([list(r) for r in log])])
        evals = np.concatenate([self._evals.read(), self._evals.ready(step)])
        changes = {EVAL_ROWS: int(evals.shape[0]), **self._optional_changes(rng_state, train)}
        record, _ = self._commits.next_record(step=step, heads_crc32=_heads_crc(arrays), log_rows=int(rows.shape[0]),
                                              pending_log=[], **changes)
        new, lock_fd = _create.write_checkpoint(
            self._path, self._f, core, record, arrays, rows, self._chunk_layers, extra,
            lock=self._lock_fd is not None, inode=self._inode, old_step=self.step, evals=evals)
        old, old_lock = self._f, self._lock_fd
        self._bind(new, record)
        self._lock_fd = lock_fd
        self._evals.forget(step)
        try:
            old.close()
        finally:
            if old_lock is not None:
                os.close(old_lock)

    # ------------------------------------------------------------------ lifecycle

    def flush(self, *, sync: bool = False) -> None:
        """Flush HDF5's buffers to the OS; with `sync` also fsync the file to disk."""
        self._file().flush()
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
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        if self._f is None:
            return f"<ModelFile {self._path!r} (closed)>"
        return (f"<ModelFile {self._path!r} mode={self._mode!r} layers={self._layers} width={self._width} "
                f"activation={self.activation!r} step={self.step}>")

    def summary(self) -> dict[str, Any]:
        """Everything `deepnet info` shows, as plain Python values."""
        f = self._file()
        row = self._commits.last_log_row()
        last = None if row is None else {"step": int(row["step"]), "loss": float(row["loss"]),
                                         "batch_acc": float(row["batch_acc"]), "seconds": float(row["seconds"])}
        if self._mode == "r+":
            f.flush()  # so the size below counts what this process has written
        return {
            "path": self._path, "kind": decode(f.attrs["kind"]), "format_version": int(f.attrs["format_version"]),
            "layers": self._layers, "width": self._width, "activation": self.activation, "alpha": self.alpha,
            "input_dim": self.input_dim, "n_classes": self.n_classes, "step": self.step, "seed": self.seed,
            "init_scale": self.init_scale, "file_size_bytes": os.path.getsize(self._path),
            "storage_chunk_layers": self._chunk_layers, "created": self.created, "updated": self.updated,
            "log_rows": self.log_rows, "last_log": last, "state": self.state().message,
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
        set_fixed_ascii_attr(self._file(), "updated", now(), TIME_ATTR_LEN)

