"""Where the core weights live, and how the engine gets them chunk by chunk: the weight stores.

``InMemoryStore`` holds them in one array in RAM; the streamed stores read them from the model file
chunk by chunk and write each updated chunk back: ``MappedStore`` through a memory map of the file's
storage chunks (every file deepnet writes), ``StreamedStore`` through h5py on an I/O thread (the
fallback). All hand the engine the same rows, so every mode gives bit-identical results.
"""

from __future__ import annotations

import mmap
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import numpy as np

from deepnet.errors import ConfigError
from deepnet.formats.direct import SpanIO, aligned_buffer, span_buffer_bytes
from deepnet.formats.hdf5 import ModelFile
from deepnet.nn.memory import meminfo


class WeightStore:
    """Where the core weights live. Hands out chunks (first_layer, rows); rows are (n, w*w+w) float32."""

    layers: int
    row_size: int
    #: Whether the chunks a pass yields stay valid together (views of the weights), so threads may each
    #: run their share of the batch through all of them; a store that reuses buffers is False.
    random_access = False
    #: Layers a chunk (one kernel call) covers at least, whatever is asked: a store that reads and
    #: writes chunks takes the requested length, which sets its buffers and what one write-back covers.
    min_chunk_layers = 1

    def bounds(self, chunk_layers: int) -> list[tuple[int, int]]:
        """(start, stop) of the chunks, first to last: one kernel call each."""
        return chunk_bounds(self.layers, chunk_layers)

    def forward_chunks(self, bounds: list[tuple[int, int]]) -> Iterator[tuple[int, np.ndarray]]:
        """The chunks of ``bounds``, first to last, for reading."""
        raise NotImplementedError

    def backward_chunks(self, bounds: list[tuple[int, int]], step: int) -> Iterator[tuple[int, np.ndarray]]:
        """The chunks last first; rows may be modified in place and are kept once the next is asked for."""
        raise NotImplementedError

    def buffer_bytes(self, chunk_layers: int) -> int:
        """The bytes of the buffers a pass over chunks of ``chunk_layers`` allocates (none by default:
        the chunks are views)."""
        return 0

    def close(self) -> None:
        """Release what the store holds (files, threads); nothing by default."""


def chunk_bounds(layers: int, chunk_layers: int) -> list[tuple[int, int]]:
    """(start, stop) of each chunk, first to last."""
    return [(s, min(s + chunk_layers, layers)) for s in range(0, layers, chunk_layers)]


#: Layers an in-memory chunk covers at least: its chunks are views, so a longer one costs no memory, while
#: each backward call costs its two threads' start and finish (measured in bench/README.md).
IN_MEMORY_CHUNK_LAYERS = 1_000_000


class InMemoryStore(WeightStore):
    """All core weights in one array in RAM; chunks are views, updated in place."""

    random_access = True
    min_chunk_layers = IN_MEMORY_CHUNK_LAYERS

    def __init__(self, weights: np.ndarray) -> None:
        if weights.dtype != np.float32 or weights.ndim != 2 or not weights.flags.c_contiguous:
            raise ConfigError("in-memory core weights must be a C-contiguous 2-D float32 array")
        self.weights = weights
        self.layers, self.row_size = weights.shape

    def forward_chunks(self, bounds: list[tuple[int, int]]) -> Iterator[tuple[int, np.ndarray]]:
        for start, stop in bounds:
            yield start, self.weights[start:stop]

    def backward_chunks(self, bounds: list[tuple[int, int]], step: int) -> Iterator[tuple[int, np.ndarray]]:
        for start, stop in reversed(bounds):
            yield start, self.weights[start:stop]


#: A streamed core larger than this share of the RAM (MemTotal) is streamed with its pages released.
RELEASE_FRACTION = 1 / 16


def release_pages(core_bytes: int, mem_total: int | None = None) -> bool:
    """Whether a memory-mapped core of ``core_bytes`` is streamed with its pages released (MappedStore):
    when it is more than RELEASE_FRACTION of MemTotal; $DEEPNET_RELEASE_PAGES=1 or 0 decides instead."""
    forced = os.environ.get("DEEPNET_RELEASE_PAGES", "")
    if forced in ("0", "1"):
        return forced == "1"
    if mem_total is None:
        mem_total = meminfo("MemTotal")
    return mem_total is not None and core_bytes > RELEASE_FRACTION * mem_total


def contiguous_runs(offsets: np.ndarray, chunk_bytes: int) -> list[tuple[int, int]]:
    """Runs [first, stop) of storage chunks that lie back to back in the file, in layer order."""
    runs, first = [], 0
    for c in range(1, len(offsets) + 1):
        if c == len(offsets) or int(offsets[c]) != int(offsets[c - 1]) + chunk_bytes:
            runs.append((first, c))
            first = c
    return runs


