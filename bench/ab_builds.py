"""This tree's kernels against another tree's, timed in turn in one process: the reference backward (or
forward) of one build of each, round after round in alternating order, so that a shared machine's slow
stretches fall on both alike. Prints each one's median and fastest round and the pairwise ratios
other / this (their median and quartiles), or JSON with --json-out.

    git worktree add /tmp/before HEAD~1 && (cd /tmp/before && python setup.py build_ext --inplace)
    python bench/ab_builds.py /tmp/before [--build avx512] [--kind backward] [--rounds 12] [--layers 10_000_000]
    python bench/ab_builds.py . --build avx2 --block 8 --split blocks --other-block 16 --other-split segments

The other tree's module is copied to a temporary directory and loaded under its own name, so both run in
this process through the same Python code (deepnet.kernels.loader); only their compiled loops differ. The
weights are random and unchanged (lr = 0), the chunks are the engine's in RAM (1M layers a call), and the
segment length is the engine's for this CPU's L2. The other side may run its own batch block and split
(--other-block, --other-split), so that one tree's two ways of running a backward can be timed in turn
(OTHER "."). Separate processes in turn drift apart on a shared machine; how closely two copies of one
build agree this way is in bench/README.md (the A/A check).
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

import numpy as np

import devcli  # bench/, the script's directory
from deepnet.errors import ConfigError
from deepnet.kernels import builds
from deepnet.kernels.loader import LayerKernels, builtin_module
from deepnet.nn.engine import MIN_SPLIT_BLOCK, choose_save_every
from deepnet.nn.stores import IN_MEMORY_CHUNK_LAYERS

KINDS = ("backward", "forward")
SPLITS = ("blocks", "segments")


def _other_module(tree: Path, module_name: str, scratch: Path) -> ModuleType:
    """The build ``module_name`` of the deepnet package in ``tree``, loaded from a copy under its own name."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    source = tree / "deepnet" / f"{module_name}{suffix}"
    if not source.is_file():
        raise ConfigError(f"{tree} has no built deepnet/{module_name}{suffix} (run `python setup.py build_ext "
                          f"--inplace` there)")
    copy = scratch / source.name
    shutil.copyfile(source, copy)   # a second file: dlopen would hand back this tree's own module for the same path
    name = f"ab_other.{module_name}"
    spec = importlib.util.spec_from_file_location(name, copy)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module      # the compiled module's initialisation looks itself up there
    spec.loader.exec_module(module)
    return module


