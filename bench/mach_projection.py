"""Mach on S hosts, on paper: from a section's measured step time and its message sizes.

    python bench/mach_projection.py measure            # a section's step on one core, in one process
    python bench/mach_projection.py project --c 3.1e-7 --c2 5.5e-7 --overhead 2e-4

``measure`` times MachSection steps (width 4, batch 16, one thread) of a middle section on 1,000 and 1M
layers, with real inputs and no late gradient (batch 16 through the core) and with a late gradient
every step (32 columns): t(n) = overhead + c * n, the overhead (heads, loss, distillation step, Python)
from the 1,000-layer step and c from the 1M-layer one. ``project`` prints, for 10M and 1B layers,
the summed steps per second of S sections on S hosts: each section steps on its own (no waiting), so

    steps/s summed = S / (overhead + (L/S) * (c_mix) + messages)

where c_mix is between c (no late gradient) and c2 (one every step), and a step's messages (a state
and its indices up, a gradient down: 4 w B + 8 B + 4 w B bytes) go out with non-blocking sends, so they
cost their injection time only (bytes / bandwidth) unless a link is saturated.
"""

from __future__ import annotations

import statistics
import time

import fire
import numpy as np

from deepnet.kernels.loader import kernels_for
from deepnet.mach.section import MachSection, queue_links
from deepnet.mach.settings import MachSettings
from deepnet.nn.distill import DistilledInput

WIDTH, BATCH = 4, 16


def _section(layers: int, rng: np.random.Generator) -> tuple[MachSection, list]:
    x = rng.random((2000, 784), dtype=np.float32)
    y = rng.integers(0, 10, 2000)
    heads = {"input_weight": rng.uniform(-0.05, 0.05, (784, WIDTH)).astype(np.float32),
             "input_bias": np.zeros(WIDTH, np.float32),
             "output_weight": rng.uniform(-0.5, 0.5, (WIDTH, 10)).astype(np.float32),
             "output_bias": np.zeros(10, np.float32)}
    params = rng.uniform(-0.001, 0.001, (layers, WIDTH * WIDTH + WIDTH)).astype(np.float32)
    links = queue_links(3)
    section = MachSection(1, 3, params, kernels_for("softsign", WIDTH), WIDTH, 1 / np.sqrt(layers), 1000, BATCH,
                          MachSettings(max_delay=64).check(), {k: v for k, v in heads.items() if k.startswith("output")},
                          DistilledInput.new(heads, 32, rng), rng, x, y, links[1])
    return section, links


def _timed(layers: int, late: bool, steps: int) -> float:
    rng = np.random.default_rng(0)
    section, links = _section(layers, rng)
    times = []
    for i in range(steps):
        links[0].send_up({"id": i, "idx": rng.integers(0, 2000, BATCH),
                          "h": rng.uniform(-0.5, 0.5, (WIDTH, BATCH)).astype(np.float32)})
        if late and i > 0:
            links[2].send_down({"id": i - 1, "g": rng.normal(0, 0.01, (WIDTH, BATCH)).astype(np.float32)})
        started = time.perf_counter()
        section.step(0.01, 0.01)
        times.append(time.perf_counter() - started)
    return statistics.median(times[2:])


def measure(steps: int = 12, rounds: int = 3) -> dict:
    """Median seconds per section step (medians of ``rounds`` interleaved rounds) and the fitted line."""
    sizes = (1_000, 1_000_000)
    found: dict = {}
    for _ in range(rounds):
        for layers in sizes:
            for late in (False, True):
                found.setdefault((layers, late), []).append(_timed(layers, late, steps))
    medians = {key: statistics.median(v) for key, v in found.items()}
    out = {}
    for late, name in ((False, "c"), (True, "c2")):
        small, large = medians[(sizes[0], late)], medians[(sizes[1], late)]
        slope = (large - small) / (sizes[1] - sizes[0])
        out[name] = slope
        out[f"overhead_{name}"] = small - slope * sizes[0]
    out["seconds"] = {f"{layers} layers, {'late gradient' if late else 'no late gradient'}": v
                      for (layers, late), v in medians.items()}
    return out


def project(c: float, c2: float, overhead: float, late_share: float = 0.5, bandwidth: float = 12.5e9,
            hosts: str = "1,2,4,16,64,256,1024") -> None:
    """Print the projection (see the module docstring); ``late_share`` is the fraction of steps that carry
    a late gradient (measured per section by bench/mach_vs_exact.py)."""
    per_layer = (1 - late_share) * c + late_share * c2
    message = (4 * WIDTH * BATCH + 8 * BATCH + 4 * WIDTH * BATCH) / bandwidth
    counts = [int(h) for h in str(hosts).replace("(", "").replace(")", "").split(",") if str(h).strip()]
    print(f"{'layers':>14} {'S':>6} {'s/step a section':>17} {'steps/s summed':>15}")
    for layers in (10_000_000, 1_000_000_000):
        for s in counts:
            step = overhead + layers / s * per_layer + message
            print(f"{layers:>14,} {s:>6} {step:>17.4g} {s / step:>15.4g}")


if __name__ == "__main__":
    fire.Fire({"measure": measure, "project": project})
