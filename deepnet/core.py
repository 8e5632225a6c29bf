"""The core engine: forward and exact backward through all L residual layers, chunk by chunk.

The weights come from a ``WeightStore``: one array in RAM (``InMemoryStore``) or the model file,
streamed chunk by chunk with the next chunk read on a background thread while the kernel computes
(``StreamedStore``). Both hand the engine the same chunks, and the kernels do the same arithmetic in
both, so the two modes give bit-identical results.

Checkpointing: the forward pass saves the state h every ``save_every`` layers (a few hundred, chosen so a
segment's recomputed activations fit in L2 cache). The backward pass recomputes one segment at a time
from its saved state and back-propagates through it. ``chunk_layers`` only sets how many layers one
kernel call (and one read from the file) covers; the saved states depend on it only in where they
sit, and recomputation is bit-identical to the forward pass, so results do not depend on it.
"""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Iterator

import numpy as np

from deepnet.errors import ConfigError
from deepnet.formats.hdf5 import ModelFile
from deepnet.kernels import LayerKernels

# Bytes of recomputed activations (inputs and derivatives of one segment) that should stay in L2.
SEGMENT_CACHE_BYTES = 256 * 1024
# Upper bound on the memory of all saved states; deeper models get longer segments instead.
MAX_SAVED_STATE_BYTES = 256 * 1024 * 1024


