"""`deepnet bench`: time the reference workload on this machine in one command.

Creates a throw-away model of the requested shape in a temporary directory, then times exact SGD
steps (in RAM or streamed from the file) and, optionally, forward-only evaluation. Inputs are random:
the time of a step does not depend on the data. Warm-up steps come first and are reported apart:
the first pays for first touches of memory, and on a machine with two cores or more the next few
alternate on purpose between one thread and several until each kind of pass has chosen the faster
(nn.threads.MeasuredChoice; four steps with its two trials of each, more where the backward pass also
measures its 16-sample blocks), so timing them would mix in the slower option. Each timed step records
the threads its passes ran on and the backward's batch block; ``threads`` pins the threads instead.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np

from deepnet.flags import int_at_least, positive
from deepnet.kernels.loader import build_label, kernels_for
from deepnet.nn.network import DEFAULT_CHUNK_LAYERS, DeepNet
from deepnet.training.recipe import init

#: Warm-up steps at most (the first step and the choices' trials take 7 on two cores at batch 16).
MAX_WARMUP_STEPS = 12


def warm_up(step: Callable[[], float], net: DeepNet, most: int = MAX_WARMUP_STEPS) -> list[float]:
    """Run ``step()`` (returning its seconds) once, then until ``net``'s thread choices are made (at
    most ``most`` times in all); return the seconds of each."""
    times = [step()]
    while not net.engine.thread_choices_settled and len(times) < most:
        times.append(step())
    return times


def cpu_ticks(stat_path: str = "/proc/stat") -> tuple[int, int] | None:
    """(stolen, all) CPU ticks of the whole machine so far, or None where the kernel does not say.

    "Stolen" is the time a hypervisor ran something else while this machine's vCPUs wanted to run
    (Linux's steal column). On a shared virtual machine it is the part of the noise in a benchmark
    that the machine itself can see; it misses shorter pauses (by how much: bench/README.md).
    """
    try:
        with open(stat_path) as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != "cpu":
        return None
    try:
        # user nice system idle iowait irq softirq steal (guest time is already inside user)
        ticks = [int(value) for value in fields[1:9]]
    except ValueError:
        return None
    return ticks[7], sum(ticks)


#: Fewest ticks (1/100 s of one CPU each) between two readings for a share worth reporting.
MIN_STEAL_TICKS = 50


def stolen_fraction(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of the machine's CPU time between two cpu_ticks() readings that was stolen (None if
    either is missing or too little time passed to say)."""
    if before is None or after is None or after[1] - before[1] < MIN_STEAL_TICKS:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


#: The vCPU probe's work: a chunk of the reference shape whose segments stay in L2, so it times the core.
PROBE_LAYERS, PROBE_WIDTH, PROBE_BATCH, PROBE_SAVE_EVERY = 2000, 4, 16, 500
#: Seconds the probe runs on each vCPU (the best of its calls counts).
PROBE_SECONDS = 0.05


def _best_seconds_pinned(cpu: int, call: Callable[[], None], seconds: float) -> float | None:
    """The shortest of ``call()``'s runs in ``seconds`` on a thread bound to ``cpu`` (None if it cannot be)."""
    found: dict[str, float] = {}

    def run() -> None:
        try:
            os.sched_setaffinity(0, {cpu})   # Linux: 0 is the calling thread
        except OSError:
            return
        best, end = math.inf, time.perf_counter() + seconds
        while time.perf_counter() < end:
            started = time.perf_counter()
            call()
            best = min(best, time.perf_counter() - started)
        found["best"] = best

    thread = threading.Thread(target=run, name=f"deepnet-probe-cpu{cpu}")
    thread.start()
    thread.join()
    return found.get("best")


def probe_backward() -> Callable[[], None]:
    """The vCPU probe's work, made once: one call of the one-thread softsign backward (the build in use)
    through a small chunk of 16 samples. lr 0 and g 0: the weights never change, so every call does the
    same work, whatever is being benchmarked."""
    kernels = kernels_for("softsign", PROBE_WIDTH)
    rng = np.random.default_rng(0)
    row = PROBE_WIDTH * PROBE_WIDTH + PROBE_WIDTH
    params = (rng.uniform(-0.5, 0.5, (PROBE_LAYERS, row)) / PROBE_WIDTH).astype(np.float32)
    saves = np.empty((-(-PROBE_LAYERS // PROBE_SAVE_EVERY), PROBE_WIDTH * PROBE_BATCH), np.float32)
    kernels.forward(params, rng.standard_normal((PROBE_WIDTH, PROBE_BATCH)).astype(np.float32), 1e-3, saves,
                    PROBE_SAVE_EVERY)
    g = np.zeros((PROBE_WIDTH, PROBE_BATCH), np.float32)
    work = np.empty(kernels.workspace_size(PROBE_WIDTH, PROBE_BATCH, PROBE_SAVE_EVERY), np.float32)
    block = max(kernels.backward_blocks(PROBE_WIDTH)) if kernels.block16_native else 8

    def call() -> None:
        kernels.backward(params, saves, PROBE_SAVE_EVERY, g, 1e-3, 0.0, work, 1, block)

    return call


def vcpu_probe(seconds: float = PROBE_SECONDS, call: Callable[[], None] | None = None) -> dict[int, float] | None:
    """Each CPU's time at the backward's own throughput-bound loops: nanoseconds a layer of
    ``call`` (``probe_backward()``, made here if not given) on a thread bound to each CPU in turn, the
    best of its calls in ``seconds``. The same work whatever is being benchmarked, so figures compare
    across runs.

    On a shared virtual machine one vCPU (likely one whose physical core another tenant shares) can
    run such loops a quarter slower or more for seconds at a time, while a chain of dependent instructions (the
    forward pass) barely notices; two threads that share a pass then run at the slower one's pace
    (bench/README.md). None with one CPU, or where threads cannot be bound to CPUs (not Linux).
    """
    if not hasattr(os, "sched_getaffinity"):
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None
    call = probe_backward() if call is None else call
    best = {cpu: _best_seconds_pinned(cpu, call, seconds) for cpu in cpus}
    if any(value is None for value in best.values()):
        return None
    return {cpu: 1e9 * value / PROBE_LAYERS for cpu, value in best.items()}


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far.

    /proc/self/status VmHWM is this process image's own high-water mark; ru_maxrss (the fallback off
    Linux) survives exec, so it would report a large parent's peak when launched from one.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def run_bench(
    *,
    layers: int = 10_000_000,
    width: int = 4,
    activation: str = "softsign",
    batch: int = 16,
    steps: int = 3,
    in_memory: bool = True,
    chunk_layers: int = DEFAULT_CHUNK_LAYERS,
    eval_images: int = 0,
    eval_batch: int = 1024,
    workdir: str | Path | None = None,
    seed: int = 0,
    threads: int = 0,
) -> dict:
    """Time ``steps`` exact SGD steps (after the warm-up steps) and optionally an evaluation pass.

    ``threads`` > 0 runs every pass on that many threads (at most the engine's) instead of letting the
    thread choice measure which is faster; 0 lets it choose, as training does.
    """
    for name, value in (("layers", layers), ("width", width), ("batch", batch), ("steps", steps),
                        ("chunk-layers", chunk_layers), ("eval-batch", eval_batch)):
        positive(name, value)
    int_at_least("threads", threads, 0, " (0: let the thread choice decide)")
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory(dir=workdir, prefix="deepnet-bench-") as tmp:
        path = Path(tmp) / "bench.h5"
        init(path, layers=layers, width=width, activation=activation, seed=seed, progress=False)
        with DeepNet.open(path, writable=True, in_memory=in_memory, chunk_layers=chunk_layers) as net:
            net.engine.fixed_threads = threads or None
            def step() -> float:
                x = rng.random((batch, net.input_dim), dtype=np.float32)
                y = rng.integers(0, 10, size=batch)
                return net.train_step(x, y, layer_lr=0.01, head_lr=0.01).seconds

            warmup_times = warm_up(step, net)
            step_times, step_threads, step_blocks, step_splits = [], [], [], []
            probe = probe_backward()
            probe_before = vcpu_probe(call=probe)
            ticks_before = cpu_ticks()
            for _ in range(steps):
                step_times.append(step())
                used = net.engine.threads_used
                step_threads.append([used["forward"], used["backward"]])
                step_blocks.append(net.engine.backward_block_used)
                step_splits.append(net.engine.backward_split_used)
            stolen = stolen_fraction(ticks_before, cpu_ticks())
            probe_after = vcpu_probe(call=probe)
            median = statistics.median(step_times)
            result = {
                "layers": layers, "width": width, "activation": activation, "batch": batch,
                "mode": "in-memory" if in_memory else "streamed", "steps": steps,
                "threads": threads or "chosen",
                "seconds_per_step": median, "seconds_per_step_min": min(step_times),
                "step_times": step_times, "warmup_times": warmup_times,
                # [forward, backward] threads of each timed step: the thread choice follows the machine
                "step_threads": step_threads,
                # samples per batch block of each timed step's backward pass (8, or 16 in 16-lane vectors)
                "step_backward_blocks": step_blocks,
                # how each timed step's backward threads shared it: "blocks" or "segments" (moot on one)
                "step_backward_splits": step_splits,
                # share of the machine's CPU time the hypervisor gave elsewhere during the timed steps
                "cpu_stolen_fraction": stolen,
                # ns a layer of the probe's backward on each CPU, just before and after the timed steps
                # (None: one CPU, or threads cannot be bound to CPUs here)
                "vcpu_probe_ns_per_layer": None if probe_before is None or probe_after is None else {
                    "before": probe_before, "after": probe_after},
                "layer_samples_per_s": layers * batch / median,
                # the compiled build that ran ($DEEPNET_KERNELS, else the fastest this CPU runs)
                "kernels": build_label(net.kernels.module),
            }
            if eval_images:
                x = rng.random((eval_images, net.input_dim), dtype=np.float32)
                started = time.perf_counter()
                for lo in range(0, eval_images, eval_batch):
                    net.logits(x[lo:lo + eval_batch])
                seconds = time.perf_counter() - started
                result.update(eval_images=eval_images, eval_seconds=seconds, eval_images_per_s=eval_images / seconds)
    result["peak_rss_bytes"] = peak_rss_bytes()
    return result
