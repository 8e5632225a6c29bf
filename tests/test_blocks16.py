"""The backward pass's 16-sample layout (one 16-lane vector per unit, AVX-512's registers) changes
nothing: its weights and gradients equal the 8-sample layout's bit for bit, on one thread or two, fused
or not, in every build this CPU runs (where a 16-lane vector is two registers it is slow, but it runs,
so its arithmetic is checked here on any machine). That equality is what lets the engine pick either
layout by measurement; it is also checked against the float64 reference on its own.
"""

from __future__ import annotations

import numpy as np
import pytest

from deepnet.kernels.loader import LayerKernels, builtin_module
from deepnet.nn.engine import CoreEngine
from deepnet.nn.stores import InMemoryStore
from deepnet.nn.threads import MeasuredChoice
from helpers import kernel_builds
from reference import assert_close, assert_update_close, kernel_backward

BUILTINS = list(builtin_module().ACTIVATION_NAMES)
LAYOUT_WIDTHS = (2, 4, 8)   # the widths compiled in 16-lane vectors (narrow, even)


def _case(module, activation: str, width: int, batch: int, seed: int = 0):
    """A chunk long enough for the backward to start its second thread, with a short last segment."""
    rng = np.random.default_rng([seed, width, batch, len(activation)])
    save_every = 40
    work = 1.5 * module.THREAD_MIN_WORK / ((width * width + width) * batch)
    layers = int(work) // save_every * save_every + 27
    params = (rng.uniform(-0.5, 0.5, (layers, width * width + width)) / np.sqrt(width)).astype(np.float32)
    h = rng.standard_normal((width, batch)).astype(np.float32)
    saves = np.zeros((-(-layers // save_every), width * batch), np.float32)
    alpha = 2.0 / layers
    kernels = LayerKernels(activation, module, module.activation_index(activation))
    kernels.forward(params, h, alpha, saves, save_every)
    g = rng.standard_normal((width, batch)).astype(np.float32)
    return kernels, params, saves, save_every, g, alpha


def _backward(kernels, params, saves, save_every, g0, alpha, threads, block, split="blocks"):
    p, g = params.copy(), g0.copy()
    kernels.backward(p, saves, save_every, g, alpha, 0.01, None, threads, block, split)
    return p, g


def _needs_layout(kernels: LayerKernels, width: int) -> None:
    if 16 not in kernels.backward_blocks(width):
        pytest.skip("this build was compiled without the 16-lane layout (needs GCC 12 or Clang)")


@pytest.mark.parametrize("module", kernel_builds(), ids=lambda m: m.__name__)
@pytest.mark.parametrize("activation", BUILTINS)
def test_16_sample_blocks_equal_8_sample_blocks_for_every_activation(module, activation):
    kernels, params, saves, save_every, g0, alpha = _case(module, activation, 4, 16)
    _needs_layout(kernels, 4)
    p8, g8 = _backward(kernels, params, saves, save_every, g0, alpha, 1, 8)
    assert not np.array_equal(p8, params)   # the update really happened
    assert np.all(np.isfinite(p8)) and np.all(np.isfinite(g8))
    for threads, split in [(1, "blocks"), (2, "blocks"), (2, "segments")]:
        p, g = _backward(kernels, params, saves, save_every, g0, alpha, threads, 16, split)
        assert np.array_equal(p, p8), (threads, split)
        assert np.array_equal(g, g8), (threads, split)


@pytest.mark.parametrize("module", kernel_builds(), ids=lambda m: m.__name__)
@pytest.mark.parametrize("width", LAYOUT_WIDTHS)
@pytest.mark.parametrize("batch", [8, 9, 16, 20, 24, 32, 40])
def test_16_sample_blocks_equal_8_sample_blocks_at_every_batch(module, width, batch):
    """Batches that fill a 16-sample block, leave its high half empty (8, 24, 40: the 8-sample layout
    has no such block) or part-filled (9, 20), on one thread or two (sharing the blocks, or taking
    segments in turn: always so for one block), the fused loop on and off."""
    kernels, params, saves, save_every, g0, alpha = _case(module, "softsign", width, batch)
    _needs_layout(kernels, width)
    results = {}
    try:
        for fused in (False, True):
            module.set_fused_backward(fused)
            for threads, split in [(1, "blocks"), (2, "blocks"), (2, "segments")]:
                for block in (8, 16):
                    results[fused, threads, split, block] = _backward(kernels, params, saves, save_every, g0,
                                                                      alpha, threads, block, split)
    finally:
        module.set_fused_backward(True)
    p_ref, g_ref = results[False, 1, "blocks", 8]
    assert not np.array_equal(p_ref, params)
    for key, (p, g) in results.items():
        assert np.array_equal(p, p_ref), key
        assert np.array_equal(g, g_ref), key


@pytest.mark.parametrize("module", kernel_builds(), ids=lambda m: m.__name__)
@pytest.mark.parametrize("activation", ["softsign", "tanh", "relu"])
@pytest.mark.parametrize("width,batch", [(4, 16), (2, 20), (8, 32)])
def test_16_sample_blocks_match_the_float64_reference(module, activation, width, batch):
    rng = np.random.default_rng([width, batch])
    layers, alpha, lr, save_every = 12, 0.3, 0.1, 5
    params = rng.uniform(-0.5, 0.5, (layers, width * width + width)).astype(np.float32)
    h = rng.uniform(-1, 1, (width, batch)).astype(np.float32)
    g = rng.uniform(-1, 1, (width, batch)).astype(np.float32)
    kernels = LayerKernels(activation, module, module.activation_index(activation))
    _needs_layout(kernels, width)
    saves = np.zeros((-(-layers // save_every), width * batch), np.float32)
    h_out = h.copy()
    kernels.forward(params, h_out, alpha, saves, save_every)
    p, g_in = params.copy(), g.copy()
    kernels.backward(p, saves, save_every, g_in, alpha, lr, None, 1, 16)
    ref_g, ref_params = kernel_backward(params, h, g, alpha, activation, lr)
    assert_close(g_in, ref_g, what="backward g")
    assert_close(p, ref_params, what="updated params")
    assert_update_close(p, params, ref_params, what="params update")


@pytest.mark.parametrize("width", [1, 3, 5, 16, 32])
def test_widths_without_the_layout_run_8_sample_blocks(width):
    """A width not compiled in 16-lane vectors reports (8,) and runs 8-sample blocks when asked for 16."""
    module = builtin_module()
    kernels, params, saves, save_every, g0, alpha = _case(module, "softsign", width, 16)
    assert kernels.backward_blocks(width) == (8,)
    p8, g8 = _backward(kernels, params, saves, save_every, g0, alpha, 1, 8)
    p16, g16 = _backward(kernels, params, saves, save_every, g0, alpha, 1, 16)
    assert np.array_equal(p8, p16) and np.array_equal(g8, g16)


def test_backward_rejects_other_blocks_and_splits():
    module = builtin_module()
    kernels, params, saves, save_every, g0, alpha = _case(module, "softsign", 4, 16)
    with pytest.raises(ValueError, match="block must be 8 or 16, got 12"):
        _backward(kernels, params, saves, save_every, g0, alpha, 1, 12)
    with pytest.raises(ValueError, match="split must be one of blocks, segments, got 'layers'"):
        _backward(kernels, params, saves, save_every, g0, alpha, 2, 8, "layers")
    with pytest.raises(ValueError, match="width must be >= 1"):
        kernels.backward_blocks(0)


@pytest.mark.parametrize("batch,block,count", [(1, 8, 1), (5, 8, 5), (5, 16, 5), (8, 8, 1), (9, 8, 2),
                                               (16, 8, 2), (16, 16, 1), (17, 16, 2), (40, 16, 3)])
def test_backward_block_count(batch, block, count):
    """One block per sample below a batch of 8 (each sample runs alone), else whole and part blocks."""
    kernels = LayerKernels("softsign", builtin_module(), 0)
    assert kernels.backward_block_count(batch, block) == count


def test_backward_block_count_rejects_an_empty_batch():
    with pytest.raises(ValueError, match="batch must be >= 1, got 0"):
        LayerKernels("softsign", builtin_module(), 0).backward_block_count(0, 8)


def test_measured_choice_tries_every_option_then_keeps_the_fastest():
    options = [(2, 8), (1, 16), (2, 16), (1, 8)]
    seconds = {(2, 8): 0.5, (1, 16): 0.3, (2, 16): 0.4, (1, 8): 0.9}
    choice = MeasuredChoice(options)
    picks = []
    for _ in range(121):
        option = choice.pick()
        picks.append(option)
        choice.record(option, seconds[option])
        if len(picks) == 8:
            assert not choice.settled
    assert picks[:9] == [(2, 8)] + options + options   # a first pass not counted, then each twice
    assert choice.settled
    rechecks = [(i, o) for i, o in enumerate(picks[9:], 9) if o != (1, 16)]
    # the others again in turn, the longest unrun first, each confirming re-check doubling the wait
    assert [o for _, o in rechecks] == [(2, 8), (2, 16), (1, 8)]
    assert [i for i, _ in rechecks] == [24, 56, 120]
    seconds[(2, 16)] = 0.1   # the machine changed: a later re-check notices
    for _ in range(600):
        option = choice.pick()
        choice.record(option, seconds[option])
    assert choice.pick() == (2, 16)
    with pytest.raises(ValueError):
        MeasuredChoice([])
    single = MeasuredChoice([(1, 8), (1, 8)])
    assert single.settled and single.pick() == (1, 8)


def _engine(weights, kernels, threads):
    return CoreEngine(InMemoryStore(weights.copy()), kernels, 4, 0.02, chunk_layers=weights.shape[0],
                      threads=threads)


@pytest.mark.parametrize("batch", [16, 32])
def test_engine_measures_16_sample_blocks_where_they_are_native(monkeypatch, batch):
    """Where 16-lane vectors are one register (AVX-512: forced here), the backward's choice tries
    16-sample blocks on one thread and on two taking segments in turn, and two sharing the blocks (of
    8 samples where a batch is one 16-sample block), and training comes out bit for bit as with
    8-sample blocks on one thread."""
    module = builtin_module()
    kernels = LayerKernels("softsign", module, module.activation_index("softsign"))
    if 16 not in kernels.backward_blocks(4):
        pytest.skip("this build was compiled without the 16-lane layout")
    rng = np.random.default_rng(batch)
    layers = int(1.5 * module.THREAD_MIN_WORK) // (20 * batch) + 301
    weights = rng.uniform(-0.3, 0.3, (layers, 20)).astype(np.float32)
    x = [rng.standard_normal((4, batch)).astype(np.float32) for _ in range(12)]
    plain = _engine(weights, kernels, 1)
    for h in x:
        plain.forward(h.copy())
        plain.backward(h.copy(), 0.01, step=1)
    monkeypatch.setattr(LayerKernels, "block16_native", property(lambda self: True))
    measured = _engine(weights, kernels, 2)
    used = set()
    for h in x:
        measured.forward(h.copy())
        measured.backward(h.copy(), 0.01, step=1)
        used.add((measured.threads_used["backward"], measured.backward_block_used, measured.backward_split_used))
    shared = (2, 16, "blocks") if batch >= 32 else (2, 8, "blocks")
    assert used == {(2, 16, "segments"), shared, (1, 16, "blocks")}   # every option tried
    assert measured.thread_choices_settled
    assert np.array_equal(measured.store.weights, plain.store.weights)
    for engine in (plain, measured):
        engine.close()


def test_fixed_threads_take_16_sample_blocks_split_by_segments_where_native(monkeypatch):
    module = builtin_module()
    kernels = LayerKernels("softsign", module, module.activation_index("softsign"))
    if 16 not in kernels.backward_blocks(4):
        pytest.skip("this build was compiled without the 16-lane layout")
    monkeypatch.setattr(LayerKernels, "block16_native", property(lambda self: True))
    _assert_fixed_choices(kernels, [(1, 16, (1, 16)), (2, 16, (2, 16, "segments")), (2, 32, (2, 16, "segments")),
                                    (1, 8, (1, 8))])
    monkeypatch.undo()
    # neither native nor halves (the portable build): never 16
    plain = next(m for m in kernel_builds() if not m.BLOCK16_NATIVE and not m.BLOCK16_HALVES_WIDTH)
    _assert_fixed_choices(LayerKernels("softsign", plain, plain.activation_index("softsign")),
                          [(1, 16, (1, 8)), (2, 16, (2, 8, "blocks"))])


def _assert_fixed_choices(kernels: LayerKernels, cases) -> None:
    """Each (fixed threads, batch, expected (threads, block[, split])) at width 4."""
    weights = np.zeros((50, 20), np.float32)
    for fixed, batch, expected in cases:
        engine = _engine(weights, kernels, 2)
        engine.fixed_threads = fixed
        engine.forward(np.zeros((4, batch), np.float32))
        engine.backward(np.zeros((4, batch), np.float32), 0.0, step=1)
        used = (engine.threads_used["backward"], engine.backward_block_used, engine.backward_split_used)
        assert used[:len(expected)] == expected, (fixed, batch)
        engine.close()


def _builds_with_halves() -> list:
    """The builds this CPU runs whose 16-sample blocks at width 4 are two 8-lane halves (AVX2)."""
    return [m for m in kernel_builds() if m.BLOCK16_HALVES_WIDTH == 4 and not m.BLOCK16_NATIVE]


def test_halves_are_a_build_fact_of_width_4_only():
    """The AVX2 build (where the CPU has it) runs the paired split's 16-sample pieces on 8-lane halves at
    width 4; the portable build has none, and AVX-512's are native."""
    for module in kernel_builds():
        kernels = LayerKernels("softsign", module, module.activation_index("softsign"))
        avx2 = module.BUILT_FOR == "avx2+fma"
        assert module.BLOCK16_HALVES_WIDTH == (4 if avx2 else 0), module.__name__
        assert [w for w in (2, 3, 4, 8, 16) if kernels.block16_halves(w)] == ([4] if avx2 else [])


@pytest.mark.parametrize("batch", [9, 16, 24, 32])
def test_engine_measures_the_halves_where_the_build_has_them(batch):
    """Where the segments split's 16-sample blocks run on halves (AVX2, width 4), the backward's choice
    tries them split by segments beside 8-sample blocks shared by two threads and one thread's blocks
    (of 16 for a one-block batch, else 8), and training comes out bit for bit as on one thread; a batch
    of three 16-sample blocks is not offered them."""
    modules = _builds_with_halves()
    if not modules:
        pytest.skip("no build with 16-sample halves runs on this CPU (needs AVX2 without AVX-512's own)")
    module = modules[0]
    kernels = LayerKernels("softsign", module, module.activation_index("softsign"))
    rng = np.random.default_rng(batch)
    layers = int(1.5 * module.THREAD_MIN_WORK) // (20 * batch) + 301
    weights = rng.uniform(-0.3, 0.3, (layers, 20)).astype(np.float32)
    x = [rng.standard_normal((4, batch)).astype(np.float32) for _ in range(12)]
    plain = _engine(weights, kernels, 1)
    measured = _engine(weights, kernels, 2)
    used = set()
    for h in x:
        plain.forward(h.copy())
        plain.backward(h.copy(), 0.01, step=1)
        measured.forward(h.copy())
        measured.backward(h.copy(), 0.01, step=1)
        used.add((measured.threads_used["backward"], measured.backward_block_used, measured.backward_split_used))
    alone = 16 if batch <= 16 else 8
    assert used == {(2, 16, "segments"), (2, 8, "blocks"), (1, alone, "blocks")}
    assert np.array_equal(measured.store.weights, plain.store.weights)
    wide = _engine(weights, kernels, 2)
    for h in [rng.standard_normal((4, 40)).astype(np.float32) for _ in range(8)]:
        wide.forward(h.copy())
        wide.backward(h.copy(), 0.01, step=1)
        assert wide.backward_block_used == 8
    for engine in (plain, measured, wide):
        engine.close()


def test_fixed_threads_take_the_halves():
    modules = _builds_with_halves()
    if not modules:
        pytest.skip("no build with 16-sample halves runs on this CPU (needs AVX2 without AVX-512's own)")
    module = modules[0]
    _assert_fixed_choices(LayerKernels("softsign", module, module.activation_index("softsign")),
                          [(2, 16, (2, 16, "segments")), (1, 16, (1, 16)), (2, 12, (2, 16, "segments")),
                           (2, 32, (2, 16, "segments")), (1, 32, (1, 8)), (2, 40, (2, 8, "blocks")), (2, 8, (2, 8))])
