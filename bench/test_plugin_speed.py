"""A plugin activation runs as fast as a built-in: softsign registered again as a plugin (``softsign_copy``)
and compiled on first use, against the built-in softsign, plus what the first use and a cached use cost.

- ``test_kernel``: forward / backward of one chunk, the built-in and the plugin side by side in one
  pytest-benchmark group per shape (the same workloads as test_kernels.py).
- ``test_plugin_vs_builtin``: a full core step (CoreEngine forward + backward, lr = 0), built-in and plugin
  rounds *interleaved* so machine noise hits both alike; records the ratio of the medians
  (``plugin_over_builtin``; the issue's bar is <= 1.10) in the figures summary.
- ``test_first_use_and_cached_load``: a fresh process compiling the plugin into an empty cache, then fresh
  processes loading it from the cache (seconds measured inside the processes around ``kernels_for``).
  Skipped under --benchmark-disable: it is nothing but a timing, and costs a compile.

The plugin module is compiled once per cache (``$DEEPNET_CACHE``, else the per-user cache): the first run of
this file pays for a compile (tens of seconds), later runs load it. Nothing asserts on a time.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest

from benchlib import FIGURES, Workload, load_kernels, record, run_kernel
from deepnet import activations
from deepnet.activations import registry as activation_registry
from deepnet.kernels import jit as compile_activation
from deepnet.kernels.loader import kernels_for

COPY = "softsign_copy"
SHAPES = [
    (4, 16, 200_000),   # the reference shape
    (12, 16, 20_000),   # the generic-width loops
    (32, 1, 10_000),    # the per-sample path
]
SHAPE_IDS = [f"w{w}-B{b}-L{layers // 1000}k" for w, b, layers in SHAPES]

_REGISTER = (
    "import dataclasses; from deepnet import activations\n"
    f"activations.register(dataclasses.replace(activations.get('softsign'), name={COPY!r}, origin='bench'))\n"
)


@pytest.fixture(scope="module")
def plugin():
    """softsign registered under another name: the registry treats it as any plugin's activation."""
    if activation_registry.lookup(COPY) is None:
        activations.register(dataclasses.replace(activations.get("softsign"), name=COPY, origin="bench"))
    before = len(compile_activation.history())
    kernels = kernels_for(COPY)  # compiled now, or loaded from the cache
    assert kernels.module.__name__.startswith("deepnet_act_") and not activations.is_builtin(activations.get(COPY))
    for event in compile_activation.history()[before:]:
        FIGURES.append((f"{COPY} first use in this session", {
            "median_s": event["seconds"], "summary": f"{event['event']} ({event['path']})"}))
    yield kernels
    activations.unregister(COPY)


def _kernels(activation: str, plugin_kernels):
    return plugin_kernels if activation == COPY else load_kernels(activation)


@pytest.mark.parametrize("kind", ["forward", "backward"])
@pytest.mark.parametrize("activation", ["softsign", COPY])
@pytest.mark.parametrize("width,batch,layers", SHAPES, ids=SHAPE_IDS)
def test_kernel(benchmark, plugin, activation, kind, width, batch, layers):
    w = Workload(_kernels(activation, plugin), layers=layers, width=width, batch=batch)
    benchmark.group = f"plugin vs built-in: {kind} w{width} B{batch}"
    run_kernel(benchmark, w, kind)
    record(benchmark, layer_samples=w.layer_samples, kind=kind, **w.describe())


@pytest.mark.parametrize("width,batch,layers", SHAPES, ids=SHAPE_IDS)
def test_plugin_vs_builtin(benchmark, plugin, width, batch, layers):
    """Core steps, alternating built-in and plugin rounds; the figure is the ratio of their medians."""
    workloads = {name: Workload(_kernels(name, plugin), layers=layers, width=width, batch=batch)
                 for name in ("softsign", COPY)}
    engines = {name: w.engine() for name, w in workloads.items()}
    times: dict[str, list[float]] = {name: [] for name in workloads}
    pairs = 9 if not benchmark.disabled else 1

    def step(name):
        w, engine = workloads[name], engines[name]
        np.copyto(w.h, w.h0)
        np.copyto(w.g, w.g0)
        t0 = time.perf_counter()
        engine.forward(w.h)
        engine.backward(w.g, 0.0, step=1)
        times[name].append(time.perf_counter() - t0)

    def interleaved():
        for name in ("softsign", COPY):  # warm-up
            step(name)
        for name in times:
            times[name].clear()
        for i in range(pairs):
            for name in (("softsign", COPY) if i % 2 == 0 else (COPY, "softsign")):
                step(name)

    try:
        benchmark.group = f"plugin vs built-in: interleaved steps w{width} B{batch}"
        benchmark.pedantic(interleaved, rounds=1, iterations=1)
        for name, w in workloads.items():
            assert np.isfinite(w.g).all(), name
            np.testing.assert_allclose(workloads[COPY].g, workloads["softsign"].g, rtol=1e-5, atol=1e-7)
    finally:
        for engine in engines.values():
            engine.close()
    builtin, copy = statistics.median(times["softsign"]), statistics.median(times[COPY])
    ratio = copy / builtin
    benchmark.extra_info.update(width=width, batch=batch, layers=layers, pairs=pairs,
                                builtin_median_s=builtin, plugin_median_s=copy, plugin_over_builtin=ratio,
                                builtin_build=workloads["softsign"].describe()["build"],
                                plugin_module=plugin.module.__name__)
    if not benchmark.disabled:
        FIGURES.append((f"plugin/built-in step w{width} B{batch} L{layers // 1000}k", {
            "median_s": copy, "layer_samples_per_s": layers * batch / copy,
            "summary": f"plugin {copy * 1e3:.1f} ms vs built-in {builtin * 1e3:.1f} ms: "
                       f"ratio {ratio:.3f} (bar <= 1.10) over {pairs} interleaved pairs"}))


def test_first_use_and_cached_load(benchmark, tmp_path):
    """A fresh process compiles the plugin into an empty cache; fresh processes then load it from there."""
    if benchmark.disabled:
        pytest.skip("a timing only (and a compile): not run under --benchmark-disable")
    code = _REGISTER + (
        "import json, time; from deepnet.kernels.loader import kernels_for; from deepnet.kernels import jit as c\n"
        f"t = time.perf_counter(); kernels_for({COPY!r}); s = time.perf_counter() - t\n"
        "print(json.dumps({'seconds': s, 'events': [e['event'] for e in c.history()]}))"
    )
    env = dict(os.environ, DEEPNET_CACHE=str(tmp_path))

    def use():
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    first = benchmark.pedantic(use, rounds=1, iterations=1)
    assert first["events"] == ["compiled"]
    loads = [use() for _ in range(5)]
    assert all(r["events"] == ["loaded"] for r in loads)
    cached = statistics.median(r["seconds"] for r in loads)
    benchmark.extra_info.update(first_use_compile_s=first["seconds"], cached_load_s=cached)
    FIGURES.append(("plugin first use (compile) / cached load", {
        "median_s": first["seconds"],
        "summary": f"first use {first['seconds']:.1f} s (compile), cached {cached * 1e3:.0f} ms (median of 5 processes)"}))