def choose_save_every(layers: int, width: int, batch: int, chunk_layers: int) -> int:
    """Layers per recomputed segment: small enough for L2, large enough to bound the saved states."""
    per_state = 4 * width * batch
    for_cache = max(16, SEGMENT_CACHE_BYTES // (2 * per_state))
    for_memory = math.ceil(layers * per_state / MAX_SAVED_STATE_BYTES)
    return max(1, min(chunk_layers, max(for_cache, for_memory)))


class WeightStore:
    """Where the core weights live. Yields (first_layer, rows) chunks; rows are (n, w*w+w) float32."""

    layers: int
    row_size: int

    def forward_chunks(self, chunk_layers: int) -> Iterator[tuple[int, np.ndarray]]:
        raise NotImplementedError

    def backward_chunks(self, chunk_layers: int, step: int) -> Iterator[tuple[int, np.ndarray]]:
        """Chunks last first; a chunk's rows may be modified in place and are kept once the next is asked for."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def chunk_bounds(layers: int, chunk_layers: int) -> list[tuple[int, int]]:
    """(start, stop) of each chunk, first to last."""
    return [(s, min(s + chunk_layers, layers)) for s in range(0, layers, chunk_layers)]


class InMemoryStore(WeightStore):
    """All core weights in one array in RAM; chunks are views, updated in place."""

    def __init__(self, weights: np.ndarray) -> None:
        if weights.dtype != np.float32 or weights.ndim != 2 or not weights.flags.c_contiguous:
            raise ConfigError("in-memory core weights must be a C-contiguous 2-D float32 array")
        self.weights = weights
        self.layers, self.row_size = weights.shape

    def forward_chunks(self, chunk_layers: int) -> Iterator[tuple[int, np.ndarray]]:
        for start, stop in chunk_bounds(self.layers, chunk_layers):
            yield start, self.weights[start:stop]

    def backward_chunks(self, chunk_layers: int, step: int) -> Iterator[tuple[int, np.ndarray]]:
        for start, stop in reversed(chunk_bounds(self.layers, chunk_layers)):
            yield start, self.weights[start:stop]


class StreamedStore(WeightStore):
    """Core weights streamed from the model file: read ahead on one I/O thread, written back after update.

    One I/O thread runs reads and writes in submission order; the kernels release the GIL, so the thread
    reads the next chunk while the current one computes. Three rotating buffers: the one computing, the
    one being read into, and the one being written back.
    """

    def __init__(self, model_file: ModelFile) -> None:
        self.file = model_file
        self.layers = model_file.layers
        self.row_size = model_file.row_size
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deepnet-io")
        self._buffers: list[np.ndarray] = []

    def _buffer(self, k: int, chunk_layers: int) -> np.ndarray:
        if len(self._buffers) != 3 or self._buffers[0].shape[0] != chunk_layers:
            self._buffers = [np.empty((chunk_layers, self.row_size), np.float32) for _ in range(3)]
        return self._buffers[k % 3]

    def _read(self, start: int, stop: int, out: np.ndarray) -> np.ndarray:
        view = out[: stop - start]
        self.file.read_layers(start, stop, out=view)
        return view

    def _chunks(self, bounds: list[tuple[int, int]], chunk_layers: int, write_step: int | None):
        if not bounds:
            return
        pending: Future = self._io.submit(self._read, *bounds[0], self._buffer(0, chunk_layers))
        writes: list[Future] = []
        try:
            for k, (start, stop) in enumerate(bounds):
                rows = pending.result()
                if k + 1 < len(bounds):
                    # FIFO on one thread: this read starts only after the write that last used the buffer.
                    pending = self._io.submit(self._read, *bounds[k + 1], self._buffer(k + 1, chunk_layers))
                yield start, rows
                if write_step is not None:
                    writes.append(self._io.submit(self.file.write_layers, start, rows, write_step))
                    for w in [w for w in writes if w.done()]:
                        w.result()  # a failed write surfaces here, before more chunks are updated
                    writes = [w for w in writes if not w.done()]
        finally:
            # Never leave I/O running behind the caller's back (also on an exception in the kernel).
            pending.exception()
            for w in writes:
                w.result()

    def forward_chunks(self, chunk_layers: int) -> Iterator[tuple[int, np.ndarray]]:
        yield from self._chunks(chunk_bounds(self.layers, chunk_layers), chunk_layers, None)

    def backward_chunks(self, chunk_layers: int, step: int) -> Iterator[tuple[int, np.ndarray]]:
        yield from self._chunks(list(reversed(chunk_bounds(self.layers, chunk_layers))), chunk_layers, step)

    def close(self) -> None:
        self._io.shutdown(wait=True)


class CoreEngine:
    """Runs h through the L core layers and back, one kernel call per chunk."""

    def __init__(self, store: WeightStore, kernels: LayerKernels, width: int, alpha: float,
                 chunk_layers: int) -> None:
        if chunk_layers < 1:
            raise ConfigError(f"--chunk-layers must be >= 1, got {chunk_layers}")
        if store.row_size != width * width + width:
            raise ConfigError(f"core rows have {store.row_size} floats but width {width} needs {width * width + width}")
        self.store = store
        self.kernels = kernels
        self.width = width
        self.alpha = float(alpha)
        self.chunk_layers = min(chunk_layers, store.layers)
        self._saves: np.ndarray | None = None
        self._save_offsets: list[int] = []
        self._save_every = 0
        self._work: np.ndarray | None = None
        self._work_batch = 0
        self._pending_backward = False

    @property
    def layers(self) -> int:
        return self.store.layers

    def _prepare(self, batch: int) -> None:
        if self._work is not None and self._work_batch == batch:
            return
        self._save_every = choose_save_every(self.layers, self.width, batch, self.chunk_layers)
        offsets, total = [], 0
        for start, stop in chunk_bounds(self.layers, self.chunk_layers):
            offsets.append(total)
            total += -(-(stop - start) // self._save_every)
        self._save_offsets = offsets
        self._saves = np.empty((total, self.width * batch), np.float32)
        self._work = np.empty(self.kernels.workspace_size(self.width, batch, self._save_every), np.float32)
        self._work_batch = batch

    def forward(self, h: np.ndarray, *, for_backward: bool = True) -> np.ndarray:
        """h (width, batch) float32 through every layer, in place; returns h.

        With ``for_backward`` the states needed by ``backward`` are saved; without it (evaluation)
        nothing is kept.
        """
        h = self._check_state(h)
        batch = h.shape[1]
        self._prepare(batch)
        for k, (start, rows) in enumerate(self.store.forward_chunks(self.chunk_layers)):
            saves = None
            if for_backward:
                saves = self._saves[self._save_offsets[k]:]
            self.kernels.forward(rows, h, self.alpha, saves, self._save_every, self._work)
        self._pending_backward = for_backward
        return h

    def backward(self, g: np.ndarray, layer_lr: float, step: int) -> np.ndarray:
        """g = dLoss/dh_L (width, batch) back to dLoss/dh_0, in place, updating every layer with SGD.

        ``step`` is the step number the updated chunks are recorded under in a streamed file.
        """
        if not self._pending_backward:
            raise RuntimeError("backward() needs a forward(for_backward=True) with the same batch first")
        g = self._check_state(g)
        if g.shape[1] != self._work_batch:
            raise RuntimeError("backward() batch differs from the forward pass")
        n_chunks = len(self._save_offsets)
        # Drive the store's generator to its end (not zip() with a range, which stops before resuming
        # it after the last chunk, so a streamed store never wrote the first chunk back).
        for j, (start, rows) in enumerate(self.store.backward_chunks(self.chunk_layers, step)):
            k = n_chunks - 1 - j
            saves = self._saves[self._save_offsets[k]:]
            self.kernels.backward(rows, saves, self._save_every, g, self.alpha, float(layer_lr), self._work)
        self._pending_backward = False
        return g

    def _check_state(self, h: np.ndarray) -> np.ndarray:
        if h.dtype != np.float32 or h.ndim != 2 or h.shape[0] != self.width or not h.flags.c_contiguous:
            raise ConfigError(f"core state must be a C-contiguous float32 array of shape ({self.width}, batch)")
        return h

    def close(self) -> None:
        self.store.close()