def _run(kernels: LayerKernels, kind: str, params: np.ndarray, h0: np.ndarray, g0: np.ndarray, saves: np.ndarray,
         save_every: int, alpha: float, threads: int, block: int, split: str) -> float:
    """Seconds of one pass over every chunk, as the engine calls the kernels in RAM (the forward pass's
    threads each take their share of the batch through every chunk, in blocks of 8 samples)."""
    layers = params.shape[0]
    h, g = h0.copy(), g0.copy()
    n_parts = min(threads, h.shape[1] // MIN_SPLIT_BLOCK) if h.shape[1] >= 2 * MIN_SPLIT_BLOCK else 1

    def forward_part(part: int) -> None:
        for start in range(0, layers, IN_MEMORY_CHUNK_LAYERS):
            stop = min(layers, start + IN_MEMORY_CHUNK_LAYERS)
            kernels.forward(params[start:stop], h, alpha, saves[start // save_every:], save_every, None, part,
                            n_parts)

    started = time.perf_counter()
    if kind == "forward":
        with ThreadPoolExecutor(max_workers=n_parts) as pool:
            for done in [pool.submit(forward_part, part) for part in range(n_parts)]:
                done.result()
    else:
        for stop in range(layers, 0, -IN_MEMORY_CHUNK_LAYERS):
            start = max(0, stop - IN_MEMORY_CHUNK_LAYERS)
            kernels.backward(params[start:stop], saves[start // save_every:], save_every, g, alpha, 0.0, None,
                             threads, block, split)
    return time.perf_counter() - started


def compare(other: str | Path, build: str = "avx512", kind: str = "backward", activation: str = "softsign",
            layers: int = 10_000_000, width: int = 4, batch: int = 16, rounds: int = 12, threads: int = 2,
            block: int = 16, split: str = "segments", other_block: int | None = None,
            other_split: str | None = None) -> dict:
    """Both trees' timings, round by round (validated first; nothing is loaded before the arguments pass)."""
    tree = Path(other)
    other_block = block if other_block is None else other_block
    other_split = split if other_split is None else other_split
    if kind not in KINDS:
        raise ConfigError(f"--kind must be {' or '.join(KINDS)}, got {kind!r}")
    for flag, value in (("--split", split), ("--other-split", other_split)):
        if value not in SPLITS:
            raise ConfigError(f"{flag} must be {' or '.join(SPLITS)}, got {value!r}")
    for flag, value, least in (("--layers", layers, 1), ("--width", width, 1), ("--batch", batch, 1),
                               ("--rounds", rounds, 2), ("--threads", threads, 1)):
        if not isinstance(value, int) or value < least:
            raise ConfigError(f"{flag} must be an integer >= {least}, got {value!r}")
    if build not in builds.CHOICES[1:]:
        raise ConfigError(f"--build must be one of {', '.join(builds.CHOICES[1:])}, got {build!r}")
    if not (tree / "deepnet").is_dir():
        raise ConfigError(f"{tree} is not a deepnet source tree (no deepnet/ in it)")
    this_module = builtin_module(build)   # an ActivationError (one line) if this CPU or install lacks it
    with tempfile.TemporaryDirectory(prefix="deepnet-ab-") as scratch:
        other_module = _other_module(tree, builds.by_name(build).module, Path(scratch))
    sides = {}
    for label, module in (("this", this_module), ("other", other_module)):
        if activation not in module.ACTIVATION_NAMES:
            raise ConfigError(f"--activation must be a built-in of both trees, got {activation!r}")
        sides[label] = LayerKernels(activation, module, module.activation_index(activation))
    if block not in sides["this"].backward_blocks(width):
        raise ConfigError(f"--block {block} is not a batch block this build runs at width {width}")
    if other_block not in sides["other"].backward_blocks(width):
        raise ConfigError(f"--other-block {other_block} is not a batch block the other build runs at width {width}")
    ways = {"this": (block, split), "other": (other_block, other_split)}

    rng = np.random.default_rng(0)
    params = rng.uniform(-1e-3, 1e-3, (layers, width * width + width)).astype(np.float32)
    h0 = np.tanh(rng.standard_normal((width, batch))).astype(np.float32)
    g0 = (rng.standard_normal((width, batch)) * 1e-2).astype(np.float32)
    save_every = choose_save_every(layers, width, batch, IN_MEMORY_CHUNK_LAYERS)
    saves = np.empty((-(-layers // save_every), width * batch), np.float32)
    alpha = 1.0 / np.sqrt(layers)
    _run(sides["this"], "forward", params, h0, g0, saves, save_every, alpha, threads, block, split)  # saves
    seconds: dict[str, list[float]] = {"this": [], "other": []}
    for r in range(rounds + 1):   # round 0 warms both up and is not kept
        for label in (("this", "other") if r % 2 else ("other", "this")):
            took = _run(sides[label], kind, params, h0, g0, saves, save_every, alpha, threads, *ways[label])
            if r:
                seconds[label].append(took)
    ratios = [o / t for o, t in zip(seconds["other"], seconds["this"])]
    quartiles = statistics.quantiles(ratios, n=4)   # rounds >= 2
    return {"kind": kind, "build": build, "activation": activation, "layers": layers, "width": width,
            "batch": batch, "threads": threads, "block": block, "split": split, "other_block": other_block,
            "other_split": other_split, "save_every": save_every,
            "other": str(tree), "seconds": seconds,
            "median": {k: statistics.median(v) for k, v in seconds.items()},
            "fastest": {k: min(v) for k, v in seconds.items()},
            "ratio_other_over_this": {"median": statistics.median(ratios), "q1": quartiles[0], "q3": quartiles[2]}}


def main(other: str, build: str = "avx512", kind: str = "backward", activation: str = "softsign",
         layers: int = 10_000_000, width: int = 4, batch: int = 16, rounds: int = 12, threads: int = 2,
         block: int = 16, split: str = "segments", other_block: int | None = None, other_split: str | None = None,
         json_out: bool = False) -> None:
    """Time this tree's build against OTHER's (a deepnet source tree with its modules built in place) in
    alternating rounds, the other with its own block and split if given; print the medians, the fastest
    rounds and the pairwise ratios other / this."""
    result = compare(other, build, kind, activation, layers, width, batch, rounds, threads, block, split,
                     other_block, other_split)
    if json_out:
        print(json.dumps(result))
        return
    print(f"{kind}, {build} build, {activation}, {layers} layers x width {width}, batch {batch}, "
          f"{threads} thread(s), segments of {result['save_every']}, {rounds} rounds")
    for label, name, way in (("this", "this tree", (block, split)),
                             ("other", str(other), (result["other_block"], result["other_split"]))):
        print(f"  {name:<30} block {way[0]:>2}, {way[1]:<8}  median {result['median'][label]:.4f} s  "
              f"fastest {result['fastest'][label]:.4f} s")
    ratio = result["ratio_other_over_this"]
    print(f"  other / this, pairwise: median {ratio['median']:.3f} (quartiles {ratio['q1']:.3f}-{ratio['q3']:.3f})")


if __name__ == "__main__":
    devcli.run(main, "ab_builds")
