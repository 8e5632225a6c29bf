"""One exact SGD step with the core split by depth over P ranks, the batch cut into M micro-batches.

Rank r owns core layers [first_r, first_r + n_r) in RAM (a ``RankCore``); rank 0 also the input head,
the last rank the output head and the loss. The schedule is GPipe's: every micro-batch goes forward
through the ranks (rank r works on micro-batch m while rank r+1 works on m-1), then every micro-batch
goes back (likewise, in the same order), and only then is anything updated. So the step is the one a
single process takes: the gradient that flows down uses every layer's old weights, each layer's
gradient is summed over the whole batch, the heads' gradients are taken at their old weights.

The compiled backward updates a chunk of layers in place as it goes (that is how one process keeps the
weights in cache). With one micro-batch (M = 1) a rank calls it on its weights exactly as one process
does, so the result is the same bit for bit. With M > 1 the update must wait for the last micro-batch:
each micro-batch's backward runs on a copy of the chunk with the learning rate SCALE (a power of two),
so ``copy = W - SCALE * dW_m`` and ``W - copy`` recovers ``SCALE * dW_m`` to float32 rounding; the
sums are applied once every micro-batch has passed (``RankCore.apply``). That costs a copy of each
chunk per micro-batch and a gradient buffer the size of the rank's layers.

The step is written as two phases per rank (``forward_phase``, ``backward_phase``) over a ``Link`` to
the neighbouring ranks, so the same code runs under MPI (deepnet.distributed.run) and, in one process,
rank after rank (``run_in_process``: the tests' reference for the schedule).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from deepnet.kernels.loader import LayerKernels
from deepnet.nn import heads as _heads
from deepnet.nn.engine import NonFiniteError, choose_save_every
from deepnet.nn.finite import finite_rows
from deepnet.nn.losses import softmax_cross_entropy

#: The learning rate a micro-batch's backward runs at on its copy of a chunk (see the module docstring).
SCALE = float(2 ** 20)

#: Bytes of weights a micro-batch's backward copies and accumulates at a time (about half an L2 cache).
ACCUMULATE_BLOCK_BYTES = 256 * 1024

#: The smallest micro-batch the default cuts: two of the kernels' 8-sample blocks, which their fused
#: backward needs to hide the recomputation's latency.
MIN_MICRO_BATCH = 16


def micro_batch_sizes(batch: int, micro_batches: int) -> list[int]:
    """The batch cut into ``micro_batches`` contiguous pieces, sizes differing by at most one sample."""
    base, extra = divmod(batch, micro_batches)
    return [base + (m < extra) for m in range(micro_batches)]


def default_micro_batches(batch: int, ranks: int) -> int:
    """The number of micro-batches a step is cut into when not given (bench/README.md has the figures).

    The pipeline keeps ranks busy for P*M/(M + P - 1) of the ideal, but more than one micro-batch costs
    the gradient sums (a copy of every block and a buffer the size of the rank's layers), and a
    micro-batch under two kernel blocks (16 samples) loses the fused backward that hides the
    recomputation's latency. At two ranks the best gain, 4/3 at M = 2, is less than that cost (measured:
    one micro-batch is fastest), so two ranks run whole batches; from three ranks on, up to 2P
    micro-batches of at least 16 samples.
    """
    if ranks <= 2:
        return 1
    return max(1, min(2 * ranks, batch // MIN_MICRO_BATCH))


class RankCore:
    """The core layers one rank owns (``params``, (n, w*w + w) float32, updated in place) and the passes
    of one step over them, one micro-batch at a time."""

    def __init__(self, params: np.ndarray, kernels: LayerKernels, width: int, alpha: float, chunk_layers: int,
                 micro_sizes: list[int], threads: int = 1) -> None:
        self.params = params
        self.kernels = kernels
        self.width = width
        self.alpha = float(alpha)
        self.threads = threads
        n = params.shape[0]
        chunk = max(1, min(chunk_layers, n))
        self.bounds = [(start, min(n, start + chunk)) for start in range(0, n, chunk)]
        self.micro_sizes = list(micro_sizes)
        self.save_every = [choose_save_every(n, width, size, chunk) for size in self.micro_sizes]
        self.saves = [[np.empty((-(-(stop - start) // every), width * size), np.float32)
                       for start, stop in self.bounds] for every, size in zip(self.save_every, self.micro_sizes)]
        self.work = [np.empty(kernels.workspace_size(width, size, every), np.float32)
                     for size, every in zip(self.micro_sizes, self.save_every)]
        self.accumulate = len(self.micro_sizes) > 1
        self.grad = np.zeros_like(params) if self.accumulate else None
        # A micro-batch's backward copies and accumulates a block of a few recomputed segments at a time,
        # so the copy stays in cache between the kernel and the sums.
        self.block = [every * max(1, ACCUMULATE_BLOCK_BYTES // (every * 4 * params.shape[1]))
                      for every in self.save_every]
        self.copy = np.empty((min(chunk, max(self.block)), params.shape[1]), np.float32) if self.accumulate else None

    @property
    def layers(self) -> int:
        return self.params.shape[0]

    def forward(self, h: np.ndarray, m: int) -> np.ndarray:
        """Micro-batch ``m``'s state (w, n_m) through this rank's layers, in place, saving what its
        backward recomputes from."""
        for (start, stop), saves in zip(self.bounds, self.saves[m]):
            self.kernels.forward(self.params[start:stop], h, self.alpha, saves, self.save_every[m], self.work[m])
        return h

    def backward(self, g: np.ndarray, m: int, lr: float) -> np.ndarray:
        """Micro-batch ``m``'s gradient at this rank's top (w, n_m) back to its bottom, in place. With one
        micro-batch the layers are updated as it goes; with more, their gradients are summed for apply()."""
        for k in range(len(self.bounds) - 1, -1, -1):
            start, stop = self.bounds[k]
            rows = self.params[start:stop]
            if self.accumulate:
                self._backward_blocks(k, g, m)
            else:
                rows_finite = self.kernels.backward(rows, self.saves[m][k], self.save_every[m], g, self.alpha,
                                                    float(lr), self.work[m], self.threads)
                if not rows_finite:
                    raise NonFiniteError(f"the updated weights of layers {start}..{stop - 1} of this rank are "
                                         "not finite", start=start, stop=stop)
            if not np.isfinite(g).all():
                raise NonFiniteError(f"the gradient became non-finite in layers {start}..{stop - 1} of this rank",
                                     start=start, stop=stop)
        return g

    def _backward_blocks(self, k: int, g: np.ndarray, m: int) -> None:
        """Chunk ``k``'s backward for micro-batch ``m`` on copies of its blocks (top block first), summing
        each layer's gradient (times SCALE) into ``grad``; the weights are not changed."""
        start, stop = self.bounds[k]
        every, block = self.save_every[m], self.block[m]
        saves = self.saves[m][k]
        tops = list(range(start, stop, block))
        for lo in reversed(tops):
            hi = min(stop, lo + block)
            copy = self.copy[:hi - lo]
            np.copyto(copy, self.params[lo:hi])
            self.kernels.backward(copy, saves[(lo - start) // every:], every, g, self.alpha, SCALE, self.work[m],
                                  self.threads)
            np.subtract(self.params[lo:hi], copy, out=copy)      # SCALE x this micro-batch's gradient sums
            np.add(self.grad[lo:hi], copy, out=self.grad[lo:hi])

    def apply(self, lr: float) -> None:
        """Apply the summed gradients of every micro-batch (M > 1; nothing to do for M = 1)."""
        if not self.accumulate:
            return
        step = np.float32(lr / SCALE)
        for start, stop in self.bounds:
            rows = self.params[start:stop]
            new = rows - step * self.grad[start:stop]
            if not finite_rows(new):
                raise NonFiniteError(f"the updated weights of layers {start}..{stop - 1} of this rank are not "
                                     "finite", start=start, stop=stop)
            rows[...] = new
        self.grad.fill(0.0)


class Link(Protocol):
    """A rank's connection to its neighbours: states go up (to rank + 1), gradients come down."""

    def send_up(self, m: int, h: np.ndarray) -> None: ...
    def recv_from_below(self, m: int, shape: tuple[int, int]) -> np.ndarray: ...
    def send_down(self, m: int, g: np.ndarray) -> None: ...
    def recv_from_above(self, m: int, shape: tuple[int, int]) -> np.ndarray: ...


@dataclass
class RankStep:
    """One rank's part of one step: its position, its core, the heads it owns and what it keeps between
    the forward and backward phases."""

    rank: int
    ranks: int
    core: RankCore
    heads: dict[str, np.ndarray]          # input_* on rank 0, output_* on the last rank (both if one)
    x: np.ndarray | None = None           # the batch's inputs (rank 0)
    y: np.ndarray | None = None           # its labels (the last rank)
    h0: np.ndarray | None = None          # the input head's output for the batch (rank 0)
    g_top: list[np.ndarray] = field(default_factory=list)
    out: _heads.OutputGradients | None = None
    loss: float = 0.0
    correct: float = 0.0

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.ranks - 1

    def _slices(self) -> list[slice]:
        out, start = [], 0
        for size in self.core.micro_sizes:
            out.append(slice(start, start + size))
            start += size
        return out

    def forward_phase(self, link: Link) -> None:
        """Every micro-batch forward through this rank; on the last, the loss and the gradients at the top.

        The heads work on the whole batch at once, as one process does (rank 0 computes h_0 for all of it
        first; the last rank waits for every micro-batch's state), so their arithmetic is the same."""
        w = self.core.width
        slices = self._slices()
        if self.first:
            self.h0 = _heads.input_head(self.heads, self.x)                      # (batch, w)
        states = []
        for m, part in enumerate(slices):
            if self.first:
                h = np.ascontiguousarray(self.h0[part].T)
            else:
                h = link.recv_from_below(m, (w, part.stop - part.start))
            self.core.forward(h, m)
            if self.last:
                states.append(h)
            else:
                link.send_up(m, h)
        if not self.last:
            return
        h_last = (states[0] if len(states) == 1 else np.concatenate(states, axis=1)).T
        logits = _heads.output_head(self.heads, h_last)
        self.loss, accuracy, dlogits = softmax_cross_entropy(logits, self.y)
        self.correct = accuracy * h_last.shape[0]
        self.out = _heads.output_gradients(self.heads, h_last, dlogits)
        if not math.isfinite(self.loss):
            raise NonFiniteError(f"the loss is {self.loss}")
        if not self.out.finite():
            raise NonFiniteError("the gradient reaching the core is not finite")
        self.g_top = [np.ascontiguousarray(self.out.core[:, part]) for part in slices]

    def backward_phase(self, link: Link, layer_lr: float, head_lr: float) -> None:
        """Every micro-batch back through this rank, then the updates: the core's, and the heads' it owns
        (their gradients were taken at the old weights)."""
        w = self.core.width
        slices = self._slices()
        bottom = []
        for m, part in enumerate(slices):
            g = self.g_top[m] if self.last else link.recv_from_above(m, (w, part.stop - part.start))
            self.core.backward(g, m, layer_lr)
            if self.first:
                bottom.append(g)
            else:
                link.send_down(m, g)
        self.core.apply(layer_lr)
        if self.last:
            _heads.assign_stepped(self.heads, _heads.stepped_output(self.heads, self.out, head_lr))
        if self.first:
            g0 = bottom[0] if len(bottom) == 1 else np.concatenate(bottom, axis=1)
            _heads.assign_stepped(self.heads, _heads.stepped_input(self.heads, self.x, self.h0, g0, head_lr))


class QueueLink:
    """The neighbours of one rank in one process: messages kept in dicts shared by all ranks."""

    def __init__(self, rank: int, up: dict, down: dict) -> None:
        self.rank, self.up, self.down = rank, up, down

    def send_up(self, m: int, h: np.ndarray) -> None:
        self.up[(self.rank + 1, m)] = h.copy()

    def recv_from_below(self, m: int, shape: tuple[int, int]) -> np.ndarray:
        return self.up.pop((self.rank, m))

    def send_down(self, m: int, g: np.ndarray) -> None:
        self.down[(self.rank - 1, m)] = g.copy()

    def recv_from_above(self, m: int, shape: tuple[int, int]) -> np.ndarray:
        return self.down.pop((self.rank, m))


def run_in_process(steps: list[RankStep], layer_lr: float, head_lr: float) -> tuple[float, float]:
    """One step of every rank in one process, rank after rank (the schedule's order without the overlap);
    returns the loss and the accuracy."""
    up: dict = {}
    down: dict = {}
    links = [QueueLink(s.rank, up, down) for s in steps]
    for s, link in zip(steps, links):
        s.forward_phase(link)
    for s, link in zip(reversed(steps), reversed(links)):
        s.backward_phase(link, layer_lr, head_lr)
    last = steps[-1]
    return last.loss, last.correct / sum(last.core.micro_sizes)
