"""Throughput of the compiled layer kernels: forward, backward, and a full core step (forward + backward).

The kernels are called directly (``LayerKernels.forward`` / ``.backward`` on one chunk of random weights) and
through ``CoreEngine`` (the engine DeepNet runs: chunks of 100,000 layers, checkpoints, forward split over
threads where the batch allows). The build is the one the package picks (``$DEEPNET_KERNELS``, default
auto = the fastest build the CPU runs: AVX-512, AVX2+FMA or portable); ``extra_info["build"]`` says which ran.

Workloads: widths 2, 4, 5, 8, 16, 32 (specialised kernels) and 12, 24 (the generic-width path; 24 in register
blocks with column sums of the gradients, as 16 and 32), softsign / tanh / relu,
batch 16 (and batch 1 at width 32, the per-sample path). Depths are modest (about 10-60 ms per call) so the
whole file runs in well under a minute timed and in seconds with --benchmark-disable. Every benchmark records
``layer_samples_per_s`` = layers * batch / median round time.

- forward: one chunk forward, saving checkpoints as in training (``setup`` restores h).
- backward: the chunk's backward (recompute + exact gradient + update) with lr = 0 so the weights never
  drift; the checkpoints come from one forward pass in the test's setup; ``setup`` restores g.
- step: ``CoreEngine.forward`` then ``.backward`` (lr = 0) over the whole depth.
- backward blocks: the backward in 8-sample and in 16-sample blocks (16-lane vectors), one thread and two.
- backward two-pass: the segments split of widths 8-32 back-propagating in one pass or two.
"""

from __future__ import annotations

import numpy as np
import pytest

from benchlib import Workload, load_kernels, record, run_pedantic

ACTIVATIONS = ["softsign", "tanh", "relu"]

# (width, batch, layers): depth chosen per width so one call takes roughly 10-60 ms.
SHAPES = [
    (2, 16, 200_000),
    (4, 16, 200_000),   # the reference shape (width 4, batch 16)
    (5, 16, 50_000),    # a narrow odd width (specialised since 2026-12-04; the generic loops before)
    (12, 16, 20_000),   # no specialised kernel: the generic-width loops
    (8, 16, 50_000),
    (16, 16, 20_000),
    (24, 16, 8_000),    # generic, a multiple of 8: register blocks and column sums
    (32, 16, 5_000),
    (32, 1, 10_000),    # batch 1: the per-sample path (the width-32 target)
]
SHAPE_IDS = [f"w{w}-B{b}-L{layers // 1000}k" for w, b, layers in SHAPES]


def _workload(activation: str, width: int, batch: int, layers: int) -> Workload:
    return Workload(load_kernels(activation), layers=layers, width=width, batch=batch)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("width,batch,layers", SHAPES, ids=SHAPE_IDS)
def test_forward(benchmark, activation, width, batch, layers):
    w = _workload(activation, width, batch, layers)
    benchmark.group = f"forward w{width} B{batch}"
    run_pedantic(benchmark, w.forward, setup=w.forward_setup)
    assert np.isfinite(w.h).all()
    record(benchmark, layer_samples=w.layer_samples, kind="forward", **w.describe())


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("width,batch,layers", SHAPES, ids=SHAPE_IDS)
def test_backward(benchmark, activation, width, batch, layers):
    w = _workload(activation, width, batch, layers)
    w.make_saves()
    before = w.params[-1].copy()
    benchmark.group = f"backward w{width} B{batch}"
    run_pedantic(benchmark, w.backward, setup=w.backward_setup)
    assert np.isfinite(w.g).all()
    assert np.array_equal(w.params[-1], before)  # lr = 0: the shared weights did not move
    record(benchmark, layer_samples=w.layer_samples, kind="backward (recompute + grad, lr=0)", **w.describe())


