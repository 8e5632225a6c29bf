"""The recomputed segment's length against the reference step: `deepnet bench` with $DEEPNET_L2_BYTES set to
each size (the engine gives a segment half of it, deepnet.nn.engine), in interleaved rounds so the
machine's drift falls on every size alike. The medians per size, and the segment length each gives.

    python bench/l2_sweep.py --sizes 256K,512K,1M,2M --rounds 3 [--layers 10_000_000] [--steps 5] [--threads 1]

--threads 1 takes the thread choice (one core or two, measured per run) out of the comparison.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import fire

from deepnet.nn.caches import L2_ENV, cache_sizes
from deepnet.nn.engine import choose_save_every


def main(sizes: tuple | str = ("256K", "512K", "1M", "2M"), rounds: int = 3, layers: int = 10_000_000,
         steps: int = 5, width: int = 4, batch: int = 16, threads: int = 0) -> None:
    """Run the sweep and print a JSON line per run, then the medians."""
    sizes = sizes.split(",") if isinstance(sizes, str) else [str(s) for s in sizes]
    times: dict[str, list[float]] = {size: [] for size in sizes}
    segment: dict[str, int] = {}
    for r in range(rounds):
        for size in sizes:
            env = dict(os.environ, **{L2_ENV: size})
            done = subprocess.run([sys.executable, "-m", "deepnet", "bench", "--layers", str(layers), "--width",
                                   str(width), "--batch", str(batch), "--steps", str(steps), "--threads",
                                   str(threads), "--json", "--quiet"],
                                  env=env, capture_output=True, text=True, check=True)
            result = json.loads(done.stdout.strip().splitlines()[-1])
            times[size].append(result["seconds_per_step"])
            os.environ[L2_ENV] = size
            segment[size] = choose_save_every(layers, width, batch, 100_000)
            del os.environ[L2_ENV]
            print(json.dumps({"round": r, "l2": size, "save_every": segment[size],
                              "seconds_per_step": result["seconds_per_step"]}), flush=True)
    print(f"\nthis CPU's caches: {cache_sizes()}; {layers:,} layers, width {width}, batch {batch}, {rounds} rounds, "
          f"threads {threads or 'chosen per run'}")
    print("| L2 given | segment layers | s/step (median of rounds) | each round |")
    print("| --- | --- | --- | --- |")
    for size in sizes:
        print(f"| {size} | {segment[size]} | {statistics.median(times[size]):.3f} | "
              f"{', '.join(f'{t:.3f}' for t in times[size])} |")


if __name__ == "__main__":
    fire.Fire(main)
