"""The portable build against the AVX2+FMA build, side by side on the same workloads.

``builtin_module("portable")`` (``deepnet._kernels``: baseline x86-64, SSE2 vectors) and
``builtin_module("avx2")`` (``deepnet._kernels_avx2``: the same source built with -mavx2 -mfma, loaded at
run time only if the CPU has AVX2+FMA) run the same weights, inputs and kernel calls. The avx2 cases are
skipped on a CPU (or a build) without AVX2+FMA.

Each workload is one pytest-benchmark group ("<kind> <shape>: portable vs avx2"), so the table shows
the two builds next to each other; ``extra_info["build"]`` names the module that ran, and the avx2 case
records ``speedup_vs_portable`` (portable median / avx2 median) when the portable case ran in the same
session. forward = one chunk forward with checkpoints; backward = recompute + exact gradient with lr = 0.
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
    ("softsign", 5, 16, 50_000),    # the generic-width loops
    ("softsign", 32, 1, 10_000),    # the per-sample path
]
BUILDS = ["portable", "avx2"]
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
    benchmark.group = f"{kind} {_shape_id(shape)}: portable vs avx2"
    run_kernel(benchmark, w, kind)
    median = record(benchmark, layer_samples=w.layer_samples, kind=kind, requested_build=build, **w.describe())
    if median is None:
        return
    if build == "portable":
        _PORTABLE_MEDIANS[(shape, kind)] = median
    elif (shape, kind) in _PORTABLE_MEDIANS:
        benchmark.extra_info["speedup_vs_portable"] = _PORTABLE_MEDIANS[(shape, kind)] / median
