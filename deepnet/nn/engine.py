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
import mmap
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Callable, Iterator

import numpy as np

from deepnet.errors import ConfigError, DeepnetError
from deepnet.formats.hdf5 import ModelFile
from deepnet.kernels.loader import LayerKernels

# Bytes of recomputed activations (inputs and derivatives of one segment) that should stay in L2.
SEGMENT_CACHE_BYTES = 256 * 1024
# Upper bound on the memory of all saved states; deeper models get longer segments instead.
MAX_SAVED_STATE_BYTES = 256 * 1024 * 1024
# Samples in the smallest batch block the forward kernels run (a thread's share is a multiple of it).
MIN_SPLIT_BLOCK = 8
# Threads: the forward pass splits its batch columns (they are independent). The backward pass gives
# each core half the batch's blocks, the second one segment behind the first, adding its blocks to the
# gradient sums the first left (they cross cores once per segment of hundreds of layers, not per layer);
# at a batch of one block the second core recomputes the next segment instead. Bit-identical either way.
THREADS_ENV = "DEEPNET_THREADS"


class NonFiniteError(DeepnetError):
    """A loss or gradient is not finite, so the step is refused (``start``/``stop``: the layers of the
    chunk whose backward pass produced it, when it appeared mid-backward)."""

    def __init__(self, message: str, *, start: int | None = None, stop: int | None = None) -> None:
        super().__init__(message)
        self.start = start
        self.stop = stop


def default_threads() -> int:
    """$DEEPNET_THREADS, else the CPUs this process may run on."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        try:
            threads = int(value)
        except ValueError:
            raise ConfigError(f"{THREADS_ENV} must be a positive integer, not {value!r}") from None
        if threads < 1:
            raise ConfigError(f"{THREADS_ENV} must be a positive integer, not {value!r}")
        return threads
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def choose_save_every(layers: int, width: int, batch: int, chunk_layers: int) -> int:
    """Layers per recomputed segment: small enough for L2, large enough to bound the saved states.

    A segment's recomputed states and derivatives and its weights are read again by the
    back-propagation right after the recomputation: all three should still be in L2 then (the weights
    dominate at large width and small batch: 4 KiB a layer at width 32).
    """
    per_state = 4 * width * batch
    per_layer = 2 * per_state + 4 * (width * width + width)
    for_cache = max(16, SEGMENT_CACHE_BYTES // per_layer)
    for_memory = math.ceil(layers * per_state / MAX_SAVED_STATE_BYTES)
    return max(1, min(chunk_layers, max(for_cache, for_memory)))


class WeightStore:
    """Where the core weights live. Hands out chunks (first_layer, rows); rows are (n, w*w+w) float32."""

    layers: int
    row_size: int
    #: Whether the chunks a pass yields stay valid together (views of the weights), so threads may each
    #: run their share of the batch through all of them; a store that reuses buffers is False.
    random_access = False

    def bounds(self, chunk_layers: int) -> list[tuple[int, int]]:
        """(start, stop) of the chunks, first to last: one kernel call each."""
        return chunk_bounds(self.layers, chunk_layers)

    def forward_chunks(self, bounds: list[tuple[int, int]]) -> Iterator[tuple[int, np.ndarray]]:
        raise NotImplementedError

    def backward_chunks(self, bounds: list[tuple[int, int]], step: int) -> Iterator[tuple[int, np.ndarray]]:
        """The chunks last first; rows may be modified in place and are kept once the next is asked for."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def chunk_bounds(layers: int, chunk_layers: int) -> list[tuple[int, int]]:
    """(start, stop) of each chunk, first to last."""
    return [(s, min(s + chunk_layers, layers)) for s in range(0, layers, chunk_layers)]


class InMemoryStore(WeightStore):
    """All core weights in one array in RAM; chunks are views, updated in place."""

    random_access = True

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


def contiguous_runs(offsets: np.ndarray, chunk_bytes: int) -> list[tuple[int, int]]:
    """Runs [first, stop) of storage chunks that lie back to back in the file, in layer order."""
    runs, first = [], 0
    for c in range(1, len(offsets) + 1):
        if c == len(offsets) or int(offsets[c]) != int(offsets[c - 1]) + chunk_bytes:
            runs.append((first, c))
            first = c
    return runs


