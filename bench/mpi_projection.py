"""The step time of the depth split on a cluster, on paper, from constants measured on one machine.

GPipe over P ranks with M micro-batches of n = B / M samples: each rank's forward and backward of one
micro-batch through its L / P layers takes tau = (L / P) * c(n) * (1 + a [M > 1]), where c(n) is the
measured seconds per layer per micro-batch (forward + backward, one core) and a the measured cost of the
gradient sums of M > 1; the forward and the backward phases each take M + P - 1 such slots, and every
slot boundary carries one message of s = 4 w n bytes (latency lam, bandwidth bw); once a step an
all-reduce of a few numbers costs 2 ceil(log2 P) lam:

    T(P, M) = (M + P - 1) * (tau + 2 * (lam + s / bw)) + 2 * ceil(log2 P) * lam

The streamed floor of one machine for the same model: the core read forward, read again backward and
written once, 3 * L * 4 (w^2 + w) bytes at the disk's speed.

    python bench/mpi_projection.py measure                 # c(16) at widths 4 and 32, and a, on one core
    python bench/mpi_projection.py project --c16 6.0e-8 --c16_w32 1.1e-6 --accumulate 0.5
"""

from __future__ import annotations

import math

import fire


def step_seconds(layers: int, ranks: int, micro: int, batch: int, width: int, c_layer: float, accumulate: float,
                 latency: float, bandwidth: float) -> float:
    """T(P, M) of the module docstring."""
    n = batch / micro
    tau = layers / ranks * c_layer * (micro * n / batch) * (1 + accumulate * (micro > 1))
    message = latency + 4 * width * n / bandwidth
    return (micro + ranks - 1) * (tau + 2 * message) + 2 * math.ceil(math.log2(max(ranks, 2))) * latency


def disk_floor(layers: int, width: int, disk_bytes_per_s: float) -> float:
    """Seconds per streamed step on one machine: the core read twice and written once."""
    return 3 * layers * 4 * (width * width + width) / disk_bytes_per_s


def _time_core(layers: int, width: int, sizes: list[int], repeats: int) -> float:
    """Median seconds of one rank's forward and backward of micro-batches ``sizes`` (one core, in RAM)."""
    import time

    import numpy as np

    from deepnet.distributed.pipeline import RankCore
    from deepnet.kernels.loader import kernels_for

    rng = np.random.default_rng(0)
    params = rng.uniform(-1e-3, 1e-3, (layers, width * width + width)).astype(np.float32)
    core = RankCore(params, kernels_for("softsign", width), width, layers ** -0.5, 100_000, sizes)
    times = []
    for _ in range(repeats + 1):
        states = [rng.standard_normal((width, n)).astype(np.float32) * 0.1 for n in sizes]
        started = time.perf_counter()
        for m, h in enumerate(states):
            core.forward(h, m)
        for m, h in enumerate(states):
            core.backward(h * 1e-3, m, 0.0)
        core.apply(0.0)
        times.append(time.perf_counter() - started)
    return sorted(times[1:])[len(times[1:]) // 2]


def measure(layers: int = 1_000_000, layers_w32: int = 50_000, repeats: int = 3) -> None:
    """Measure c(16) at widths 4 and 32 and the cost of the gradient sums (a), on one core of this machine."""
    c16 = _time_core(layers, 4, [16], repeats) / layers
    two = _time_core(layers, 4, [16, 16], repeats) / layers
    c16_w32 = _time_core(layers_w32, 32, [16], repeats) / layers_w32
    print(f"c16 {c16:.3e} s/layer (width 4), c16_w32 {c16_w32:.3e} s/layer (width 32), "
          f"accumulate {two / (2 * c16) - 1:.3f} (M = 2 of 16 against two M = 1 steps)")


def main(c16: float, c16_w32: float, accumulate: float, latencies: str = "5e-6,50e-6", bandwidth: float = 12.5e9,
         disk: float = 1.8e9) -> None:
    """Print the projections. c16/c16_w32: seconds per layer per 16-sample micro-batch (forward + backward,
    one core) at width 4 / 32; accumulate: the measured extra cost of M > 1; bandwidth in bytes/s."""
    lats = [float(x) for x in (latencies if isinstance(latencies, (tuple, list)) else str(latencies).split(","))]
    cases = [("1B layers, width 4, batch 16", 1_000_000_000, 4, 16, c16, (16, 64, 256)),
             ("1B layers, width 4, batch 256", 1_000_000_000, 4, 256, c16, (16, 64, 256)),
             ("100M layers, width 32, batch 16", 100_000_000, 32, 16, c16_w32, (32,)),
             ("100M layers, width 32, batch 256", 100_000_000, 32, 256, c16_w32, (32,))]
    print(f"{'model':<34} {'hosts':>5} {'M':>3} " + " ".join(f"{'s/step @' + format(lat * 1e6, 'g') + 'us':>14}"
                                                            for lat in lats)
          + f" {'disk floor':>10} {'1 host, streamed':>16} {'speed-up':>8}")
    for name, layers, width, batch, c, hosts in cases:
        micro = max(1, batch // 16)  # micro-batches of 16 samples: what the default cuts at P >= 3
        floor = disk_floor(layers, width, disk)
        one_host = max(floor, layers * c * batch / 16)  # the disk or the same core's arithmetic, whichever is slower
        for p in hosts:
            times = [step_seconds(layers, p, micro, batch, width, c, accumulate, lat, bandwidth) for lat in lats]
            print(f"{name:<34} {p:>5} {micro:>3} " + " ".join(f"{t:>14.2f}" for t in times)
                  + f" {floor:>10.0f} {one_host:>16.0f} {one_host / times[-1]:>8.1f}")


if __name__ == "__main__":
    fire.Fire({"project": main, "measure": measure})
