"""The builds of the kernels side by side on the same workloads: portable, AVX2+FMA and AVX-512.

``builtin_module("portable")`` (``deepnet._kernels``: baseline x86-64, SSE2 vectors),
``builtin_module("avx2")`` (``deepnet._kernels_avx2``: the same source built with -mavx2 -mfma) and
``builtin_module("avx512")`` (``deepnet._kernels_avx512``: with AVX-512 F/VL/BW/DQ as well) run the same
weights, inputs and kernel calls; the fast builds are loaded only if the CPU has their instructions, and
their cases are skipped on a CPU (or an installation) without them.

Each workload is one pytest-benchmark group ("<kind> <shape>: builds"), so the table shows the builds
next to each other; ``extra_info["build"]`` names the module that ran, and each fast build records
``speedup_vs_portable`` (portable median / its median) when the portable case ran in the same session.
forward = one chunk forward with checkpoints; backward = recompute + exact gradient with lr = 0.
"""

from __future__ import annotations

import pytest

from benchlib import Workload, load_kernels, record, run_kernel

# (activation, width, batch, layers)
SHAPES = [
    ("softsign", 4, 16, 200_000),   # the reference shape
    ("tanh", 4, 16, 200_000),
    ("relu", 4, 16, 200_000),
    ("softsign", 8, 16, 50_000),
    ("softsign", 12, 16, 20_000),   # the generic-width loops
    ("softsign", 32, 1, 10_000),    # the per-sample path
]
BUILDS = ["portable", "avx2", "avx512"]
CASES = [(shape, kind, build) for shape in SHAPES for kind in ("forward", "backward") for build in BUILDS]


def _shape_id(shape) -> str:
    activation, width, batch, layers = shape
    return f"{activation}-w{width}-B{batch}-L{layers // 1000}k"


# Median seconds of the portable cases that ran timed in this session, by (shape, kind).
_PORTABLE_MEDIANS: dict[tuple, float] = {}


@pytest.mark.parametrize("shape,kind,build", CASES,
                         ids=[f"{kind}-{_shape_id(shape)}-{build}" for shape, kind, build in CASES])
def test_build(benchmark, shape, kind, build):
    activation, width, batch, layers = shape
    w = Workload(load_kernels(activation, build), layers=layers, width=width, batch=batch)
    benchmark.group = f"{kind} {_shape_id(shape)}: builds"
    run_kernel(benchmark, w, kind)
    median = record(benchmark, layer_samples=w.layer_samples, kind=kind, requested_build=build, **w.describe())
    if median is None:
        return
    if build == "portable":
        _PORTABLE_MEDIANS[(shape, kind)] = median
    elif (shape, kind) in _PORTABLE_MEDIANS:
        benchmark.extra_info["speedup_vs_portable"] = _PORTABLE_MEDIANS[(shape, kind)] / median
