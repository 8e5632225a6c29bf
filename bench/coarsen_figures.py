"""Coarse-grained inputs against pixels: for each cell side K (1: the pixels), train a fresh model and report
its input dimension, the size of its input head and of the training inputs in RAM, seconds per step and
the test accuracy (the README's table; bench/README.md keeps the raw output).

    python bench/coarsen_figures.py --layers 100_000 --steps 2000 --ks 1,2,3,4 [--decodes ratio,raw]

Each run is a `deepnet train --in-memory --json` subprocess in a temporary directory, one after the other,
so the runs share the machine only with what else runs on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

import fire

from deepnet.data.coarse import cells

MNIST_SIDE, TRAIN_IMAGES = 28, 60_000


def _run(model: str, layers: int, steps: int, k: int, decode: str, seed: int) -> dict:
    args = [sys.executable, "-m", "deepnet", "train", model, "--layers", str(layers), "--steps", str(steps),
            "--in-memory", "--seed", str(seed), "--json", "--quiet", "--no-progress"]
    if k > 1:
        args += ["--coarsen", str(k), "--decode", decode]
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed: {done.stderr.strip()}")
    final = json.loads(done.stdout.strip().splitlines()[-1])
    final["wall_seconds"] = time.perf_counter() - started
    return final


def main(layers: int = 100_000, steps: int = 2000, ks: tuple | int = (1, 2, 3, 4), decodes: tuple | str = ("ratio",),
         seed: int = 0, width: int = 4) -> None:
    """Train one fresh model per (K, decoding) and print the table (and one JSON line per run)."""
    ks = ks if isinstance(ks, tuple) else (ks,)
    decodes = decodes if isinstance(decodes, tuple) else (decodes,)
    rows = []
    with tempfile.TemporaryDirectory(prefix="deepnet-coarsen-") as tmp:
        for k in ks:
            for decode in decodes if k > 1 else ("-",):
                model = os.path.join(tmp, f"k{k}-{decode}.h5")
                final = _run(model, layers, steps, int(k), decode, seed)
                side = cells(MNIST_SIDE, int(k))
                dim = MNIST_SIDE * MNIST_SIDE if k == 1 else 2 * side * side
                row = {"k": k, "decode": decode, "input_dim": dim, "input_head_params": dim * width + width,
                       "input_head_bytes": 4 * (dim * width + width), "inputs_ram_bytes": 4 * dim * TRAIN_IMAGES,
                       "stored_bytes": TRAIN_IMAGES * (dim if k > 1 else MNIST_SIDE * MNIST_SIDE),
                       "seconds_per_step": final["seconds_per_step"], "test_acc": final["test_acc"],
                       "test_loss": final["test_loss"], "layers": layers, "steps": steps}
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(f"\n{layers:,} layers x width {width}, {steps} steps, seed {seed}, {os.cpu_count()} CPUs")
    print("| K | decode | input dim | input head | inputs in RAM (float32) | bytes stored | s/step | test acc |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['k']} | {r['decode']} | {r['input_dim']} | {r['input_head_params']:,} floats "
              f"({r['input_head_bytes'] / 1024:.1f} KiB) | {r['inputs_ram_bytes'] / 1e6:.1f} MB | "
              f"{r['stored_bytes'] / 1e6:.1f} MB | {r['seconds_per_step']:.4f} | {r['test_acc']:.4f} |")


if __name__ == "__main__":
    fire.Fire(main)
