"""The core engine: forward and exact backward through all L residual layers, chunk by chunk.

The weights come from a weight store (deepnet.nn.stores): one array in RAM or the model file, streamed
chunk by chunk. Every store hands the engine the same chunks, and the kernels do the same arithmetic on
them, so all modes give bit-identical results. How many threads a pass runs on is deepnet.nn.threads'.

Checkpointing: the forward pass saves the state h every ``save_every`` layers (a few hundred, chosen so a
segment's recomputed activations fit in this CPU's L2 cache, read at run time). The backward pass recomputes one segment at a time
from its saved state and back-propagates through it. ``chunk_layers`` only sets how many layers one
kernel call (and one read from the file) covers, at least the store's ``min_chunk_layers`` (1M in RAM);
the saved states depend on it only in where they sit, and recomputation is bit-identical to the
forward pass, so results do not depend on it.

Threads: the forward pass splits its batch columns (they are independent). The backward pass's
threads either share the batch's blocks (each core half of them, the second one segment behind the
first, adding its blocks to the gradient sums the first left: they cross cores once per segment of
hundreds of layers, not per layer) or take segments in turn (each core every other segment whole, only
g crossing cores; always so at a batch of one block); ``_backward_choice`` measures which. Bit-identical
either way.
"""

from __future__ import annotations

import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable

import numpy as np

from deepnet.errors import ConfigError
from deepnet.kernels.loader import LayerKernels
from deepnet.nn.caches import l2_bytes
from deepnet.nn.finite import NonFiniteError
from deepnet.nn.stores import WeightStore
from deepnet.nn.threads import FixedChoice, MeasuredChoice, ThreadChoice, default_threads

# The share of one core's L2 (deepnet.nn.caches) that one segment's recomputed states, derivatives and
# weights may take: the rest is the kernels' other traffic.
SEGMENT_L2_SHARE = 0.5
# Upper bound on the memory of all saved states; deeper models get longer segments instead.
MAX_SAVED_STATE_BYTES = 256 * 1024 * 1024
# Chunks a pass is cut into at most, where MAX_CHUNK_BYTES allows: deeper models get longer chunks.
MAX_CHUNKS = 1000
# Rows of one chunk at most, in bytes, when lengthened for MAX_CHUNKS (a streamed store's buffers are three).
MAX_CHUNK_BYTES = 64 << 20
# Samples in the smallest batch block the forward kernels run (a thread's share is a multiple of it).
MIN_SPLIT_BLOCK = 8


