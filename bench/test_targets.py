"""One benchmark per target in TARGETS.md (../shared/docs/ beside the checkout), scaled down so a benchmark run stays short.

Each runs the real thing -- a ``DeepNet`` over a model file made by ``deepnet.init`` (core weights uniform in
[-0.001, 0.001], alpha = 1/sqrt(L)), random inputs and labels (a step's time does not depend on the data),
exactly what ``deepnet bench`` times -- at a smaller depth, and records in ``benchmark.extra_info``:

- ``measured_layers`` / ``measured_*``: what actually ran here, and its median;
- ``extrapolated_*_at_10M``: the figure scaled linearly in depth to the full-size workload (per-layer cost is
  constant in depth: see test_kernels.py::test_step_depth), labelled ``extrapolated: True``;
- ``target`` and ``meets_target`` (informational: nothing asserts on a time; benchmarks report).

The targets and their full-size ``deepnet bench`` commands are bench/targets.py's (``TARGETS``), which runs
those commands at full size (bench/README.md, "Full-size commands").

Under --benchmark-disable (CI) every body runs once at a tiny depth, as a smoke test of the benchmark itself.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from benchlib import median_seconds, record, run_pedantic, time_train_steps
from targets import TARGETS
from deepnet.tools.bench import warm_up
from deepnet.nn.network import DeepNet
from deepnet.api import init

FULL_LAYERS = 10_000_000
STEP_LAYERS = 1_000_000     # timed depth of the step targets (1/10 of the full size)
EVAL_LAYERS = 250_000       # timed depth of the evaluation target (1024 images, one evaluation batch)
SMOKE_LAYERS = 20_000       # depth of every target under --benchmark-disable
BATCH = 16
GB = 1e9                    # the memory target is in GB (10^9 bytes); GiB figures are recorded too


@pytest.fixture(scope="session")
def model_file(model_dir):
    """model_file(layers, width, activation) -> path of a fresh model, made once per session."""
    made = {}

    def make(layers: int, width: int = 4, activation: str = "softsign"):
        key = (layers, width, activation)
        if key not in made:
            path = model_dir / f"bench-{activation}-w{width}-L{layers}.h5"
            init(path, layers=layers, width=width, activation=activation, seed=0, progress=False)
            made[key] = path
        return made[key]

    return make


def _layers(benchmark, timed_layers: int) -> int:
    return SMOKE_LAYERS if benchmark.disabled else timed_layers


def _bench_step(benchmark, model_file, *, figure: str, activation: str, in_memory: bool, width: int = 4,
                batch: int = BATCH):
    """Time DeepNet.train_step at a scaled depth; extrapolate seconds per step linearly to 10M layers and
    compare with TARGETS[figure]."""
    target_s, command = TARGETS[figure].target, TARGETS[figure].command
    layers = _layers(benchmark, STEP_LAYERS)
    path = model_file(layers, width, activation)
    with DeepNet.open(path, writable=True, in_memory=in_memory) as net:
        assert np.isfinite(time_train_steps(benchmark, net, batch).loss)
    median = record(benchmark, layer_samples=layers * batch, layers_measured=layers, width=width, batch=batch,
                    activation=activation, mode="in-memory" if in_memory else "streamed",
                    full_size_command=command, target=f"<= {target_s} s/step at 10M layers")
    if median is not None:
        extrapolated = median * FULL_LAYERS / layers
        benchmark.extra_info.update(
            measured_s_per_step=median, extrapolated=True,
            extrapolated_s_per_step_at_10M=extrapolated, target_s_per_step=target_s,
            meets_target=extrapolated <= target_s,
            summary=f"{extrapolated:.3f} s/step extrapolated to 10M (target <= {target_s})",
        )


def test_target_step_softsign_in_ram(benchmark, model_file):
    """10M softsign step in RAM <= 0.45 s; measured at 1M layers, extrapolated x10.
    Full size: ``deepnet bench --layers 10_000_000 --steps 5``."""
    benchmark.group = "targets: 10M-layer step (measured at 1M, extrapolated)"
    _bench_step(benchmark, model_file, figure="softsign", activation="softsign", in_memory=True)


def test_target_step_softsign_streamed(benchmark, model_file):
    """Same, weights streamed from the HDF5 file (in the page cache: it was just written) <= 0.6 s.
    Full size: ``deepnet bench --layers 10_000_000 --steps 5 --streamed``."""
    benchmark.group = "targets: 10M-layer step (measured at 1M, extrapolated)"
    _bench_step(benchmark, model_file, figure="streamed", activation="softsign", in_memory=False)


def test_target_step_tanh_in_ram(benchmark, model_file):
    """tanh, same workload <= 0.7 s. Full size: ``deepnet bench --layers 10_000_000 --steps 5 --activation tanh``."""
    benchmark.group = "targets: 10M-layer step (measured at 1M, extrapolated)"
    _bench_step(benchmark, model_file, figure="tanh", activation="tanh", in_memory=True)


def test_target_step_relu_in_ram(benchmark, model_file):
    """relu, same workload <= 0.45 s. Full size: ``deepnet bench --layers 10_000_000 --steps 5 --activation relu``."""
    benchmark.group = "targets: 10M-layer step (measured at 1M, extrapolated)"
    _bench_step(benchmark, model_file, figure="relu", activation="relu", in_memory=True)


def test_target_eval_images_per_s(benchmark, model_file):
    """Evaluation (forward only) through 10M layers, width 4 >= 250 images/s.

    Measured: one ``DeepNet.logits`` call on 1024 images (one eval batch, as the full command) through
    250,000 layers in RAM; images/s scales as 1/depth, so the 10M figure is images/s * 250k / 10M.
    Full size: ``TARGETS["evaluation"].command`` (its eval line; images/s does not depend on the count).
    """
    benchmark.group = "targets: evaluation (measured at 250k layers, extrapolated)"
    target = TARGETS["evaluation"].target
    layers = _layers(benchmark, EVAL_LAYERS)
    images = 64 if benchmark.disabled else 1024
    path = model_file(layers)
    rng = np.random.default_rng(0)
    with DeepNet.open(path, in_memory=True) as net:
        x = rng.random((images, net.input_dim), dtype=np.float32)
        out = []
        run_pedantic(benchmark, lambda: out.append(net.logits(x)), rounds=3, warmup_rounds=1)
        assert np.isfinite(out[-1]).all()
        threads = net.engine.threads
    median = record(benchmark, layer_samples=layers * images, layers_measured=layers, images=images,
                    eval_batch=images, threads=threads, mode="in-memory",
                    full_size_command=TARGETS["evaluation"].command,
                    target=f">= {target:g} images/s through 10M layers")
    if median is not None:
        measured = images / median
        extrapolated = measured * layers / FULL_LAYERS
        benchmark.extra_info.update(
            measured_images_per_s=measured, extrapolated=True, extrapolated_images_per_s_at_10M=extrapolated,
            target_images_per_s=target, meets_target=extrapolated >= target,
            summary=f"{extrapolated:.1f} images/s extrapolated to 10M (target >= {target:g})",
        )


def test_target_width32_batch1_steps_per_s(benchmark, model_file):
    """Width 32, 10,000 layers, batch 1 >= 100 steps/s -- measured at full size (nothing extrapolated).
    Full size: ``deepnet bench --layers 10_000 --width 32 --batch 1 --steps 200``."""
    benchmark.group = "targets: width 32, 10k layers, batch 1 (full size)"
    layers, target = 10_000, TARGETS["width32"].target
    path = model_file(layers, 32, "softsign")
    rng = np.random.default_rng(0)
    with DeepNet.open(path, writable=True, in_memory=True) as net:
        x = rng.random((1, net.input_dim), dtype=np.float32)
        y = rng.integers(0, 10, size=1)
        results = []

        def step() -> float:
            results.append(net.train_step(x, y, layer_lr=0.01, head_lr=0.01))
            return results[-1].seconds

        warm_up(step, net)
        run_pedantic(benchmark, step, rounds=5 if benchmark.disabled else 50, warmup_rounds=0)
        assert np.isfinite(results[-1].loss)
    median = record(benchmark, layer_samples=layers, layers_measured=layers, width=32, batch=1,
                    activation="softsign", mode="in-memory", extrapolated=False,
                    full_size_command=TARGETS["width32"].command, target=f">= {target:g} steps/s")
    if median is not None:
        steps_per_s = 1.0 / median
        benchmark.extra_info.update(
            steps_per_s=steps_per_s, target_steps_per_s=target, meets_target=steps_per_s >= target,
            summary=f"{steps_per_s:.1f} steps/s at full size (target >= {target:g})",
        )


# Runs its arguments as a grandchild. Needed because Linux keeps ru_maxrss across execve: a process spawned
# straight from this pytest process (hundreds of MB of cached weights by now) reports *our* peak as its
# own. The launcher is a small fresh interpreter, so the grandchild starts from a ~10 MB high-water mark.
_LAUNCHER = [sys.executable, "-c", "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"]


def _peak_rss(layers: int, workdir) -> dict:
    """`python -m deepnet bench --layers N --steps 1 --json` in a fresh process; its JSON (peak_rss_bytes)."""
    cmd = [sys.executable, "-m", "deepnet", "bench", "--layers", str(layers), "--steps", "1", "--json",
           "--workdir", str(workdir)]
    done = subprocess.run(_LAUNCHER + cmd, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_target_peak_memory(benchmark, model_dir):
    """Peak memory of 10M-layer in-memory training <= 1.3 GB.

    What is measured: the peak RSS (``ru_maxrss``, which ``deepnet bench --json`` reports as
    ``peak_rss_bytes``) of a fresh ``python -m deepnet bench --layers N --steps 1 --json`` process -- the
    interpreter and libraries, creating the model file, loading the core into RAM, a warm-up step and a
    timed step -- at N = 1M and 2M layers, started through a small launcher process (ru_maxrss survives
    exec on Linux, so a child spawned directly from pytest would report pytest's own peak). A line through the two points (fixed cost + bytes per layer)
    is extrapolated to 10M; ``naive_x5_bytes`` (the 2M peak x 5) is a looser upper bound. The benchmark's
    own time is only the cost of the two subprocesses; the figures are in extra_info.
    Full size: ``deepnet bench --layers 10_000_000 --steps 1 --json`` (its peak_rss_bytes).
    """
    benchmark.group = "targets: peak memory (subprocesses at 1M and 2M layers, extrapolated)"
    target_gb = TARGETS["memory"].target
    sizes = (SMOKE_LAYERS,) if benchmark.disabled else (1_000_000, 2_000_000)
    runs = {}

    def measure():
        for layers in sizes:
            runs[layers] = _peak_rss(layers, model_dir)

    run_pedantic(benchmark, measure, rounds=1, warmup_rounds=0)
    peaks = {layers: run["peak_rss_bytes"] for layers, run in runs.items()}
    assert all(p > 0 for p in peaks.values())
    info = {"measured": "peak RSS (ru_maxrss) of `python -m deepnet bench --layers N --steps 1 --json`",
            "peak_rss_bytes_by_layers": {str(k): v for k, v in peaks.items()},
            "full_size_command": "deepnet bench --layers 10_000_000 --steps 1 --json",
            "target": f"<= {target_gb:g} GB peak for 10M in-memory training"}
    record(benchmark, **info)
    if len(sizes) == 2 and median_seconds(benchmark) is not None:
        (l1, p1), (l2, p2) = sorted(peaks.items())
        per_layer = (p2 - p1) / (l2 - l1)
        fixed = p1 - per_layer * l1
        extrapolated = fixed + per_layer * FULL_LAYERS
        benchmark.extra_info.update(
            extrapolated=True, bytes_per_layer=per_layer, fixed_bytes=fixed,
            extrapolated_peak_bytes_at_10M=extrapolated, extrapolated_peak_gb_at_10M=extrapolated / GB,
            extrapolated_peak_gib_at_10M=extrapolated / 2**30, naive_x5_bytes=p2 * FULL_LAYERS / l2,
            target_bytes=target_gb * GB, meets_target=extrapolated <= target_gb * GB,
            summary=(f"{extrapolated / GB:.2f} GB peak extrapolated to 10M ({per_layer:.0f} B/layer + "
                     f"{fixed / 1e6:.0f} MB fixed; target <= {target_gb:g} GB)"),
        )
