"""The reference step (10M layers, width 4, softsign, batch 16, in RAM) beside the limit kernel and the
arithmetic floor, in one run (issue 23): deepnet's seconds per step, the limit kernel's two-thread step
(../shared/limit, compiled here) measured right after it, and the floor computed from the instruction
counts of the build that ran (bench/floor.py), with the machine in ``extra_info``: CPU model, ISA build,
cores, L1d and L2 sizes, the clock measured by a chain of dependent adds.

Under --benchmark-disable (CI) it runs once at 20,000 layers, as a smoke test of the benchmark itself.
"""

from __future__ import annotations

import numpy as np

import floor
from benchlib import record, time_train_steps
from deepnet.api import init
from deepnet.nn.network import DeepNet

FULL_LAYERS = 10_000_000
SMOKE_LAYERS = 20_000
WIDTH, BATCH, ACTIVATION = 4, 16, "softsign"


def test_reference_step_floor_and_limit(benchmark, model_dir):
    """deepnet's step, the limit kernel's and the floor, as ratios to each other (nothing asserts a time)."""
    benchmark.group = "floor: the reference step beside the limit kernel and the arithmetic floor"
    layers = SMOKE_LAYERS if benchmark.disabled else FULL_LAYERS
    path = model_dir / f"floor-L{layers}.h5"
    if not path.exists():
        init(path, layers=layers, width=WIDTH, activation=ACTIVATION, seed=0, progress=False)
    with DeepNet.open(path, writable=True, in_memory=True) as net:
        assert np.isfinite(time_train_steps(benchmark, net, BATCH).loss)
        threads = net.engine.threads
    facts = floor.machine_facts()
    median = record(benchmark, layer_samples=layers * BATCH, layers=layers, width=WIDTH, batch=BATCH,
                    activation=ACTIVATION, threads=threads, **facts)
    limit = floor.run_limit_kernel(facts["build"], layers, reps=1 if benchmark.disabled else 5)
    if limit is not None:
        benchmark.extra_info.update({k: v for k, v in limit.items() if k != "limit_output"})
    clock = (limit or {}).get("clock_ghz")
    if clock:
        bound = floor.floor_seconds(layers=layers, width=WIDTH, batch=BATCH, activation=ACTIVATION,
                                    lanes_per_cycle=facts["fma_lanes_per_cycle"], cores=facts["cores"],
                                    clock_hz=clock * 1e9)
        benchmark.extra_info.update(bound)
        if median is not None:
            ratios = {"deepnet_over_floor": median / bound["floor_s"]}
            if limit.get("limit_s_per_step"):
                ratios["deepnet_over_limit"] = median / limit["limit_s_per_step"]
                ratios["limit_over_floor"] = limit["limit_s_per_step"] / bound["floor_s"]
            benchmark.extra_info.update(ratios, summary=(
                f"deepnet {median:.3f} s, limit {limit.get('limit_s_per_step')} s, floor {bound['floor_s']:.3f} s "
                f"at {clock:.2f} GHz ({facts['build']}, {facts['cores']} cores, L2 {facts['l2_bytes']} B)"))


def test_floor_model():
    """The floor's arithmetic (issue 23's figures) and the FMA datapath per kind of CPU."""
    assert floor.fma_lanes_per_cycle("avx2", "AuthenticAMD", 25) == 16          # Zen 3
    assert floor.fma_lanes_per_cycle("avx512", "AuthenticAMD", 25) == 16        # Zen 4: two 256-bit pipes
    assert floor.fma_lanes_per_cycle("avx512", "AuthenticAMD", 26) == 32        # Zen 5
    assert floor.fma_lanes_per_cycle("avx512", "GenuineIntel", 6) == 32         # Sapphire Rapids
    assert floor.fma_lanes_per_cycle("avx2", "GenuineIntel", 6) == 16
    zen3 = floor.floor_seconds(layers=10_000_000, width=4, batch=16, activation="softsign", lanes_per_cycle=16,
                               cores=2, clock_hz=3e9)
    assert zen3["forward_chain_cycles_per_layer"] == 34 and zen3["backward_cycles_per_layer"] == 24
    assert abs(zen3["floor_s"] - 10_000_000 * 58 / 3e9) < 1e-12
    wide = floor.floor_seconds(layers=10_000_000, width=4, batch=16, activation="softsign", lanes_per_cycle=32,
                               cores=2, clock_hz=3e9)
    assert wide["backward_cycles_per_layer"] == 12 and wide["floor_forward_s"] == zen3["floor_forward_s"]
