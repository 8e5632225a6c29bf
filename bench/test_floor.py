"""The reference step (10M layers, width 4, softsign, batch 16, in RAM) and the evaluation of 1024 inputs
through it, each beside the limit kernel and the arithmetic floor, in one run (issue 23): deepnet's seconds
per step (images a second), the limit kernel's two-thread step (evaluation, ``infer``; ../shared/limit,
compiled here) measured right after it, and the floor computed from the instruction counts of the build
that ran (bench/floor.py), with the machine in ``extra_info``: CPU model, ISA build, cores, L1d and L2
sizes, the clock measured by a chain of dependent adds (and, for evaluation, the divider's rate).

Under --benchmark-disable (CI) it runs once at 20,000 layers, as a smoke test of the benchmark itself.
"""

from __future__ import annotations

import numpy as np

import floor
from benchlib import record, run_pedantic, time_train_steps
from deepnet.api import init
from deepnet.nn.network import DeepNet

FULL_LAYERS = 10_000_000
SMOKE_LAYERS = 20_000
WIDTH, BATCH, ACTIVATION = 4, 16, "softsign"
#: Inputs one timed evaluation runs through the layers at once (the CLI's evaluation batch).
EVAL_SAMPLES = 1024


def _reference_model(benchmark, model_dir):
    """The reference model (the smoke test's depth under --benchmark-disable): its path and depth."""
    layers = SMOKE_LAYERS if benchmark.disabled else FULL_LAYERS
    path = model_dir / f"floor-L{layers}.h5"
    if not path.exists():
        init(path, layers=layers, width=WIDTH, activation=ACTIVATION, seed=0, progress=False)
    return path, layers


def test_reference_step_floor_and_limit(benchmark, model_dir):
    """deepnet's step, the limit kernel's and the floor, as ratios to each other (nothing asserts a time)."""
    benchmark.group = "floor: the reference step beside the limit kernel and the arithmetic floor"
    path, layers = _reference_model(benchmark, model_dir)
    with DeepNet.open(path, writable=True, in_memory=True) as net:
        assert np.isfinite(time_train_steps(benchmark, net, BATCH).loss)
        threads = net.engine.threads
        # what the last timed step ran, as `deepnet bench` reports it
        used = {"threads_used": dict(net.engine.threads_used), "backward_block": net.engine.backward_block_used,
                "backward_split": net.engine.backward_split_used}
    facts = floor.machine_facts()
    median = record(benchmark, layer_samples=layers * BATCH, layers=layers, width=WIDTH, batch=BATCH,
                    activation=ACTIVATION, threads=threads, **used, **facts)
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


def test_evaluation_floor_and_limit(benchmark, model_dir):
    """deepnet's evaluation of EVAL_SAMPLES inputs, the limit kernel's (``infer``, two threads) and the
    evaluation floor at the divider's measured rate, as images a second and ratios (nothing asserts a time)."""
    benchmark.group = "floor: evaluation beside the limit kernel and the arithmetic floor"
    path, layers = _reference_model(benchmark, model_dir)
    with DeepNet.open(path, in_memory=True) as net:
        x = np.random.default_rng(0).random((EVAL_SAMPLES, net.input_dim), dtype=np.float32)
        logits = run_pedantic(benchmark, lambda: net.logits(x))
        assert logits.shape == (EVAL_SAMPLES, net.file.n_classes) and np.isfinite(logits).all()
        threads = net.engine.threads
    facts = floor.machine_facts()
    median = record(benchmark, layer_samples=layers * EVAL_SAMPLES, layers=layers, width=WIDTH,
                    samples=EVAL_SAMPLES, activation=ACTIVATION, threads=threads, **facts)
    limit = floor.run_limit_infer(facts["build"], layers, EVAL_SAMPLES, reps=1 if benchmark.disabled else 3)
    if limit is not None:
        benchmark.extra_info.update({k: v for k, v in limit.items() if k != "limit_output"})
    divider = floor.measure_divider()
    if divider is None:
        return
    benchmark.extra_info.update(divider)
    per_lane = floor.division_cycles_per_lane(facts["build"], divider)
    bound = floor.eval_floor_seconds(layers=layers, width=WIDTH, samples=EVAL_SAMPLES, activation=ACTIVATION,
                                     lanes_per_cycle=facts["fma_lanes_per_cycle"], cores=facts["cores"],
                                     clock_hz=divider["clock_ghz"] * 1e9, division_cycles_per_lane=per_lane)
    benchmark.extra_info.update(bound)
    if median is not None:
        limit_s = (limit or {}).get("limit_eval_s")
        benchmark.extra_info.update(
            eval_images_per_s=EVAL_SAMPLES / median, deepnet_over_floor=median / bound["eval_floor_s"],
            summary=(f"deepnet {EVAL_SAMPLES / median:.0f} images/s, limit "
                     f"{'-' if not limit_s else f'{EVAL_SAMPLES / limit_s:.0f}'} images/s, floor "
                     f"{bound['eval_floor_images_per_s']:.0f} images/s at {divider['clock_ghz']:.2f} GHz "
                     f"({facts['build']}, {facts['cores']} cores; divider {divider['div8_cycles']:.1f} cycles a "
                     f"8-lane division)"))
        if limit_s:
            benchmark.extra_info.update(deepnet_over_limit=median / limit_s,
                                        limit_over_floor=limit_s / bound["eval_floor_s"])


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
    # from width 16 at batch 16 the forward's FMA lanes outlast its chain (82 cycles at width 16)
    w32 = floor.floor_seconds(layers=1, width=32, batch=16, activation="softsign", lanes_per_cycle=16,
                              cores=2, clock_hz=1.0)
    assert w32["forward_chain_cycles_per_layer"] == 146 and w32["forward_cycles_per_layer"] == 512
    assert w32["floor_s"] == 512 + 1536


def test_eval_floor_model():
    """The evaluation floor: the busier of the FMA pipes and the divider, per sample and layer."""
    zen4 = {"div8_cycles": 3.0, "div16_cycles": 6.0}
    assert floor.division_cycles_per_lane("avx512", zen4) == 0.375
    assert floor.division_cycles_per_lane("avx2", {"div8_cycles": 4.0, "div16_cycles": None}) == 0.5
    assert floor.division_cycles_per_lane("avx2", {"div8_cycles": 4.0, "div16_cycles": 2.0}) == 0.5   # no zmm there
    assert floor.division_cycles_per_lane("avx512", {"div8_cycles": 4.0, "div16_cycles": 4.0}) == 0.25
    kw = dict(layers=10_000_000, width=4, samples=1024, lanes_per_cycle=16, cores=2, clock_hz=3.5e9,
              division_cycles_per_lane=0.375)
    softsign = floor.eval_floor_seconds(activation="softsign", **kw)
    assert softsign["eval_fma_cycles_per_sample_layer"] == 20 / 16
    assert softsign["eval_division_cycles_per_sample_layer"] == 1.5          # the divider bounds it
    assert abs(softsign["eval_floor_s"] - 10_000_000 * 1024 * 1.5 / (2 * 3.5e9)) < 1e-9
    assert abs(softsign["eval_floor_images_per_s"] * softsign["eval_floor_s"] - 1024) < 1e-6
    relu = floor.eval_floor_seconds(activation="relu", **kw)                    # no division: the FMA pipes
    assert relu["eval_division_cycles_per_sample_layer"] == 0
    assert abs(relu["eval_floor_s"] - 10_000_000 * 1024 * 1.25 / (2 * 3.5e9)) < 1e-9
