"""The second core changes nothing: threaded forward and backward are bit-identical to one thread.

Sizes are chosen above the kernels' threshold for starting a thread (``THREAD_MIN_WORK`` multiply-adds
per call), so the threaded code paths really run: two halves of the batch's blocks (batch >= 16, and
per sample below 8), segments in turn (asked for, or a batch of one block: 8, or 1), the generic
width, and both builds.
"""

import statistics

import numpy as np
import pytest

from deepnet.nn.engine import CoreEngine
from deepnet.nn.stores import InMemoryStore
from helpers import kernel_builds
from deepnet.kernels.loader import LayerKernels, builtin_module


def layers_to_thread(module, width: int, batch: int, at_least: int) -> int:
    """Layers for one call to be well above the threshold at which a backward call starts a thread."""
    return max(at_least, int(1.5 * module.THREAD_MIN_WORK) // ((width * width + width) * batch) + 1)


def assert_threaded_backward_matches_one_thread(module, width: int, batch: int) -> None:
    rng = np.random.default_rng(width * 100 + batch)
    layers, save_every = layers_to_thread(module, width, batch, 600), 64
    kernels = LayerKernels("softsign", module, module.activation_index("softsign"))
    params = (rng.uniform(-0.5, 0.5, (layers, width * width + width)) / np.sqrt(width)).astype(np.float32)
    h = rng.standard_normal((width, batch)).astype(np.float32)
    saves = np.zeros((-(-layers // save_every), width * batch), np.float32)
    kernels.forward(params, h, 0.05, saves, save_every)
    g0 = rng.standard_normal((width, batch)).astype(np.float32)
    results = []
    for threads, split in [(1, "blocks"), (2, "blocks"), (2, "segments")]:
        p, g = params.copy(), g0.copy()
        kernels.backward(p, saves, save_every, g, 0.05, 0.01, None, threads, 8, split)
        results.append((p, g))
    for p, g in results[1:]:
        assert np.array_equal(results[0][0], p)
        assert np.array_equal(results[0][1], g)
    assert not np.array_equal(results[0][0], params)  # the update really happened


@pytest.mark.parametrize("module", kernel_builds(), ids=lambda m: m.__name__)
@pytest.mark.parametrize("width,batch", [(4, 16), (4, 24), (4, 40), (4, 8), (2, 3), (5, 16), (9, 16), (32, 1), (32, 4)])
def test_threaded_backward_matches_one_thread(module, width, batch):
    assert_threaded_backward_matches_one_thread(module, width, batch)


def recorded_chunk(module, activation: str, width: int, batch: int, save_every: int, at_least: int,
                   seed: list[int]):
    """A chunk big enough to thread, whose last segment is shorter than the rest, forwarded with its
    checkpoints saved: (kernels, params, saves, alpha, g0)."""
    rng = np.random.default_rng(seed)
    layers = layers_to_thread(module, width, batch, at_least) // save_every * save_every + 29
    kernels = LayerKernels(activation, module, module.activation_index(activation))
    params = (rng.uniform(-0.5, 0.5, (layers, width * width + width)) / np.sqrt(width)).astype(np.float32)
    h = rng.standard_normal((width, batch)).astype(np.float32)
    saves = np.zeros((-(-layers // save_every), width * batch), np.float32)
    alpha = 2.0 / layers  # relu's states grow by up to (1 + alpha |W|) a layer: stay finite at any depth
    kernels.forward(params, h, alpha, saves, save_every)
    assert np.all(np.isfinite(h))
    return kernels, params, saves, alpha, rng.standard_normal((width, batch)).astype(np.float32)


def assert_all_equal(results: dict, reference, params: np.ndarray) -> None:
    """Every (weights, g) in ``results`` equals ``results[reference]`` bit for bit, which did update."""
    p_ref, g_ref = results[reference]
    assert not np.array_equal(p_ref, params)  # the update really happened
    assert np.all(np.isfinite(p_ref)) and np.all(np.isfinite(g_ref))
    for key, (p, g) in results.items():
        assert np.array_equal(p, p_ref), key
        assert np.array_equal(g, g_ref), key


@pytest.mark.parametrize("module", kernel_builds(), ids=lambda m: m.__name__)
@pytest.mark.parametrize("activation", ["softsign", "tanh", "relu"])
@pytest.mark.parametrize("width,batch", [(4, 16), (4, 40), (4, 8), (4, 9), (3, 16), (2, 24), (1, 16), (8, 16)])
def test_fused_backward_equals_recomputing_then_back_propagating(module, activation, width, batch):
    """Narrow widths recompute one block in the loop that back-propagates another (one thread: the next
    block or segment; two: each its own half): the weights and g come out bit for bit as with the
    recomputation and back-propagation one after the other, on one thread or two. A last segment
    shorter than the rest makes the two parts of a fused loop differ in length."""
    save_every = 64
    kernels, params, saves, alpha, g0 = recorded_chunk(module, activation, width, batch, save_every, 600,
                                                       [width, batch, len(activation)])
    results = {}
    try:
        for fused in (False, True):
            module.set_fused_backward(fused)
            for threads, split in [(1, "blocks"), (2, "blocks"), (2, "segments")]:
                p, g = params.copy(), g0.copy()
                kernels.backward(p, saves, save_every, g, alpha, 0.01, None, threads, 8, split)
                results[fused, threads, split] = (p, g)
    finally:
        module.set_fused_backward(True)
    assert_all_equal(results, (False, 1, "blocks"), params)


@pytest.mark.parametrize("module", kernel_builds(), ids=lambda m: m.__name__)
@pytest.mark.parametrize("activation", ["softsign", "relu"])
@pytest.mark.parametrize("width,batch", [(8, 16), (8, 12), (8, 32), (8, 40), (16, 16), (16, 8), (32, 13), (24, 16),
                                         (12, 16), (4, 16), (4, 12), (4, 24), (2, 16), (6, 16)])
def test_two_pass_backward_equals_one_pass(module, activation, width, batch):
    """Under the segments split, layers of widths 8, 16, 24, 32, ... carry g down a segment first and
    make the weight gradients after handing it on, and widths 2 and 4 in one 16-sample block recompute
    two segments in one loop before doing the same: the weights and g come out bit for bit as with one
    pass, in blocks of 8 and of 16, with partial blocks (batch 12, 13), with more blocks than a thread
    holds at once (batch 40: one pass), a last segment shorter than the rest (paired with a full one),
    an odd number of segments, in the any-width loops (24), and at widths and batches that stay in one
    pass (4 in two blocks, 6, 12)."""
    save_every = 48
    kernels, params, saves, alpha, g0 = recorded_chunk(module, activation, width, batch, save_every, 400,
                                                       [width, batch, len(activation), 2])
    runs = [(1, 8, "blocks", True)] + [(2, block, "segments", two_pass) for block in kernels.backward_blocks(width)
                                       for two_pass in (False, True)]
    results = {}
    try:
        for threads, block, split, two_pass in runs:
            module.set_two_pass_backward(two_pass)
            p, g = params.copy(), g0.copy()
            kernels.backward(p, saves, save_every, g, alpha, 0.01, None, threads, block, split)
            results[threads, block, split, two_pass] = (p, g)
    finally:
        module.set_two_pass_backward(True)
    assert_all_equal(results, runs[0], params)


@pytest.mark.parametrize("switch", ["set_fused_backward", "set_two_pass_backward"])
def test_backward_switches_report_their_previous_setting(switch):
    toggle = getattr(kernel_builds()[-1], switch)
    try:
        assert toggle(False) is True   # on by default
        assert toggle(True) is False
    finally:
        toggle(True)


@pytest.mark.parametrize("module", kernel_builds(), ids=lambda m: m.__name__)
def test_threads_that_sleep_instead_of_spinning_give_the_same_result(module):
    """A thread that has to wait spins for up to ~2 ms, so on a quiet machine the sleeping path is
    rare: with no spinning every wait sleeps, and the results still equal one thread's."""
    previous = module.set_spin_seconds(0.0)
    try:
        before = module.sleep_count()
        # two halves of the blocks or segments in turn (one block: always), per-sample widths
        for width, batch in [(4, 16), (4, 40), (4, 8), (32, 1)]:
            assert_threaded_backward_matches_one_thread(module, width, batch)
        # segments in turn: the second thread waits for the first's first segment (it recomputes
        # one while the first thread recomputes and back-propagates one)
        assert module.sleep_count() > before
    finally:
        module.set_spin_seconds(previous)
    assert module.set_spin_seconds(previous) == previous
    with pytest.raises(ValueError, match="spin seconds"):
        module.set_spin_seconds(-1.0)


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
    from deepnet.nn.threads import ThreadChoice

    choice = ThreadChoice(2)
    seconds = {1: 0.5, 2: 0.3}
    picks = []
    for _ in range(100):
        threads = choice.pick()
        picks.append(threads)
        choice.record(threads, seconds[threads])
    assert picks[:5] == [2, 2, 1, 2, 1]   # a first pass not counted (first touches), each option twice
    assert choice.settled
    # then 1 only as a re-check, after 16 passes, then 32 (the first re-check confirmed the choice)
    assert [i for i, t in enumerate(picks) if t == 1] == [2, 4, 20, 52]
    seconds[1] = 0.1                                  # the machine changed: the next re-check notices
    for _ in range(200):
        threads = choice.pick()
        choice.record(threads, seconds[threads])
    assert choice.pick() == 1
    assert ThreadChoice(1).pick() == 1 and ThreadChoice(0).pick() == 1


def test_thread_choice_waits_are_capped():
    from deepnet.nn.threads import ThreadChoice

    choice = ThreadChoice(2)
    picks = []
    for _ in range(3000):
        threads = choice.pick()
        picks.append(threads)
        choice.record(threads, {1: 0.1, 2: 5.0}[threads])   # two threads always much slower
    checks = [i for i, t in enumerate(picks) if t == 2]
    gaps = [b - a for a, b in zip(checks, checks[1:])]
    assert gaps[3:5] == [32, 64] and gaps[-1] == ThreadChoice.MAX_RECHECK_EVERY == max(gaps)


def test_thread_choice_is_not_decided_by_one_slow_pass():
    """A pass slowed by another job (a spike) does not hand the choice to the slower option."""
    from deepnet.nn.threads import ThreadChoice

    choice = ThreadChoice(2)
    times = iter([9.0, 5.0] + [0.3] * 100)   # warm-up, then two threads hit by a spike once
    picks = []
    for _ in range(20):
        threads = choice.pick()
        picks.append(threads)
        choice.record(threads, next(times) if threads == 2 else 0.5)
    assert picks[:5] == [2, 2, 1, 2, 1]
    assert picks[5:] == [2] * 15   # its other trial (0.3 s) outweighs the spike


def test_every_trial_counts_with_three_options():
    """The backward's three options: one unlucky trial of the first does not hand the choice to the last
    (the trials are all fresh when the first choice is made)."""
    from deepnet.nn.threads import MeasuredChoice

    choice = MeasuredChoice(["segments", "blocks", "one"])
    spiked = iter([5.0])
    picks = []
    for _ in range(12):
        option = choice.pick()
        picks.append(option)
        seconds = {"segments": 0.16, "blocks": 0.25, "one": 0.28}[option]
        if option == "segments" and len(picks) == 5:
            seconds = next(spiked)              # its second trial, slowed by another job
        choice.record(option, seconds)
    assert picks[:7] == ["segments", "segments", "blocks", "one", "segments", "blocks", "one"]
    assert picks[7:] == ["segments"] * 5


def test_a_slower_machine_does_not_send_the_choice_back_to_old_times():
    """The backward's choice once ran a 6-7x slower option three passes in a row after the host slowed
    down: that option's times from before still beat the chosen one's times from then. Old times
    count only until fresher ones exist: one pass of the other option, then the fresh times decide."""
    from deepnet.nn.threads import MeasuredChoice

    choice = MeasuredChoice(["segments", "blocks"])
    seconds = {"segments": 0.16, "blocks": 0.18}
    for _ in range(12):
        option = choice.pick()
        choice.record(option, seconds[option])
    assert choice.pick() == "segments"
    seconds = {"segments": 0.21, "blocks": 1.4}     # the host slows both, the blocks split far more
    picks = []
    for _ in range(40):
        option = choice.pick()
        picks.append(option)
        choice.record(option, seconds[option])
    runs = [i for i, option in enumerate(picks) if option == "blocks"]
    assert runs[0] < 5 and all(later - earlier >= 4 for earlier, later in zip(runs, runs[1:]))
    assert len(runs) <= 3 and picks[-1] == "segments"    # the rest are the re-checks due anyway


def test_thread_choice_is_settled_after_its_trials():
    from deepnet.nn.threads import ThreadChoice

    choice = ThreadChoice(2)
    settled = []
    for _ in range(8):
        threads = choice.pick()
        choice.record(threads, {1: 0.5, 2: 0.3}[threads])
        settled.append(choice.settled)
    assert settled == [False, False, False, False, True, True, True, True]   # warm-up + 2 trials of each
    assert ThreadChoice(1).settled


# deepnet bench's warm-up on two threads (reference shape, batch 16): the first step, then two trials
# of each backward option: two threads taking segments in turn, two sharing the batch's two 8-sample
# blocks, one thread (in 16-sample blocks where they are native, else 8).
CHOSEN_WARMUP_STEPS = 7


def test_bench_times_steps_after_the_thread_choices_are_made(tmp_path, monkeypatch):
    """deepnet bench's timed steps come after the warm-up: the first step and the thread choices'
    trials (which alternate on purpose between one thread and two) are reported apart."""
    from deepnet.tools import bench

    monkeypatch.setenv("DEEPNET_THREADS", "2")
    calls = []
    real_warm_up = bench.warm_up

    def spy(step, net, most=bench.MAX_WARMUP_STEPS):
        times = real_warm_up(step, net, most)
        calls.append((len(times), net.engine.thread_choices_settled))
        return times

    monkeypatch.setattr(bench, "warm_up", spy)
    result = bench.run_bench(layers=3000, steps=2, workdir=tmp_path)
    warmup = CHOSEN_WARMUP_STEPS
    assert calls == [(warmup, True)]          # the first step, then two trials of each option
    assert len(result["warmup_times"]) == warmup and len(result["step_times"]) == 2
    assert result["seconds_per_step"] == statistics.median(result["step_times"])
    # each timed step reports the threads its forward and backward passes ran on (one or the two allowed)
    assert len(result["step_threads"]) == 2
    assert all(fwd in (1, 2) and bwd in (1, 2) for fwd, bwd in result["step_threads"])


@pytest.mark.parametrize("threads", [1, 2])
def test_bench_can_fix_the_threads(tmp_path, monkeypatch, threads):
    """deepnet bench --threads N runs every pass on N threads, with no trials of the other option (so
    no warm-up beyond the first step), and says so."""
    from deepnet.tools import bench

    monkeypatch.setenv("DEEPNET_THREADS", "2")
    result = bench.run_bench(layers=3000, steps=3, workdir=tmp_path, threads=threads)
    assert result["threads"] == threads
    assert len(result["warmup_times"]) == 1
    assert result["step_threads"] == [[threads, threads]] * 3
    chosen = bench.run_bench(layers=3000, steps=2, workdir=tmp_path)
    assert chosen["threads"] == "chosen" and len(chosen["warmup_times"]) == CHOSEN_WARMUP_STEPS


def test_bench_probes_each_cpu_at_the_backwards_loops(tmp_path, monkeypatch):
    """The vCPU probe: ns a layer of a one-thread backward on a thread bound to each CPU in turn (on a
    shared machine one vCPU can run throughput-bound loops far slower than the other); None with one
    CPU or where threads cannot be bound."""
    import os

    from deepnet.tools import bench

    cpus = sorted(os.sched_getaffinity(0))
    probe = bench.vcpu_probe(seconds=0.01)
    if len(cpus) < 2:
        assert probe is None
    else:
        assert sorted(probe) == cpus and all(0.0 < ns < 1e6 for ns in probe.values())
        seen = []
        real = os.sched_setaffinity
        monkeypatch.setattr(os, "sched_setaffinity", lambda pid, mask: (seen.append(set(mask)), real(pid, mask)))
        bench.vcpu_probe(seconds=0.001)
        assert seen == [{cpu} for cpu in cpus]            # each probe thread bound to one CPU, in turn
        monkeypatch.setattr(os, "sched_setaffinity", lambda pid, mask: (_ for _ in ()).throw(OSError("no")))
        assert bench.vcpu_probe(seconds=0.001) is None
        assert os.sched_getaffinity(0) == set(cpus)      # the calling thread was never bound
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert bench.vcpu_probe(seconds=0.001) is None
    monkeypatch.undo()
    result = bench.run_bench(layers=3000, steps=2, workdir=tmp_path)
    probed = result["vcpu_probe_ns_per_layer"]
    assert probed is None if len(cpus) < 2 else sorted(probed["before"]) == sorted(probed["after"]) == cpus


def test_bench_reports_the_cpu_time_stolen_during_its_timed_steps(tmp_path, monkeypatch):
    """Steal ticks from /proc/stat around the timed steps: their share of all ticks, or None where the
    kernel does not report them (a bad or missing file is not an error)."""
    from deepnet.tools import bench

    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 50 800 10 0 5 35 0 0\ncpu0 50 0 25 400 5 0 2 18 0 0\n")
    assert bench.cpu_ticks(str(stat)) == (35, 1000)
    assert bench.stolen_fraction((35, 1000), (60, 1500)) == pytest.approx(25 / 500)
    assert bench.stolen_fraction(None, (60, 1500)) is None
    assert bench.stolen_fraction((35, 1000), (35, 1000)) is None   # no time passed
    assert bench.stolen_fraction((35, 1000), (36, 1000 + bench.MIN_STEAL_TICKS - 1)) is None   # too little
    for bad in ("", "intr 1 2 3\n", "cpu 1 2 3\n", "cpu a b c d e f g h\n"):
        stat.write_text(bad)
        assert bench.cpu_ticks(str(stat)) is None
    assert bench.cpu_ticks(str(tmp_path / "missing")) is None

    monkeypatch.setenv("DEEPNET_THREADS", "1")
    result = bench.run_bench(layers=3000, steps=2, workdir=tmp_path)
    stolen = result["cpu_stolen_fraction"]   # None also when the timed steps fit in one clock tick
    assert stolen is None or 0.0 <= stolen <= 1.0
    if bench.cpu_ticks() is None:
        assert stolen is None
