"""The second core changes nothing: threaded forward and backward are bit-identical to one thread.

Sizes are chosen above the kernels' threshold for starting a thread (``THREAD_MIN_WORK`` multiply-adds
per call), so the threaded code paths really run: two halves of the batch's blocks (batch >= 16, and
per sample below 8), the recomputation pipeline (one block: batch 8, or 1), the generic width, and
both builds.
"""

import threading
import time

import numpy as np
import pytest

from deepnet.core import CoreEngine, InMemoryStore
from helpers import kernel_builds
from deepnet.kernels import LayerKernels, builtin_module


def layers_to_thread(module, width: int, batch: int, at_least: int) -> int:
    """Layers for one call to be well above the threshold at which a backward call starts a thread."""
    return max(at_least, int(1.5 * module.THREAD_MIN_WORK) // ((width * width + width) * batch) + 1)


@pytest.mark.parametrize("module", kernel_builds(), ids=lambda m: m.__name__)
@pytest.mark.parametrize("width,batch", [(4, 16), (4, 24), (4, 40), (4, 8), (2, 3), (5, 16), (32, 1), (32, 4)])
def test_threaded_backward_matches_one_thread(module, width, batch):
    rng = np.random.default_rng(width * 100 + batch)
    layers, save_every = layers_to_thread(module, width, batch, 600), 64
    kernels = LayerKernels("softsign", module, module.activation_index("softsign"))
    params = (rng.uniform(-0.5, 0.5, (layers, width * width + width)) / np.sqrt(width)).astype(np.float32)
    h = rng.standard_normal((width, batch)).astype(np.float32)
    saves = np.zeros((-(-layers // save_every), width * batch), np.float32)
    kernels.forward(params, h, 0.05, saves, save_every)
    g0 = rng.standard_normal((width, batch)).astype(np.float32)
    results = []
    for threads in (1, 2):
        p, g = params.copy(), g0.copy()
        kernels.backward(p, saves, save_every, g, 0.05, 0.01, None, threads)
        results.append((p, g))
    assert np.array_equal(results[0][0], results[1][0])
    assert np.array_equal(results[0][1], results[1][1])
    assert not np.array_equal(results[0][0], params)  # the update really happened


@pytest.mark.parametrize("batch", [64, 37, 16, 5])
def test_threaded_engine_matches_one_thread(batch):
    rng = np.random.default_rng(batch)
    width = 4
    module = builtin_module()
    chunk = layers_to_thread(module, width, batch, 700)
    layers = 3 * chunk + 123  # three full chunks and a short one
    kernels = LayerKernels("tanh", module, module.activation_index("tanh"))
    weights = (rng.uniform(-0.5, 0.5, (layers, width * width + width)) / 2).astype(np.float32)
    h0 = rng.standard_normal((width, batch)).astype(np.float32)
    g0 = rng.standard_normal((width, batch)).astype(np.float32)
    out = []
    for threads in (1, 2):
        engine = CoreEngine(InMemoryStore(weights.copy()), kernels, width, 0.02, chunk_layers=chunk, threads=threads)
        h = engine.forward(h0.copy())
        g = engine.backward(g0.copy(), 0.01, step=1)
        evaluated = engine.forward(h0.copy(), for_backward=False)
        out.append((h.copy(), g.copy(), engine.store.weights.copy(), evaluated.copy()))
        engine.close()
    for a, b in zip(*out):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("module", kernel_builds(), ids=lambda m: m.__name__)
@pytest.mark.parametrize("width,batch", [(4, 16), (2, 16), (4, 24), (4, 48), (3, 16), (8, 16), (32, 16)])
def test_forward_split_in_parts_matches_one_call(module, width, batch):
    """A batch split into parts (blocks of 8 when there are fewer full blocks than parts, as for batch
    16 on two threads) saves the same states and ends in the same h as one call, bit for bit."""
    rng = np.random.default_rng(width * 1000 + batch)
    layers, save_every = 900, 64
    kernels = LayerKernels("softsign", module, module.activation_index("softsign"))
    params = (rng.uniform(-0.5, 0.5, (layers, width * width + width)) / np.sqrt(width)).astype(np.float32)
    h0 = rng.standard_normal((width, batch)).astype(np.float32)
    results = []
    for n_parts in (1, 2, 3):
        h = h0.copy()
        saves = np.zeros((-(-layers // save_every), width * batch), np.float32)
        for part in range(n_parts):
            kernels.forward(params, h, 0.05, saves, save_every, None, part, n_parts)
        results.append((h, saves))
    for h, saves in results[1:]:
        assert np.array_equal(h, results[0][0])
        assert np.array_equal(saves, results[0][1])
    assert not np.array_equal(results[0][0], h0)


def test_thread_choice_tries_both_then_keeps_the_faster():
    from deepnet.core import ThreadChoice

    choice = ThreadChoice(2)
    seconds = {1: 0.5, 2: 0.3}
    picks = []
    for _ in range(40):
        threads = choice.pick()
        picks.append(threads)
        choice.record(threads, seconds[threads])
    assert picks[:2] == [2, 1]                        # each tried once, the most threads first
    assert picks.count(1) == 1 + 2                    # then 1 only as the re-check every 16 passes
    assert [i for i, t in enumerate(picks) if t == 1] == [1, 15, 31]
    seconds[1] = 0.1                                  # the machine changed: re-checks notice (averaged)
    for _ in range(30):
        threads = choice.pick()
        choice.record(threads, seconds[threads])
    assert choice.pick() == 1
    assert ThreadChoice(1).pick() == 1 and ThreadChoice(0).pick() == 1


def test_free_running_forward_stops_on_interrupt():
    """An interrupt while the threads run their shares through all chunks: the pass stops, no thread
    is left running, and the engine works on (same result as an uninterrupted engine)."""
    rng = np.random.default_rng(7)
    width, batch, layers = 4, 16, 4000
    module = builtin_module()
    kernels = LayerKernels("softsign", module, module.activation_index("softsign"))
    weights = (rng.uniform(-0.5, 0.5, (layers, width * width + width)) / 2).astype(np.float32)
    h0 = rng.standard_normal((width, batch)).astype(np.float32)
    engine = CoreEngine(InMemoryStore(weights.copy()), kernels, width, 0.02, chunk_layers=500, threads=2)
    running, started, lock = [0], [0], threading.Lock()

    class Counting:  # the kernels, counting the calls in progress
        def __getattr__(self, name):
            return getattr(kernels, name)

        def forward(self, *args):
            with lock:
                running[0] += 1
                started[0] += 1
            try:
                kernels.forward(*args)
                time.sleep(0.02)  # a slow chunk, so the interrupt comes mid-pass
            finally:
                with lock:
                    running[0] -= 1

    engine.kernels = Counting()
    calls = []

    def interrupt():
        calls.append(1)
        raise KeyboardInterrupt

    engine.interrupt_check = interrupt
    with pytest.raises(KeyboardInterrupt):
        engine.forward(h0.copy(), for_backward=False)
    assert calls
    assert running[0] == 0   # no thread still runs a chunk once forward has raised
    assert started[0] < 2 * 8  # and the threads stopped before the end of the pass (8 chunks each)
    engine.interrupt_check = None
    engine.kernels = kernels
    h = engine.forward(h0.copy(), for_backward=False)
    reference = CoreEngine(InMemoryStore(weights.copy()), kernels, width, 0.02, chunk_layers=500, threads=1)
    assert np.array_equal(h, reference.forward(h0.copy(), for_backward=False))
    engine.close()
    reference.close()