class MappedStore(WeightStore):
    """Core weights streamed from the model file through a memory map of its storage chunks.

    The kernels read the file's pages where they lie (no copy into a buffer) and the backward pass
    updates them in place; the operating system reads ahead (asked explicitly for the next chunk with
    madvise) and writes dirty pages back in the background. Each storage chunk's ``chunk_step`` is
    marked before the chunk is modified, so an interrupted step is detectable as a torn step. Used for
    every file whose core chunks are plain float32 on disk (all files deepnet writes).

    Storage chunks (~1 MiB) that lie back to back in the file (most of them: HDF5 allocated a 10M-layer
    file's 763 chunks in 14 runs) form one view, so a kernel call covers ``chunk_layers`` as in RAM:
    cut at every storage chunk, the calls were 8x more and each pays for starting the backward's second
    thread.
    """

    random_access = True

    def __init__(self, model_file: ModelFile, offsets: np.ndarray, chunk_step_offset: int) -> None:
        self.file = model_file
        self.layers = model_file.layers
        self.row_size = model_file.row_size
        self.chunk = model_file.storage_chunk_layers
        self.offsets = offsets
        self.writable = model_file.mode != "r"
        with open(model_file.path, "r+b" if self.writable else "rb") as fh:
            self._map = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_WRITE if self.writable else mmap.ACCESS_READ)
        self._runs = contiguous_runs(offsets, self.chunk * self.row_size * 4)
        self._views = [self._run_view(first, stop) for first, stop in self._runs]
        self._run_of_chunk = np.repeat(np.arange(len(self._runs)), [stop - first for first, stop in self._runs])
        # chunk_step is marked through the map too: through h5py each mark costs ~150 us, ~0.1 s a step.
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

    def _prefetch(self, start: int, stop: int) -> None:
        if not hasattr(self._map, "madvise"):
            return
        c = start // self.chunk
        first = int(self.offsets[c]) + (start - c * self.chunk) * self.row_size * 4
        length = (stop - start) * self.row_size * 4
        aligned = first - first % mmap.PAGESIZE
        self._map.madvise(mmap.MADV_WILLNEED, aligned, length + first - aligned)

    def _chunks(self, bounds: list[tuple[int, int]], step: int | None) -> Iterator[tuple[int, np.ndarray]]:
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
        self._views = []
        self._chunk_step = None
        try:
            self._map.close()
        except BufferError:  # a caller still holds a view of the weights: the map closes with it
            pass


class StreamedStore(WeightStore):
    """Core weights streamed from the model file through h5py: read ahead on one I/O thread, written
    back after update. The fallback for files whose core cannot be memory-mapped.

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

    def _buffer(self, k: int, rows: int) -> np.ndarray:
        if len(self._buffers) != 3 or self._buffers[0].shape[0] < rows:
            self._buffers = [np.empty((rows, self.row_size), np.float32) for _ in range(3)]
        return self._buffers[k % 3]

    def _read(self, start: int, stop: int, out: np.ndarray) -> np.ndarray:
        view = out[: stop - start]
        self.file.read_layers(start, stop, out=view)
        return view

    def _chunks(self, bounds: list[tuple[int, int]], write_step: int | None):
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
                    writes.append(self._io.submit(self.file.write_layers, start, chunk, write_step))
                    for w in [w for w in writes if w.done()]:
                        w.result()  # a failed write surfaces here, before more chunks are updated
                    writes = [w for w in writes if not w.done()]
        finally:
            # Never leave I/O running behind the caller's back (also on an exception in the kernel).
            pending.exception()
            for w in writes:
                w.result()

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


class ThreadChoice:
    """1 or ``most`` threads for a pass that is run again and again: whichever has been faster here.

    The second core pays only when it is free and when the kernels at hand use it well (at width 32
    and batch 1 two threads once measured 3-4x slower than one; since the backward's threads spin
    rather than sleep while they wait, about as fast), and one thread or two give the same result bit
    for bit. So the choice is made by measurement: the
    first pass is not counted (it pays for first touches of new buffers), then each option is tried
    ``TRIALS`` times (alternately) and the faster kept, trying the other again after ``RECHECK_EVERY``
    passes; each re-check that confirms the choice doubles the wait before the next (up to
    ``MAX_RECHECK_EVERY``), so a much slower option costs little. An option's speed is the best of its
    last ``KEEP`` passes: on a shared machine a pass is only ever slowed by others, so one unlucky pass
    does not decide the choice for long.
    """

    RECHECK_EVERY = 16
    MAX_RECHECK_EVERY = 256
    KEEP = 3
    TRIALS = 2   # passes of each option before the first choice

    def __init__(self, most: int) -> None:
        self.most = max(1, most)
        self._seconds: dict[int, list[float]] = {}   # threads -> seconds of its last KEEP passes
        self._warmed_up = False
        self._interval = self.RECHECK_EVERY
        self._since_check = 0                        # passes since the other option last ran

    @property
    def settled(self) -> bool:
        """Whether the first choice is made: until then passes alternate between the options on purpose."""
        if self.most < 2:
            return True
        return (self._warmed_up and len(self._seconds) == 2
                and min(len(seconds) for seconds in self._seconds.values()) >= self.TRIALS)

    def _best(self) -> int:
        return min(self._seconds, key=lambda threads: min(self._seconds[threads]))

    def pick(self) -> int:
        if self.most < 2:
            return 1
        for trial in range(self.TRIALS):
            for threads in (self.most, 1):
                if len(self._seconds.get(threads, [])) <= trial:
                    return threads
        best = self._best()
        other = 1 if best != 1 else self.most
        return other if self._since_check >= self._interval - 1 else best

    def record(self, threads: int, seconds: float) -> None:
        if self.most < 2:
            return   # nothing to choose
        if not self._warmed_up:
            self._warmed_up = True
            return
        trials = not self.settled
        rechecked = not trials and threads != self._best()
        self._seconds[threads] = (self._seconds.get(threads, []) + [seconds])[-self.KEEP:]
        if rechecked:
            confirmed = threads != self._best()
            self._interval = min(2 * self._interval, self.MAX_RECHECK_EVERY) if confirmed else self.RECHECK_EVERY
            self._since_check = 0
        elif not trials:
            self._since_check += 1


class FixedThreads:
    """A thread count set by the user instead of measured: ThreadChoice's interface, always ``threads``."""

    settled = True

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def pick(self) -> int:
        return self.threads

    def record(self, threads: int, seconds: float) -> None:
        pass


