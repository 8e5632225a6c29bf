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

    python bench/mpi_projection.py --c16 6.0e-8 --c16_w32 1.1e-6 --accumulate 0.5
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
                                                            for lat in lats) + f" {'disk floor, 1 host':>20}")
    for name, layers, width, batch, c, hosts in cases:
        micro = max(1, batch // 16)  # micro-batches of 16 samples: what the default cuts at P >= 3
        for p in hosts:
            times = [step_seconds(layers, p, micro, batch, width, c, accumulate, lat, bandwidth) for lat in lats]
            print(f"{name:<34} {p:>5} {micro:>3} " + " ".join(f"{t:>14.2f}" for t in times)
                  + f" {disk_floor(layers, width, disk):>20.0f}")


if __name__ == "__main__":
    fire.Fire(main)
