"""An exponential moving average (EMA) of the dense model's weights: core, heads and branch.

``--ema DECAY`` keeps a second copy of every weight and, after every training step, moves it towards the
live weights::

    avg <- avg + (1 - DECAY) * (live - avg)          (= DECAY * avg + (1 - DECAY) * live)

``--ema DECAY --ema-every K`` is the Lookahead-style variant: every K steps the average takes that step
towards the live weights and is then written back into them (``live <- avg``), so training continues
from the average; between those steps nothing is done (Lookahead's k = K, alpha = 1 - DECAY: e.g.
``--ema 0.5 --ema-every 5``).

The average starts as a copy of the live weights when EMA is switched on, or continues the one stored
in the model file if that was taken at the model's current step. A run without ``--ema`` on a file that
holds an average continues it with the stored decay and every (``resume``); streamed, it is refused.

Memory: the average is a second copy of the core in RAM, L x (w*w + w) x 4 bytes (800 MB at 10M layers,
width 4), so EMA needs in-memory training (``--in-memory``) and is refused, with one line saying why,
in streamed mode and when that second copy would not fit in the memory available now
(``MemAvailable`` of /proc/meminfo). Time: one pass over both copies per step, in cache-sized blocks
(``BLOCK_FLOATS``), on the same threads as the kernels; measured in the README.

In the model file (written with the in-memory checkpoints, i.e. atomically with the step it belongs
to): root attributes ema_decay, ema_every (0: every step) and ema_step (the step it was taken at), and
the averaged weights at the paths deepnet.formats.layout names ``EMA_*``: the core (same shape and
chunking as the live core), the four heads, and the branch's parameters (models with a branch).

``deepnet eval --use-ema`` evaluates those weights (holding the averaged core in RAM).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Iterator

import h5py
import numpy as np

from deepnet.errors import ConfigError, ModelFileError
from deepnet.flags import int_at_least
from deepnet.formats.hdf5 import ModelFile
from deepnet.formats.layout import (CORE_WEIGHTS, EMA_BRANCH_GROUP, EMA_CORE, EMA_DECAY_ATTR, EMA_EVERY_ATTR, EMA_HEAD_PATHS,
                                    EMA_STEP_ATTR)
from deepnet.nn.branch import MLPBranch, write_datasets
from deepnet.nn.finite import NonFiniteError, finite_blocks, quiet
from deepnet.nn.memory import mem_available, require
from deepnet.nn.network import DeepNet
from deepnet.nn.threads import default_threads

#: Floats per block of the blend: 256 KiB, so ``live - avg`` stays in L2 for the two operations after it.
BLOCK_FLOATS = 1 << 16


def check_options(ema: float | None, ema_every: int | None, in_memory: bool) -> None:
    """Validate --ema / --ema-every; refuse them in streamed mode."""
    if ema is None:
        if ema_every is not None:
            raise ConfigError("--ema-every needs --ema DECAY")
        return
    if isinstance(ema, bool) or not isinstance(ema, (int, float)) or not 0.0 <= ema < 1.0:
        raise ConfigError(f"--ema must be a decay in [0, 1), e.g. 0.999, got {ema!r}")
    if ema_every is not None:
        int_at_least("ema-every", ema_every, 1)
    if not in_memory:
        raise ConfigError("--ema needs --in-memory: the average is a second copy of the core in RAM, updated "
                          "every step, and streamed training keeps no copy of the core in RAM")


def resume(net: DeepNet, decay: float | None, every: int | None) -> "WeightAverage | None":
    """The weight average of a run on ``net``: as the flags say (``--ema DECAY [--ema-every K]``), else
    the one stored in the model file continued with its stored decay and every (a plain ``train``
    continues everything the file holds), else None.

    A streamed run on a file holding an average is refused: it could not keep the average going, and
    the file would keep an average frozen at an older step.
    """
    if decay is None:
        stored = stored_info(net.file)
        if stored is None:
            return None
        if not net.in_memory:
            raise ConfigError(f"{net.file.path} holds a weight average (--ema {stored['decay']:g}), which only "
                              f"in-memory training can continue: add --in-memory")
        decay, every = stored["decay"], stored["every"]
    return WeightAverage.start(net, decay, every)


def check_fits(core_bytes: int, *, resident: bool, available: int | None = None) -> None:
    """Refuse EMA when the second copy of the core would not fit in the memory available now.

    ``resident``: the core itself is already in RAM (then only the copy must fit; else both must).
    """
    need = core_bytes if resident else 2 * core_bytes
    require(need, f"--ema (a second copy of the core in RAM{'' if resident else ', with the core itself'})",
            available=mem_available() if available is None else available)


class WeightAverage:
    """The average of a DeepNet's weights (in-memory nets only), updated by ``after_step``."""

    def __init__(self, decay: float, every: int | None, core: np.ndarray, heads: dict[str, np.ndarray],
                 branch: dict[str, np.ndarray] | None, step: int, *, threads: int = 1) -> None:
        self.decay = float(decay)
        self.every = every
        self.core = core
        self.heads = heads
        self.branch = branch
        self.step = int(step)
        self.threads = max(1, int(threads))
        self._pool: ThreadPoolExecutor | None = None
        self._bufs: list[np.ndarray] = []
        #: Why the average must not be saved (None: it may).
        self.broken: str | None = None

    # -- starting ----------------------------------------------------------------------------------

    @classmethod
    def start(cls, net: DeepNet, decay: float, every: int | None = None) -> "WeightAverage":
        """The average for ``net`` (open in memory): the stored one if it was taken at net's step, else a
        copy of the live weights. Registers itself to be saved with the net's checkpoints."""
        check_options(decay, every, net.in_memory)
        live = net.core_weights
        if live is None:
            raise ConfigError("--ema needs --in-memory")
        check_fits(live.nbytes, resident=True)
        stored = stored_info(net.file)
        if stored is not None and stored["step"] == net.step:
            core, heads, branch = read_arrays(net.file, branch=net.branch is not None)
        else:
            core = np.empty_like(live)
            _copy_blocks(core, live)
            heads = {k: v.copy() for k, v in net.heads.items()}
            branch = None if net.branch is None else {k: v.copy() for k, v in net.branch.params().items()}
        average = cls(decay, every, core, heads, branch, net.step, threads=min(2, default_threads()))
        net.extra_writers.append(average.write_copy)
        return average

    # -- updating ----------------------------------------------------------------------------------

    def _pairs(self, net: DeepNet) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(average, live) of every weight."""
        yield self.core, net.core_weights
        for key, value in self.heads.items():
            yield value, net.heads[key]
        if self.branch is not None:
            live = net.branch.params()
            for key, value in self.branch.items():
                yield value, live[key]

    def after_step(self, net: DeepNet) -> None:
        """Call after each training step of ``net``."""
        if self.every is None:
            self.blend(net)
        elif net.step % self.every == 0:
            self.blend(net)
            self.write_back(net)
        self.step = net.step

    def blend(self, net: DeepNet) -> None:
        """avg += (1 - decay) * (live - avg), for every weight."""
        rate = np.float32(1.0 - self.decay)
        for avg, live in self._pairs(net):
            self._blend_flat(avg.reshape(-1), live.reshape(-1), rate)

    def _blend_flat(self, avg: np.ndarray, live: np.ndarray, rate: np.float32) -> None:
        n = avg.size
        if n <= BLOCK_FLOATS or self.threads == 1:
            self._blend_range(avg, live, rate, 0, n, 0)
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="deepnet-ema")
        # Contiguous halves, cut at a block boundary: each thread streams through its own part.
        blocks = -(-n // BLOCK_FLOATS)
        cuts = [min(n, (blocks * k // self.threads) * BLOCK_FLOATS) for k in range(self.threads + 1)]
        futures = [self._pool.submit(self._blend_range, avg, live, rate, cuts[k], cuts[k + 1], k)
                   for k in range(self.threads)]
        for f in futures:
            f.result()

    def _buf(self, k: int) -> np.ndarray:
        while len(self._bufs) <= k:
            self._bufs.append(np.empty(BLOCK_FLOATS, np.float32))
        return self._bufs[k]

    def _blend_range(self, avg: np.ndarray, live: np.ndarray, rate: np.float32, lo: int, hi: int, k: int) -> None:
        buf = self._buf(k)
        with quiet():  # per thread: NumPy's error state does not reach the pool's threads
            for a in range(lo, hi, BLOCK_FLOATS):
                b = min(hi, a + BLOCK_FLOATS)
                d = buf[: b - a]
                np.subtract(live[a:b], avg[a:b], out=d)
                np.multiply(d, rate, out=d)
                np.add(avg[a:b], d, out=avg[a:b])

    def checked(self, where: str) -> None:
        """Raise NonFiniteError if the average is not finite (it can overflow only when live weights come
        near float32's limit): checked where it is used, not after every blend, which it would slow."""
        if self.broken is None and not all(finite_blocks(a) for a in self._arrays()):
            self.broken = f"the weight average is not finite at step {self.step}"
        if self.broken:
            raise NonFiniteError(f"{where}: {self.broken}")

    def _arrays(self) -> Iterator[np.ndarray]:
        yield self.core
        yield from self.heads.values()
        if self.branch is not None:
            yield from self.branch.values()

    def write_back(self, net: DeepNet) -> None:
        """live <- avg (the Lookahead variant's reset); a non-finite average fails the step instead."""
        self.step = net.step
        self.checked(f"step {net.step} failed, nothing written back ({net.file_holds()})")
        for avg, live in self._pairs(net):
            _copy_blocks(live, avg)

    def swapped_in(self, net: DeepNet) -> AbstractContextManager[DeepNet]:
        """Inside the block, ``net`` computes with the averaged weights (for evaluation only)."""
        return net.using_weights(core=self.core, heads=self.heads, branch=self.branch)

    def close(self) -> None:
        """Stop the blend's threads."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # -- the model file ----------------------------------------------------------------------------

    def write_copy(self, h5: h5py.File, *, chunks: tuple[int, int] | None = None) -> None:
        """Write the average into an HDF5 file being written whole (the in-memory checkpoint)."""
        self.checked("not saving the model with its weight average")
        if chunks is None:
            src = h5.get(CORE_WEIGHTS)
            chunks = src.chunks if src is not None else None
        for name in (EMA_CORE, *EMA_HEAD_PATHS.values()):
            if name in h5:
                del h5[name]
        ds = h5.create_dataset(EMA_CORE, shape=self.core.shape, dtype="<f4", chunks=chunks, fillvalue=0.0)
        rows = max(1, (4 << 20) // (4 * self.core.shape[1]))
        if chunks:
            rows = max(chunks[0], rows // chunks[0] * chunks[0])
        for start in range(0, self.core.shape[0], rows):
            stop = min(self.core.shape[0], start + rows)
            ds.write_direct(self.core, source_sel=np.s_[start:stop], dest_sel=np.s_[start:stop])
        for key, name in EMA_HEAD_PATHS.items():
            h5.create_dataset(name, data=self.heads[key])
        if self.branch is not None:
            write_datasets(h5, EMA_BRANCH_GROUP, self.branch)
        h5.attrs[EMA_DECAY_ATTR] = np.float64(self.decay)
        h5.attrs[EMA_EVERY_ATTR] = np.int64(self.every or 0)
        h5.attrs[EMA_STEP_ATTR] = np.int64(self.step)


def stored_info(model_file: ModelFile) -> dict | None:
    """decay, every, step of the average stored in a model file (None if it has none)."""
    h5 = model_file.h5
    if EMA_CORE not in h5 or EMA_STEP_ATTR not in h5.attrs:
        return None
    every = int(h5.attrs.get(EMA_EVERY_ATTR, 0))
    return {"decay": float(h5.attrs.get(EMA_DECAY_ATTR, float("nan"))), "every": every or None,
            "step": int(h5.attrs[EMA_STEP_ATTR])}


def read_arrays(model_file: ModelFile, *, branch: bool
                ) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """The stored average: (core, heads, branch params or None), shapes checked against the model."""
    h5 = model_file.h5
    path = model_file.path
    ds = h5.get(EMA_CORE)
    shape = (model_file.layers, model_file.row_size)
    if ds is None or ds.shape != shape or ds.dtype != np.float32:
        raise ModelFileError(f"{path}: /{EMA_CORE} should be float32 {shape}"
                             + ("" if ds is None else f", is {ds.dtype} {ds.shape}"))
    core = np.empty(shape, np.float32)
    rows = max(1, (4 << 20) // (4 * shape[1]))
    for start in range(0, shape[0], rows):
        stop = min(shape[0], start + rows)
        ds.read_direct(core, source_sel=np.s_[start:stop], dest_sel=np.s_[start:stop])
    live_heads = model_file.read_heads()
    heads = {}
    for key, name in EMA_HEAD_PATHS.items():
        hd = h5.get(name)
        if hd is None or hd.shape != live_heads[key].shape:
            raise ModelFileError(f"{path}: /{name} is missing or has the wrong shape")
        heads[key] = np.ascontiguousarray(hd[()], dtype=np.float32)
    params = None
    if branch:
        stored = MLPBranch.read(h5, path, input_dim=model_file.input_dim, n_classes=model_file.n_classes,
                                group=EMA_BRANCH_GROUP)
        params = stored.params()
    return core, heads, params


def use_average(net: DeepNet) -> dict:
    """Make an open DeepNet (opened for evaluation) compute with the average stored in its file from now
    on: the averaged core is read into RAM. Returns the stored decay/every/step."""
    info = stored_info(net.file)
    if info is None:
        raise ConfigError(f"{net.file.path} holds no weight average (train it with --ema DECAY --in-memory)")
    require(net.file.layers * net.file.row_size * 4, "--use-ema (the averaged core in RAM)")
    core, heads, branch = read_arrays(net.file, branch=net.branch is not None)
    net.replace_weights(core=core, heads=heads, branch=branch)
    return info


def summary(model_file: ModelFile) -> dict:
    """What `deepnet info` shows about the stored average."""
    info = stored_info(model_file)
    if info is None:
        return {"ema": "none"}
    variant = f", written back every {info['every']} steps" if info["every"] else ""
    return {"ema": f"decay {info['decay']:g}{variant}, taken at step {info['step']}"}


def _copy_blocks(dst: np.ndarray, src: np.ndarray) -> None:
    d, s = dst.reshape(-1), src.reshape(-1)
    step = 16 * BLOCK_FLOATS
    for a in range(0, d.size, step):
        np.copyto(d[a:a + step], s[a:a + step])