class CoreEngine:
    """Runs h through the L core layers and back, one kernel call per chunk."""

    def __init__(self, store: WeightStore, kernels: LayerKernels, width: int, alpha: float,
                 chunk_layers: int, threads: int | None = None) -> None:
        if chunk_layers < 1:
            raise ConfigError(f"--chunk-layers must be >= 1, got {chunk_layers}")
        if store.row_size != width * width + width:
            raise ConfigError(f"core rows have {store.row_size} floats but width {width} needs {width * width + width}")
        self.store = store
        self.kernels = kernels
        self.width = width
        self.alpha = float(alpha)
        self.chunk_layers = min(chunk_layers, store.layers)
        self._bounds = store.bounds(self.chunk_layers)
        self._saves: np.ndarray | None = None
        self._save_offsets: list[int] = []
        self._save_every = 0
        self._work: np.ndarray | None = None
        self._part_work: list[np.ndarray] = []
        self._work_batch = 0
        self._pending_backward = False
        self.threads = default_threads() if threads is None else threads
        self._pool: ThreadPoolExecutor | None = None
        # Per pass kind (training forward, evaluation, backward): one thread or two, by measurement.
        self._thread_choices: dict[tuple[str, int], ThreadChoice] = {}
        #: threads the latest pass of each kind ran on ("forward", "evaluation", "backward"), for benchmarks
        self.threads_used: dict[str, int] = {}
        #: if set, every pass runs on this many threads (at most what the pass can use) instead of the
        #: thread choice's measured pick: for measuring one option on its own (`deepnet bench --threads`)
        self.fixed_threads: int | None = None
        #: Called between chunks (it may raise KeyboardInterrupt): training's Ctrl-C handling.
        self.interrupt_check: Callable[[], None] | None = None

    @property
    def layers(self) -> int:
        return self.store.layers

    def _prepare(self, batch: int) -> None:
        if self._work is not None and self._work_batch == batch:
            return
        self._save_every = choose_save_every(self.layers, self.width, batch, self.chunk_layers)
        offsets, total = [], 0
        for start, stop in self._bounds:
            offsets.append(total)
            total += -(-(stop - start) // self._save_every)
        self._save_offsets = offsets
        self._saves = np.empty((total, self.width * batch), np.float32)
        self._work = np.empty(self.kernels.workspace_size(self.width, batch, self._save_every), np.float32)
        self._part_work = []   # the forward's other threads' scratch, made when a pass first splits
        self._work_batch = batch

    def forward(self, h: np.ndarray, *, for_backward: bool = True) -> np.ndarray:
        """h (width, batch) float32 through every layer, in place; returns h.

        With ``for_backward`` the states needed by ``backward`` are saved; without it (evaluation)
        nothing is kept.
        """
        h = self._check_state(h)
        batch = h.shape[1]
        self._prepare(batch)
        # The kernels cut a batch into blocks of 8 samples at the least, so batch 16 can use two threads.
        # Evaluation splits whole blocks (32 samples at width <= 4), as it always has; training's forward
        # may cut its blocks to 8 samples, which helps some activations only, so it is measured.
        most = min(self.threads, batch // MIN_SPLIT_BLOCK) if batch >= 2 * MIN_SPLIT_BLOCK else 1
        kind = "forward" if for_backward else "evaluation"
        choice = self._thread_choice(kind, most, measured=for_backward)
        n_parts = choice.pick()
        self.threads_used[kind] = n_parts
        if n_parts > 1 and self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="deepnet-forward")
        started = time.perf_counter()

        def saves_of(k: int) -> np.ndarray | None:
            return self._saves[self._save_offsets[k]:] if for_backward else None

        if n_parts > 1 and self.store.random_access:
            # All chunks at once (a memory-mapped store asks the OS to read all of them ahead).
            self._forward_free_running(list(self.store.forward_chunks(self._bounds)), h, saves_of, n_parts)
        else:
            for k, (start, rows) in enumerate(self.store.forward_chunks(self._bounds)):
                if n_parts == 1:
                    self.kernels.forward(rows, h, self.alpha, saves_of(k), self._save_every, self._work)
                else:
                    # Each thread takes its own run of batch blocks of this chunk (and its own scratch).
                    parts = [self._pool.submit(self.kernels.forward, rows, h, self.alpha, saves_of(k),
                                               self._save_every, self._scratch(part), part, n_parts)
                             for part in range(n_parts)]
                    for f in parts:
                        f.result()
                if self.interrupt_check is not None:
                    self.interrupt_check()
        choice.record(n_parts, time.perf_counter() - started)
        self._pending_backward = for_backward
        return h

    def _scratch(self, part: int) -> np.ndarray:
        """Part ``part``'s kernel scratch, allocated once per batch size (none per chunk)."""
        if part == 0:
            return self._work
        while len(self._part_work) < part:
            self._part_work.append(np.empty_like(self._work))
        return self._part_work[part - 1]

    def _forward_free_running(self, chunks: list[tuple[int, np.ndarray]], h: np.ndarray,
                              saves_of: Callable[[int], np.ndarray | None], n_parts: int) -> None:
        """Each thread runs its share of the batch's blocks through every chunk on its own.

        The columns of the batch are independent in the forward pass, so the threads need not meet
        after each chunk: a thread the machine slows for a moment delays only its own share instead of
        holding the other at every chunk. The calling thread waits, running the interrupt check.
        """
        stop = threading.Event()

        def run_part(part: int, scratch: np.ndarray) -> None:
            for k, (_, rows) in enumerate(chunks):
                if stop.is_set():
                    return
                self.kernels.forward(rows, h, self.alpha, saves_of(k), self._save_every, scratch, part, n_parts)

        # scratch is handed out here, on the calling thread (it may be allocated on first use)
        futures = [self._pool.submit(run_part, part, self._scratch(part)) for part in range(n_parts)]
        try:
            while True:
                done, pending = wait(futures, timeout=0.05)
                for f in done:
                    f.result()  # a thread's error stops the pass
                if self.interrupt_check is not None:
                    self.interrupt_check()
                if not pending:
                    break
        except BaseException:
            stop.set()  # the threads stop after their current chunk; h is not touched once this returns
            wait(futures)
            raise

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
        choice = self._thread_choice("backward", self.threads)
        threads = choice.pick()
        self.threads_used["backward"] = threads
        started = time.perf_counter()
        chunks = self.store.backward_chunks(self._bounds, step)
        try:
            for j, (start, rows) in enumerate(chunks):
                k = n_chunks - 1 - j
                saves = self._saves[self._save_offsets[k]:]
                self.kernels.backward(rows, saves, self._save_every, g, self.alpha, float(layer_lr), self._work,
                                      threads)
                # The numerical guard: stop before the next chunk is touched (g is only width x batch).
                if not np.isfinite(g).all():
                    stop = start + rows.shape[0]
                    raise NonFiniteError(f"the gradient became non-finite in layers {start}..{stop - 1}",
                                         start=start, stop=stop)
                if self.interrupt_check is not None:
                    self.interrupt_check()
        except BaseException:
            chunks.close()  # stopped mid-pass: a streamed store finishes its pending writes (not this chunk's)
            raise
        self._pending_backward = False
        choice.record(threads, time.perf_counter() - started)
        return g

    @property
    def thread_choices_settled(self) -> bool:
        """Whether every kind of pass run so far has made its first choice of one thread or several
        (a benchmark should time the passes after that, not the trials; see ThreadChoice)."""
        return all(choice.settled for choice in self._thread_choices.values())

    def _thread_choice(self, kind: str, most: int, measured: bool = True) -> ThreadChoice | FixedThreads:
        """The thread choice for one kind of pass at the current batch size: measured, or ``most``
        threads when not, or the user's ``fixed_threads`` (at most ``most``)."""
        if self.fixed_threads or not measured:
            return FixedThreads(min(self.fixed_threads or most, most))
        key = (kind, self._work_batch)
        if key not in self._thread_choices:
            self._thread_choices[key] = ThreadChoice(most)
        return self._thread_choices[key]

    def _check_state(self, h: np.ndarray) -> np.ndarray:
        if h.dtype != np.float32 or h.ndim != 2 or h.shape[0] != self.width or not h.flags.c_contiguous:
            raise ConfigError(f"core state must be a C-contiguous float32 array of shape ({self.width}, batch)")
        return h

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.store.close()