@pytest.mark.parametrize("threads,split", [(1, "blocks"), (2, "blocks"), (2, "segments")])
@pytest.mark.parametrize("block", [8, 16])
@pytest.mark.parametrize("batch", [16, 32])
def test_backward_blocks(benchmark, block, threads, split, batch):
    """The backward's two batch layouts at width 4 (softsign, 100k layers): blocks of 8 samples (one
    8-lane vector per unit) against 16 (one 16-lane vector: one register on AVX-512, two elsewhere),
    on one thread, or two sharing the blocks or taking segments in turn (a batch of one block is
    always split by segments), the same results bit for bit; ``block16_native`` says which kind of
    machine ran it. Same run, same chunk, so the rows compare."""
    w = _workload("softsign", 4, batch, 100_000)
    if block not in w.kernels.backward_blocks(4):
        pytest.skip("this build has no 16-lane layout")
    w.make_saves()
    benchmark.group = f"backward blocks w4 B{batch} softsign"

    def backward():
        w.kernels.backward(w.params, w.saves, w.save_every, w.g, w.alpha, 0.0, w.work, threads, block, split)

    run_pedantic(benchmark, backward, setup=w.backward_setup)
    assert np.isfinite(w.g).all()
    record(benchmark, layer_samples=w.layer_samples, kind="backward (recompute + grad, lr=0)", block=block,
           threads=threads, split=split, block16_native=w.kernels.block16_native, **w.describe())


@pytest.mark.parametrize("two_pass", [False, True], ids=["one-pass", "two-pass"])
@pytest.mark.parametrize("width,block,layers", [(4, 16, 200_000), (8, 16, 50_000), (8, 8, 50_000), (16, 8, 20_000),
                                                (24, 8, 8_000), (32, 8, 5_000)],
                         ids=["w4-b16", "w8-b16", "w8-b8", "w16-b8", "w24-b8", "w32-b8"])
def test_backward_two_pass(benchmark, width, block, layers, two_pass):
    """The segments split of widths 4-32 (softsign, batch 16, two threads; 24 in the any-width loops)
    back-propagating in one pass or in two (g carried down and handed on first, then the weight
    gradients; at width 4 in one 16-sample block with two segments recomputed in one loop before), the
    same results bit for bit. Same run, same chunk, so the rows compare."""
    w = _workload("softsign", width, 16, layers)
    if block not in w.kernels.backward_blocks(width):
        pytest.skip("this build has no 16-lane layout")
    w.make_saves()
    benchmark.group = f"backward two-pass w{width} B16 block {block}"
    module = w.kernels.calls   # the build module whose driver runs the backward

    def backward():
        w.kernels.backward(w.params, w.saves, w.save_every, w.g, w.alpha, 0.0, w.work, 2, block, "segments")

    previous = module.set_two_pass_backward(two_pass)
    try:
        run_pedantic(benchmark, backward, setup=w.backward_setup)
    finally:
        module.set_two_pass_backward(previous)
    assert np.isfinite(w.g).all()
    record(benchmark, layer_samples=w.layer_samples, kind="backward (recompute + grad, lr=0)", block=block,
           threads=2, split="segments", two_pass=two_pass, **w.describe())


def _step(w: Workload, engine):
    def setup():
        np.copyto(w.h, w.h0)
        np.copyto(w.g, w.g0)

    def step():
        engine.forward(w.h)
        engine.backward(w.g, 0.0, step=1)

    return setup, step


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("width,batch,layers", SHAPES, ids=SHAPE_IDS)
def test_step(benchmark, activation, width, batch, layers):
    w = _workload(activation, width, batch, layers)
    engine = w.engine()
    try:
        setup, step = _step(w, engine)
        benchmark.group = f"step w{width} B{batch}"
        run_pedantic(benchmark, step, setup=setup)
        assert np.isfinite(w.g).all()
        record(benchmark, layer_samples=w.layer_samples, kind="core step (CoreEngine forward+backward, lr=0)",
               threads=engine.threads, chunk_layers=engine.chunk_layers, **w.describe())
    finally:
        engine.close()


@pytest.mark.parametrize("layers", [20_000, 200_000, 1_000_000], ids=lambda n: f"L{n // 1000}k")
def test_step_depth(benchmark, layers):
    """Reference shape (width 4, softsign, batch 16) at three depths: the per-layer rate should not depend
    on depth (1M layers = 80 MB of weights, more than L3; 10 chunks of 100k layers)."""
    w = _workload("softsign", 4, 16, layers)
    engine = w.engine()
    try:
        setup, step = _step(w, engine)
        benchmark.group = "step depth sweep w4 B16 softsign"
        run_pedantic(benchmark, step, setup=setup)
        assert np.isfinite(w.g).all()
        median = record(benchmark, layer_samples=w.layer_samples, kind="core step depth sweep",
                        threads=engine.threads, chunk_layers=engine.chunk_layers, **w.describe())
        if median is not None:
            benchmark.extra_info["extrapolated_s_per_step_at_10M"] = median * 10_000_000 / layers
    finally:
        engine.close()