def choose_save_every(layers: int, width: int, batch: int, chunk_layers: int) -> int:
    """Layers per recomputed segment: small enough for L2, large enough to bound the saved states.

    A segment's recomputed states and derivatives and its weights are read again by the
    back-propagation right after the recomputation: all three should still be in L2 then (the weights
    dominate at large width and small batch: 4 KiB a layer at width 32). The L2's size is this CPU's
    (read at run time), so the same model gets longer segments on a CPU with a larger L2.
    """
    per_state = 4 * width * batch
    per_layer = 2 * per_state + 4 * (width * width + width)
    for_cache = max(16, int(SEGMENT_L2_SHARE * l2_bytes()) // per_layer)
    for_memory = math.ceil(layers * per_state / MAX_SAVED_STATE_BYTES)
    return max(1, min(chunk_layers, max(for_cache, for_memory)))


def choose_chunk_layers(requested: int, layers: int, row_size: int) -> int:
    """Layers per chunk (kernel call, read from the file): ``requested``, lengthened so that a pass has
    at most MAX_CHUNKS chunks as long as a chunk stays within MAX_CHUNK_BYTES (each chunk costs a kernel
    call, the backward's thread start and a store's read, mark and write-back), at most ``layers``.
    1B layers at width 2: 1M-layer chunks (24 MB). Results do not depend on it."""
    for_count = -(-layers // MAX_CHUNKS)
    for_bytes = max(requested, MAX_CHUNK_BYTES // (4 * row_size))
    return max(1, min(layers, max(requested, min(for_count, for_bytes))))


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
        self.chunk_layers = choose_chunk_layers(max(chunk_layers, store.min_chunk_layers), store.layers,
                                                store.row_size)
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
        # Per pass kind (training forward, evaluation, backward) and batch: one thread or two (and the
        # backward's batch block), by measurement.
        self._thread_choices: dict[tuple[str, int], MeasuredChoice] = {}
        #: threads the latest pass of each kind ran on ("forward", "evaluation", "backward"), for benchmarks
        self.threads_used: dict[str, int] = {}
        #: samples per batch block of the latest backward pass (8, or 16 in 16-lane vectors), for benchmarks
        self.backward_block_used = 8
        #: how the latest backward pass's threads shared it ("blocks" or "segments"; moot on one thread)
        self.backward_split_used = "blocks"
        #: if set, every pass runs on this many threads (at most what the pass can use) instead of the
        #: thread choice's measured pick: for measuring one option on its own (`deepnet bench --threads`)
        self.fixed_threads: int | None = None
        #: Called between chunks (it may raise KeyboardInterrupt): training's Ctrl-C handling.
        self.interrupt_check: Callable[[], None] | None = None

    @property
    def layers(self) -> int:
        """Core layers L."""
        return self.store.layers

    @property
    def work_batch(self) -> int:
        """The batch size of the latest pass (0 before the first): the one its buffers are sized for."""
        return self._work_batch

    def buffer_bytes(self, batch: int) -> int:
        """The bytes a pass at ``batch`` allocates: the saved states and one kernel scratch per thread
        (``_prepare``), and the store's buffers."""
        save_every = choose_save_every(self.layers, self.width, batch, self.chunk_layers)
        saves = sum(-(-(stop - start) // save_every) for start, stop in self._bounds)
        work = self.kernels.workspace_size(self.width, batch, save_every)
        buffers = self.store.buffer_bytes(self.chunk_layers)
        return 4 * (saves * self.width * batch + work * max(1, self.threads)) + buffers

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
        choice = self._backward_choice()
        threads, block, split = choice.pick()
        self.threads_used["backward"] = threads
        self.backward_block_used, self.backward_split_used = block, split
        started = time.perf_counter()
        chunks = self.store.backward_chunks(self._bounds, step)
        try:
            for j, (start, rows) in enumerate(chunks):
                k = n_chunks - 1 - j
                saves = self._saves[self._save_offsets[k]:]
                rows_finite = self.kernels.backward(rows, saves, self._save_every, g, self.alpha,
                                                    float(layer_lr), self._work, threads, block, split)
                # The numerical guard: stop before the next chunk is touched, and before a streamed store
                # writes this one back (g is only width x batch; the kernel checked the rows as it updated them).
                if not np.isfinite(g).all():
                    stop = start + rows.shape[0]
                    raise NonFiniteError(f"the gradient became non-finite in layers {start}..{stop - 1}",
                                         start=start, stop=stop)
                if not rows_finite:
                    stop = start + rows.shape[0]
                    raise NonFiniteError(f"the updated weights of layers {start}..{stop - 1} are not finite",
                                         start=start, stop=stop)
                if self.interrupt_check is not None:
                    self.interrupt_check()
        except BaseException:
            chunks.close()  # stopped mid-pass: a streamed store finishes its pending writes (not this chunk's)
            raise
        self._pending_backward = False
        choice.record((threads, block, split), time.perf_counter() - started)
        return g

    @property
    def thread_choices_settled(self) -> bool:
        """Whether every kind of pass run so far has made its first choice of one thread or several
        (a benchmark should time the passes after that, not the trials; see MeasuredChoice)."""
        return all(choice.settled for choice in self._thread_choices.values())

    def _thread_choice(self, kind: str, most: int, measured: bool = True) -> MeasuredChoice | FixedChoice:
        """The thread choice for one kind of pass at the current batch size: measured, or ``most``
        threads when not, or the user's ``fixed_threads`` (at most ``most``)."""
        if self.fixed_threads or not measured:
            return FixedChoice(min(self.fixed_threads or most, most))
        key = (kind, self._work_batch)
        if key not in self._thread_choices:
            self._thread_choices[key] = ThreadChoice(most)
        return self._thread_choices[key]

    def _backward_choice(self) -> MeasuredChoice | FixedChoice:
        """(threads, batch block, split) for the backward pass at the current batch size, all giving the
        same result: one thread, or all taking segments in turn or sharing the batch's blocks (offered
        where the batch has more than one block). Blocks of 8 samples; blocks of 16 instead where the
        kernels run them in one register per unit (AVX-512: the same results with half the instructions),
        and of 8 only to share a batch of 16 by blocks; where they run the segments split's pieces of one
        or two 16-sample blocks on two 8-lane halves (AVX2 at width 4), blocks of 16 split by segments as
        well (and on one thread, a batch of one such block). With ``fixed_threads``: blocks of 16 split by
        segments where they are offered (the faster on a Zen 4, bench/README.md), else blocks of 8 shared
        by blocks."""
        batch = self._work_batch
        blocks16 = self.kernels.backward_block_count(batch, 16)
        wide = (self.kernels.block16_native and batch >= 16
                and 16 in self.kernels.backward_blocks(self.width))
        halves = not wide and batch > 8 and blocks16 <= 2 and self.kernels.block16_halves(self.width)
        if self.fixed_threads:
            threads = min(self.fixed_threads, self.threads)
            paired = wide or (halves and (threads > 1 or blocks16 == 1))
            return FixedChoice((threads, 16, "segments") if paired else (threads, 8, "blocks"))
        key = ("backward", batch)
        if key not in self._thread_choices:
            most = self.threads
            alone = 16 if wide or (halves and blocks16 == 1) else 8    # one thread's block
            options = [(1, alone, "blocks")]
            if most > 1:
                # sharing needs two blocks or more: a batch that is one 16-sample block shares 8-sample ones
                shared = 16 if wide and blocks16 > 1 else 8
                sharing = [(most, shared, "blocks")] if self.kernels.backward_block_count(batch, shared) > 1 else []
                options = [(most, 16 if wide or halves else 8, "segments"), *sharing, *options]
            self._thread_choices[key] = MeasuredChoice(options)
        return self._thread_choices[key]

    def _check_state(self, h: np.ndarray) -> np.ndarray:
        if h.dtype != np.float32 or h.ndim != 2 or h.shape[0] != self.width or not h.flags.c_contiguous:
            raise ConfigError(f"core state must be a C-contiguous float32 array of shape ({self.width}, batch)")
        return h

    def close(self) -> None:
        """Stop the threads and close the weight store."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self.store.close()
