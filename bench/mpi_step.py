"""The depth split's step on this machine: seconds per step with P = 1 (one process, in RAM) and P ranks
under mpiexec, the time each rank waited on messages and the bytes it sent per step.

    python bench/mpi_step.py --layers 10_000_000 --batches 16,64 --ranks 2 --steps 6 --rounds 3

Each configuration runs ``--rounds`` times, interleaved; a run's figure is the median of its steps'
seconds after the first two (the warm-up); the printed figure is the median over rounds. Prints one
JSON line per run and a table at the end. Needs the [mpi] extra and MNIST in $DEEPNET_DATA.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import fire

import deepnet
from deepnet.formats import shards


def _run(command: list[str]) -> list[dict]:
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {proc.stderr.strip()}")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def _figures(rows: list[dict]) -> dict:
    steps = [r["seconds_per_step"] for r in rows if r.get("event") == "report"][2:]
    final = rows[-1]
    out = {"seconds_per_step": statistics.median(steps), "steps_timed": len(steps)}
    for rank in final.get("per_rank", []):
        out[f"rank{rank['rank']}_waited_per_step"] = rank["waited_per_step"]
        out[f"rank{rank['rank']}_sent_bytes_per_step"] = rank["sent_bytes_per_step"]
    if "micro_batches" in final:
        out["micro_batches"] = final["micro_batches"]
    return out


def _ints(value: object) -> list[int]:
    """fire hands "16,64" over as a tuple, "16" as an int and "" as a string."""
    items = value if isinstance(value, (tuple, list)) else str(value).split(",")
    return [int(item) for item in items if str(item).strip()]


def main(layers: int = 10_000_000, batches: str = "16,64", ranks: int = 2, steps: int = 6, rounds: int = 3,
         micro_batches: str = "", workdir: str | None = None) -> None:
    """Measure; see the module docstring. micro_batches: comma-separated counts to try (default: deepnet's)."""
    mpiexec = shutil.which("mpiexec", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    base = Path(tempfile.mkdtemp(dir=workdir, prefix="mpi-step-"))
    try:
        model = base / "m.h5"
        deepnet.init(model, layers=layers, width=4, activation="softsign", seed=0)
        root = base / "root.h5"
        shards.shard_model(model, ranks, root)
        batch_list = _ints(batches)
        micro_list = _ints(micro_batches) or [0]
        common = ["--test-samples", "0", "--report-every", "1", "--json", "--checkpoint-every", "100000"]
        results: dict[tuple, list[dict]] = {}
        for round_ in range(rounds):
            for batch in batch_list:
                one = base / "one.h5"
                shutil.copy(model, one)
                rows = _run([sys.executable, "-m", "deepnet", "train", str(one), "--steps", str(steps), "--batch",
                             str(batch), "--in-memory", *common])
                fig = _figures(rows)
                results.setdefault((1, batch, 1), []).append(fig)
                print(json.dumps({"ranks": 1, "batch": batch, "round": round_, **fig}), flush=True)
                for micro in micro_list:
                    run_root = base / "run.h5"
                    shards.shard_model(model, ranks, run_root, overwrite=True)
                    extra = ["--micro-batches", str(micro)] if micro else []
                    rows = _run([mpiexec, "-n", str(ranks), sys.executable, "-m", "deepnet", "train", str(run_root),
                                 "--steps", str(steps), "--batch", str(batch), *extra, *common])
                    fig = _figures(rows)
                    results.setdefault((ranks, batch, fig.get("micro_batches", micro)), []).append(fig)
                    print(json.dumps({"ranks": ranks, "batch": batch, "round": round_, **fig}), flush=True)
        print(f"\n{'ranks':>5} {'batch':>5} {'micro':>5} {'s/step':>8} {'waited/step (per rank)':>28} "
              f"{'bytes sent/step':>20}")
        for (p, batch, micro), figs in sorted(results.items()):
            median = statistics.median(f["seconds_per_step"] for f in figs)
            waited = " ".join(f"{statistics.median(f[f'rank{r}_waited_per_step'] for f in figs):.4f}"
                              for r in range(p) if f"rank{r}_waited_per_step" in figs[0])
            sent = " ".join(f"{statistics.median(f[f'rank{r}_sent_bytes_per_step'] for f in figs):,.0f}"
                            for r in range(p) if f"rank{r}_sent_bytes_per_step" in figs[0])
            print(f"{p:>5} {batch:>5} {micro:>5} {median:>8.4f} {waited or '-':>28} {sent or '-':>20}")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    fire.Fire(main)