class _Pipeline:
    """Chunks read ahead into three rotating buffers and written back after update, on one I/O thread.

    One I/O thread runs reads and writes in submission order; the kernels release the GIL, so the thread
    reads the next chunk while the current one computes. Three rotating buffers: the one computing, the
    one being read into, and the one being written back. A subclass gives ``_read`` and ``_write``.
    """

    def _start_io(self) -> None:
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deepnet-io")
        self._buffers: list[np.ndarray] = []

    def buffer_bytes(self, chunk_layers: int) -> int:
        return 3 * min(chunk_layers, self.layers) * self.row_size * 4   # the three rotating buffers

    def _buffer(self, k: int, rows: int) -> np.ndarray:
        if len(self._buffers) != 3 or self._buffers[0].shape[0] < rows:
            self._buffers = [np.empty((rows, self.row_size), np.float32) for _ in range(3)]
        return self._buffers[k % 3]

    def _read(self, start: int, stop: int, out: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _write(self, start: int, rows: np.ndarray, step: int) -> None:
        raise NotImplementedError

    def _chunks(self, bounds: list[tuple[int, int]], write_step: int | None) -> Iterator[tuple[int, np.ndarray]]:
        if not bounds:
            return
        rows = max(stop - start for start, stop in bounds)
        pending: Future = self._io.submit(self._read, *bounds[0], self._buffer(0, rows))
        writes: list[Future] = []
        try:
            for k, (start, stop) in enumerate(bounds):
                chunk = pending.result()
                if k + 1 < len(bounds):
                    # FIFO on one thread: this read starts only after the write that last used the buffer.
                    pending = self._io.submit(self._read, *bounds[k + 1], self._buffer(k + 1, rows))
                yield start, chunk
                if write_step is not None:
                    writes.append(self._io.submit(self._write, start, chunk, write_step))
                    for w in [w for w in writes if w.done()]:
                        w.result()  # a failed write surfaces here, before more chunks are updated
                    writes = [w for w in writes if not w.done()]
        finally:
            # Never leave I/O running behind the caller's back (also on an exception in the kernel).
            pending.exception()
            for w in writes:
                w.result()



class MappedStore(_Pipeline, WeightStore):
    """Core weights streamed from the model file through a memory map of its storage chunks.

    The kernels read the file's pages where they lie (no copy into a buffer) and the backward pass
    updates them in place; the operating system reads ahead (asked explicitly for the next chunk with
    madvise) and writes dirty pages back in the background. Each storage chunk's ``chunk_step`` is
    marked before the chunk is modified, so an interrupted step is detectable as a torn step. Used for
    every file whose core chunks are plain float32 on disk (all files deepnet writes).

    A core too large to keep in the page cache beside everything else (``release_pages``: more than
    RELEASE_FRACTION of the RAM; a billion layers at width 2 are 24 GB) is not modified through the
    map: its rows are read into three rotating buffers and written back on an I/O thread (as
    StreamedStore does through h5py), past the page cache (O_DIRECT, deepnet.formats.direct) where the
    file system allows. Through the map (or the page cache) the kernel copies every byte, its
    read-ahead and write-back take the CPU the kernels need, it writes the dirty core back late and
    slowly (throttling the step), and the whole core ends up resident in the process or the cache
    (bench/README.md, "The billion-layer step"). The memory is then the three buffers (3 chunks),
    whatever the depth.

    Storage chunks (~1 MiB) that lie back to back in the file (most of them) form one view, so a kernel
    call covers ``chunk_layers`` as in RAM: far fewer calls than one per storage chunk, and each call pays
    for starting the backward's second thread (bench/README.md, "nn/stores.py").
    """

    random_access = True

    def __init__(self, model_file: ModelFile, offsets: np.ndarray, chunk_step_offset: int,
                 release: bool | None = None) -> None:
        self.file = model_file
        self.layers = model_file.layers
        self.row_size = model_file.row_size
        self.chunk = model_file.storage_chunk_layers
        self.offsets = offsets
        self.writable = model_file.mode != "r"
        self.release = release_pages(self.layers * self.row_size * 4) if release is None else bool(release)
        self.random_access = not self.release
        with open(model_file.path, "r+b" if self.writable else "rb") as fh:
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_WRITE if self.writable else mmap.ACCESS_READ)
        if self.release:
            self._start_io()
            self._spans = SpanIO(model_file.path, writable=self.writable)
            self._placed: dict[int, tuple[mmap.mmap, int]] = {}
        self._runs = contiguous_runs(offsets, self.chunk * self.row_size * 4)
        self._views = [self._run_view(first, stop) for first, stop in self._runs]
        self._run_of_chunk = np.repeat(np.arange(len(self._runs)), [stop - first for first, stop in self._runs])
        # chunk_step is marked through the map too: a mark through h5py costs much more (bench/README.md).
        self._chunk_step = np.frombuffer(self._map, dtype="<i8", count=len(offsets), offset=chunk_step_offset)

    def _run_view(self, first: int, stop: int) -> np.ndarray:
        n = min(stop * self.chunk, self.layers) - first * self.chunk
        return np.frombuffer(self._map, dtype=np.float32, count=n * self.row_size,
                             offset=int(self.offsets[first])).reshape(n, self.row_size)

    def bounds(self, chunk_layers: int) -> list[tuple[int, int]]:
        # Pieces never cross a run of back-to-back storage chunks (each is contiguous in the file) nor
        # a chunk_layers boundary.
        cuts = sorted(set(range(0, self.layers, chunk_layers)) | {first * self.chunk for first, _ in self._runs})
        return list(zip(cuts, cuts[1:] + [self.layers]))

    def _rows(self, start: int, stop: int) -> np.ndarray:
        run = int(self._run_of_chunk[start // self.chunk])
        first = self._runs[run][0] * self.chunk
        return self._views[run][start - first: stop - first]

    def _span(self, start: int, stop: int) -> tuple[int, int]:
        """(offset, length) in the file of rows [start, stop) (one piece of ``bounds``: contiguous)."""
        c = start // self.chunk
        first = int(self.offsets[c]) + (start - c * self.chunk) * self.row_size * 4
        return first, (stop - start) * self.row_size * 4

    def _prefetch(self, start: int, stop: int) -> None:
        if not hasattr(self._map, "madvise"):
            return
        first, length = self._span(start, stop)
        aligned = first - first % mmap.PAGESIZE
        self._map.madvise(mmap.MADV_WILLNEED, aligned, length + first - aligned)

    def buffer_bytes(self, chunk_layers: int) -> int:
        rows = min(chunk_layers, self.layers)
        return 3 * span_buffer_bytes(rows * self.row_size * 4) if self.release else 0

    def _buffer(self, k: int, rows: int) -> mmap.mmap:
        # Page-aligned buffers with room for the aligned span around a piece (formats.direct).
        need = span_buffer_bytes(rows * self.row_size * 4)
        if len(self._buffers) != 3 or len(self._buffers[0]) < need:
            self._buffers = [aligned_buffer(need) for _ in range(3)]
        return self._buffers[k % 3]

    def _read(self, start: int, stop: int, out: mmap.mmap) -> np.ndarray:
        first, length = self._span(start, stop)
        at = self._spans.read(out, first, length)
        self._placed[start] = (out, at)
        return np.frombuffer(out, np.float32, count=length // 4, offset=at).reshape(stop - start, self.row_size)

    def _write(self, start: int, rows: np.ndarray, step: int) -> None:
        stop = start + rows.shape[0]
        self._chunk_step[start // self.chunk: (stop - 1) // self.chunk + 1] = step   # mark, then write
        buf, at = self._placed.pop(start)
        self._spans.write(buf, at, *self._span(start, stop))

    def _chunks(self, bounds: list[tuple[int, int]], step: int | None) -> Iterator[tuple[int, np.ndarray]]:
        if self.release:
            yield from super()._chunks(bounds, step)
            return
        for k, (start, stop) in enumerate(bounds):
            if k + 1 < len(bounds):
                self._prefetch(*bounds[k + 1])
            if step is not None:
                self._chunk_step[start // self.chunk: (stop - 1) // self.chunk + 1] = step
            yield start, self._rows(start, stop)

    def forward_chunks(self, bounds: list[tuple[int, int]]) -> Iterator[tuple[int, np.ndarray]]:
        yield from self._chunks(bounds, None)

    def backward_chunks(self, bounds: list[tuple[int, int]], step: int) -> Iterator[tuple[int, np.ndarray]]:
        if not self.writable:
            raise ConfigError(f"{self.file.path} is open read-only: it cannot be trained")
        yield from self._chunks(list(reversed(bounds)), step)

    def close(self) -> None:
        if self.release:
            self._io.shutdown(wait=True)
            self._spans.close()
        self._views = []
        self._chunk_step = None
        try:
            self._map.close()
        except BufferError:  # a caller still holds a view of the weights: the map closes with it
            pass


class StreamedStore(_Pipeline, WeightStore):
    """Core weights streamed from the model file through h5py: read ahead on one I/O thread, written
    back after update (_Pipeline). The fallback for files whose core cannot be memory-mapped."""

    def __init__(self, model_file: ModelFile) -> None:
        self.file = model_file
        self.layers = model_file.layers
        self.row_size = model_file.row_size
        self._start_io()

    def _read(self, start: int, stop: int, out: np.ndarray) -> np.ndarray:
        view = out[: stop - start]
        self.file.read_layers(start, stop, out=view)
        return view

    def _write(self, start: int, rows: np.ndarray, step: int) -> None:
        self.file.write_layers(start, rows, step)

    def forward_chunks(self, bounds: list[tuple[int, int]]) -> Iterator[tuple[int, np.ndarray]]:
        yield from self._chunks(bounds, None)

    def backward_chunks(self, bounds: list[tuple[int, int]], step: int) -> Iterator[tuple[int, np.ndarray]]:
        yield from self._chunks(list(reversed(bounds)), step)

    def close(self) -> None:
        self._io.shutdown(wait=True)


def file_store(model_file: ModelFile) -> WeightStore:
    """The streamed store for a model file: memory-mapped when its layout allows, else through h5py."""
    offsets = model_file.core_chunk_offsets()
    step_offset = model_file.chunk_step_offset()
    if offsets is not None and step_offset is not None and os.environ.get("DEEPNET_NO_MMAP", "") == "":
        return MappedStore(model_file, offsets, step_offset)
    return StreamedStore(model_file)
