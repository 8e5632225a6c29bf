"""Helpers shared by the benchmarks in bench/ (imported by name; bench/conftest.py puts bench/ on sys.path).

Every benchmark uses ``benchmark.pedantic(..., rounds=R, iterations=1)`` with a ``setup`` that restores
its inputs, then ``record()`` reads the median round time from ``benchmark.stats`` and stores the derived
rate (layer-samples per second, steps/s, images/s ...) and the workload in ``benchmark.extra_info`` (it lands
in ``--benchmark-json`` / ``--benchmark-autosave`` files). Nothing here asserts on a time.

``DEEPNET_BENCH_ROUNDS`` sets the minimum timed rounds per benchmark (default 5) and ``DEEPNET_BENCH_BUDGET``
the seconds of timed rounds to aim for (default 0.3); fast benchmarks get more rounds, up to 50.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest

from deepnet.nn.engine import CoreEngine, choose_save_every
from deepnet.nn.stores import InMemoryStore
from deepnet.errors import ActivationError
from deepnet.kernels.loader import LayerKernels, build_label, builtin_module
from deepnet.nn.network import DEFAULT_CHUNK_LAYERS, DeepNet
from deepnet.tools.bench import warm_up

# Timed rounds per benchmark: at least ROUNDS, and as many more (up to MAX_ROUNDS) as fit in BUDGET_S seconds.
ROUNDS = max(1, int(os.environ.get("DEEPNET_BENCH_ROUNDS", "5")))
MAX_ROUNDS = max(ROUNDS, 50)
BUDGET_S = float(os.environ.get("DEEPNET_BENCH_BUDGET", "0.3"))
INIT_SCALE = 1e-3  # core weights are uniform in [-0.001, 0.001], as `deepnet init` makes them

# (test name, figures) of every benchmark that ran timed in this session, for the terminal summary.
FIGURES: list[tuple[str, dict]] = []


# -- kernels and workloads --------------------------------------------------------------------------

def load_kernels(activation: str, build: str | None = None) -> LayerKernels:
    """The compiled kernels of a built-in activation from one build ("auto", "portable", "avx2", "avx512").

    ``None`` follows $DEEPNET_KERNELS like ``deepnet.kernels.loader.kernels_for``; a named build skips the test
    if this CPU cannot run it or this installation lacks it (built with DEEPNET_MARCH, or not x86-64).
    """
    try:
        module = builtin_module(build)
    except ActivationError as exc:
        if build is None:  # a bad $DEEPNET_KERNELS is an error, not a skip
            raise
        pytest.skip(str(exc))
    return LayerKernels(name=activation, module=module, index=module.activation_index(activation))


class Workload:
    """One chunk of ``layers`` random layers of ``width`` and a batch, with everything the kernels need.

    Parameters are drawn once per (layers, width, seed) and shared (read-only: the benchmarks back-propagate
    with lr = 0, so the weights never change; see ``params_for``).
    """

    def __init__(self, kernels: LayerKernels, *, layers: int, width: int, batch: int, seed: int = 0) -> None:
        self.kernels = kernels
        self.layers, self.width, self.batch = layers, width, batch
        self.alpha = 1.0 / math.sqrt(layers)  # the model's default residual scale, 1/sqrt(L)
        self.params = params_for(layers, width, seed)
        rng = np.random.default_rng([seed, 1])
        self.h0 = np.tanh(rng.standard_normal((width, batch))).astype(np.float32)  # like the input head's output
        self.g0 = (rng.standard_normal((width, batch)) * 1e-2).astype(np.float32)
        self.save_every = choose_save_every(layers, width, batch, layers)
        self.saves = np.empty((-(-layers // self.save_every), width * batch), np.float32)
        self.work = np.empty(kernels.workspace_size(width, batch, self.save_every), np.float32)
        self.h = self.h0.copy()
        self.g = self.g0.copy()

    @property
    def layer_samples(self) -> int:
        return self.layers * self.batch

    def describe(self) -> dict:
        return {"layers": self.layers, "width": self.width, "batch": self.batch, "activation": self.kernels.name,
                "build": build_label(self.kernels.module), "save_every": self.save_every}

    # Each *_setup restores the inputs the timed call consumes; pedantic() calls it before every round.
    def forward_setup(self):
        np.copyto(self.h, self.h0)

    def forward(self) -> None:
        self.kernels.forward(self.params, self.h, self.alpha, self.saves, self.save_every, self.work)

    def make_saves(self) -> None:
        """Run the forward pass once so ``saves`` holds the checkpoints ``backward`` recomputes from."""
        self.forward_setup()
        self.forward()
        assert np.isfinite(self.h).all()

    def backward_setup(self):
        np.copyto(self.g, self.g0)

    def backward(self) -> None:
        self.kernels.backward(self.params, self.saves, self.save_every, self.g, self.alpha, 0.0, self.work)

    def engine(self, chunk_layers: int = DEFAULT_CHUNK_LAYERS) -> CoreEngine:
        """A CoreEngine over these weights in RAM (the same engine DeepNet runs)."""
        return CoreEngine(InMemoryStore(self.params), self.kernels, self.width, self.alpha, chunk_layers)


PARAMS: dict[tuple[int, int, int], np.ndarray] = {}


def params_for(layers: int, width: int, seed: int = 0) -> np.ndarray:
    """Random core weights (layers, width*width + width), cached: only ever used with lr = 0."""
    key = (layers, width, seed)
    if key not in PARAMS:
        rng = np.random.default_rng(seed)
        params = rng.random((layers, width * width + width), dtype=np.float32)  # float32 all the way: fast
        params *= 2 * INIT_SCALE
        params -= INIT_SCALE
        PARAMS[key] = params
    return PARAMS[key]


# -- recording ------------------------------------------------------------------------------------

def timed(benchmark) -> bool:
    """Whether this run times anything (False under --benchmark-disable, where stats stay empty)."""
    return not benchmark.disabled and benchmark.stats is not None


def median_seconds(benchmark) -> float | None:
    """Median seconds of one round of the benchmark that just ran, or None if it ran untimed."""
    if not timed(benchmark):
        return None
    return float(benchmark.stats.stats.median)


def record(benchmark, *, layer_samples: int | None = None, **info) -> float | None:
    """Store the workload and the rates derived from the median round in ``benchmark.extra_info``.

    ``layer_samples`` is the layer-samples one round processes (layers * batch); the rate is
    ``layer_samples / median``. Returns the median seconds (None if untimed).
    """
    benchmark.extra_info.update(info)
    median = median_seconds(benchmark)
    if median is None:
        benchmark.extra_info["timed"] = False
        return None
    benchmark.extra_info["median_s"] = median
    benchmark.extra_info["rounds"] = int(benchmark.stats.stats.rounds)
    if layer_samples is not None:
        benchmark.extra_info["layer_samples_per_s"] = layer_samples / median
        benchmark.extra_info["ns_per_layer_sample"] = 1e9 * median / layer_samples
    FIGURES.append((benchmark.name, benchmark.extra_info))  # the live dict: later updates show too
    return median


def run_pedantic(benchmark, fn, setup=None, rounds: int | None = None, warmup_rounds: int = 1,
                 budget_s: float = BUDGET_S):
    """``benchmark.pedantic(fn, setup=setup, iterations=1)``, with the number of rounds chosen here.

    With ``rounds=None`` one untimed call (which doubles as the warm-up: page faults, thread-pool start)
    estimates the time of a round, and the rounds fill about ``budget_s`` seconds: at least ROUNDS, at most
    MAX_ROUNDS. Under --benchmark-disable pedantic() runs ``fn`` once and nothing is probed.
    """
    if rounds is None:
        rounds = ROUNDS
        if not benchmark.disabled:
            if setup is not None:
                setup()
            started = time.perf_counter()
            fn()
            probe = time.perf_counter() - started
            rounds = max(ROUNDS, min(MAX_ROUNDS, int(budget_s / max(probe, 1e-6))))
            warmup_rounds = 0
    return benchmark.pedantic(fn, setup=setup, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)


def run_kernel(benchmark, w: "Workload", kind: str) -> None:
    """Time ``w.forward`` or ``w.backward`` (kind) with pytest-benchmark; the output must stay finite."""
    if kind == "forward":
        run_pedantic(benchmark, w.forward, setup=w.forward_setup)
        assert np.isfinite(w.h).all()
    else:
        w.make_saves()
        run_pedantic(benchmark, w.backward, setup=w.backward_setup)
        assert np.isfinite(w.g).all()


def time_train_steps(benchmark, net: DeepNet, batch: int):
    """Time ``net.train_step`` on random inputs and labels as `deepnet bench` does: untimed, the first
    step and the thread choice's trials; then ROUNDS timed rounds. Returns the last step's result."""
    rng = np.random.default_rng(0)
    x = rng.random((batch, net.input_dim), dtype=np.float32)
    y = rng.integers(0, 10, size=batch)
    results = []

    def step() -> float:
        results.append(net.train_step(x, y, layer_lr=0.01, head_lr=0.01))  # as deepnet bench steps
        return results[-1].seconds

    warm_up(step, net)
    run_pedantic(benchmark, step, rounds=ROUNDS, warmup_rounds=0)
    return results[-1]
