"""The core rows of an open model file: /core/weights and the per-chunk step marks that guard them.

Every storage chunk's ``chunk_step`` is set to a step *before* the chunk's rows change, so an
interrupted write shows up as a torn step (see :func:`deepnet.formats.commit.torn_state`); rows are
written only into chunks allocated at creation, so no HDF5 metadata changes.
"""

from __future__ import annotations

import h5py
import numpy as np

from deepnet.errors import ConfigError
from deepnet.formats import h5io, layout
from deepnet.formats.h5io import RawWriter
from deepnet.formats.values import check_int


class CoreRows:
    """Reads and writes of the core of one open file (the caller checks it is open, and writable)."""

    def __init__(self, h5file: h5py.File, path: str, raw: RawWriter, layers: int, width: int,
                 chunk_layers: int) -> None:
        self._weights: h5py.Dataset = h5file[layout.CORE_WEIGHTS]
        self._chunk_step: h5py.Dataset = h5file[layout.CORE_CHUNK_STEP]
        self._path = path
        self._raw = raw
        self._layers = layers
        self._chunk_layers = chunk_layers
        self.row_size = width * width + width
        self.n_storage_chunks = -(-layers // chunk_layers)

    def check_range(self, start: object, stop: object) -> tuple[int, int]:
        """[start, stop) as ints within 0..layers; else ConfigError."""
        start = check_int("start", start)
        stop = check_int("stop", stop)
        if not 0 <= start <= stop <= self._layers:
            raise ConfigError(f"layer range [{start}, {stop}) is outside 0..{self._layers} of {self._path}")
        return start, stop

    def read_layers(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows [start, stop) of the core as a (stop-start, row_size) float32 C-contiguous array.

        With `out` (float32, C-contiguous, shape (n, row_size) with n >= stop-start) the rows are read
        straight into ``out[:stop-start]`` with no intermediate copy, and that view is returned; a
        longer `out` lets one chunk buffer serve a shorter last chunk.
        """
        start, stop = self.check_range(start, stop)
        n = stop - start
        if out is None:
            out = np.empty((n, self.row_size), dtype=np.float32)
        elif not isinstance(out, np.ndarray) or out.dtype != np.float32 or not out.flags.c_contiguous \
                or not out.flags.writeable:
            raise ConfigError("out must be a writeable C-contiguous float32 array")
        elif out.ndim != 2 or out.shape[1] != self.row_size or out.shape[0] < n:
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
        step = check_int("step", step, minimum=0)
        start = check_int("start", start)
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self.row_size:
            raise ConfigError(f"rows has shape {rows.shape} but a layer row of {self._path} has {self.row_size} floats")
        start, stop = self.check_range(start, start + rows.shape[0])
        if stop == start:
            return
        self._mark(start, stop, step)
        h5io.write_block(self._weights, start, np.ascontiguousarray(rows, dtype=np.float32))

    def mark_chunk_steps(self, start: int, stop: int, step: int) -> None:
        """Record `step` in ``chunk_step`` for every storage chunk that layers [start, stop) touch.

        For writers that update the core outside ``write_layers`` (the memory-mapped streamed mode):
        mark first, then modify, so an interruption shows up as a torn step.
        """
        start, stop = self.check_range(check_int("start", start), check_int("stop", stop))
        if stop > start:
            self._mark(start, stop, check_int("step", step, minimum=0))

    def _mark(self, start: int, stop: int, step: int) -> None:
        c0 = start // self._chunk_layers
        c1 = (stop - 1) // self._chunk_layers + 1
        self._raw.write(layout.CORE_CHUNK_STEP, np.full(c1 - c0, step, dtype="<i8"), 8 * c0)

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
        chunk_bytes = self._chunk_layers * self.row_size * 4
        n = self.n_storage_chunks
        offsets = np.full(n, -1, dtype=np.int64)
        bad = []

        def visit(info) -> None:
            index = info.chunk_offset[0] // self._chunk_layers
            if info.filter_mask or info.size != chunk_bytes or info.byte_offset % 4 or not 0 <= index < n:
                bad.append(index)
            else:
                offsets[index] = info.byte_offset

        try:
            if ds.id.get_num_chunks() != n:
                return None
            if hasattr(ds.id, "chunk_iter"):   # one pass over the chunk index (HDF5 >= 1.14 / 1.12.3)
                ds.id.chunk_iter(visit)
            else:   # get_chunk_info(i) walks the index up to i: quadratic in the chunks
                for i in range(n):
                    visit(ds.id.get_chunk_info(i))
        except (AttributeError, RuntimeError, ValueError, OSError):  # an HDF5 without chunk queries
            return None
        if bad:
            return None
        return None if (offsets < 0).any() else offsets

    def read_core(self) -> np.ndarray:
        """The whole core, (layers, row_size) float32, in RAM (for the in-memory mode)."""
        out = np.empty((self._layers, self.row_size), dtype=np.float32)
        block = h5io.block_layers(self._chunk_layers, self.row_size)
        for start in range(0, self._layers, block):
            stop = min(self._layers, start + block)
            self._weights.read_direct(out, source_sel=np.s_[start:stop], dest_sel=np.s_[start:stop])
        return out

    def write_core(self, arr: np.ndarray, step: int) -> None:
        """Write the whole core from `arr` (layers, row_size) and mark every storage chunk with `step`.

        This writes in place (a few MiB of whole storage chunks at a time); all of ``chunk_step`` is
        marked first, so an interrupted write-back is visible as a torn step.
        """
        step = check_int("step", step, minimum=0)
        arr = np.asarray(arr)
        if arr.shape != (self._layers, self.row_size):
            raise ConfigError(f"core array has shape {arr.shape} but {self._path} needs {(self._layers, self.row_size)}")
        if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
            raise ConfigError(f"core array must be float32, got dtype {arr.dtype}")
        self._raw.write(layout.CORE_CHUNK_STEP, np.full(self.n_storage_chunks, step, dtype="<i8"))
        h5io.write_array_blocks(self._weights, arr, h5io.block_layers(self._chunk_layers, self.row_size))

    def chunk_steps(self) -> np.ndarray:
        """Per storage chunk, the step that last wrote it (int64 copy)."""
        return self._chunk_step[()]
