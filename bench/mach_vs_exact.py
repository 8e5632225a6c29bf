"""Mach against exact SGD on MNIST at equal wall-clock on this machine's cores (the table of docs/MACH.md).

    python bench/mach_vs_exact.py --layers 100_000 --seconds 60 --test-samples 10000
    python bench/mach_vs_exact.py --layers 10_000_000 --seconds 120 --test-samples 2000

For one depth (width 4, softsign, batch 16, the same seed), each of: exact SGD in one process, exact SGD
pipelined over 2 and over 4 MPI ranks, Mach with 2 and with 4 sections. Every run trains a fresh model for about
``--seconds`` of wall-clock (Mach: --time-limit; exact: the steps that a 20-step calibration run says fit
in that time), then evaluates the first ``--test-samples`` test images. Prints one JSON line per run and
a table. Needs the [mpi] extra and MNIST in $DEEPNET_DATA.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fire

import deepnet

MPIEXEC = shutil.which("mpiexec", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def _run(command: list[str]) -> tuple[dict, float]:
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed: {proc.stderr.strip()[-2000:]}")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return rows[-1], wall


def _deepnet(ranks: int, *args: str) -> list[str]:
    head = [sys.executable, "-m", "deepnet"]
    if ranks == 1:
        return head + list(args)
    return [MPIEXEC, "-n", str(ranks)] + head + list(args)


def _fresh(base: Path, name: str, ranks: int) -> Path:
    path = base / f"{name}.h5"
    if ranks == 1:
        shutil.copy(base / "base.h5", path)
    else:
        deepnet.shard(base / "base.h5", ranks=ranks, out=path)
    return path


def main(layers: int = 100_000, seconds: float = 60.0, test_samples: int = 10_000, width: int = 4,
         max_delay: int | None = None, workdir: str | None = None) -> None:
    """Measure; see the module docstring."""
    base = Path(tempfile.mkdtemp(dir=workdir, prefix="mach-vs-exact-"))
    common = ["--batch", "16", "--json", "--no-progress", "--report-every", "1000000"]
    results = []
    try:
        deepnet.init(base / "base.h5", layers=layers, width=width, activation="softsign", seed=0)
        for name, ranks in (("exact-1", 1), ("exact-pipelined-2", 2), ("exact-pipelined-4", 4)):
            calib = _fresh(base, f"{name}-calib", ranks)
            final, _ = _run(_deepnet(ranks, "train", str(calib), "--steps", "20", "--test-samples", "0", *common))
            steps = max(20, int(seconds / final["seconds_per_step"]))
            model = _fresh(base, name, ranks)
            final, wall = _run(_deepnet(ranks, "train", str(model), "--steps", str(steps), "--test-samples",
                                        str(test_samples), *common))
            row = {"run": name, "layers": layers, "train_seconds": final["seconds"], "steps": final["steps"],
                   "steps_per_s_summed": final["steps"] / final["seconds"], "test_acc": final["test_acc"],
                   "waited_per_step": [r["waited_per_step"] for r in final.get("per_rank", [])]}
            results.append(row)
            print(json.dumps(row), flush=True)
        for sections in (2, 4):
            model = _fresh(base, f"mach-{sections}", sections)
            extra = [] if max_delay is None else ["--max-delay", str(max_delay)]
            final, wall = _run(_deepnet(sections, "train", str(model), "--mode", "mach", "--sections", str(sections),
                                        "--steps", "1000000000", "--time-limit", str(seconds), "--test-samples",
                                        str(test_samples), *extra, *common))
            per = final["per_section"]
            row = {"run": f"mach-{sections}", "layers": layers, "train_seconds": final["seconds"],
                   "steps": final["steps"], "steps_per_s_summed": final["steps_per_s_summed"],
                   "section_steps_per_wall_s": final["section_steps_per_wall_s"],
                   "test_acc": final["test_acc"],
                   "sections": [{k: p.get(k) for k in ("section", "steps_per_s", "blocked_seconds", "dropped",
                                                       "unanswered", "late_applied", "real_inputs",
                                                       "synthetic_inputs", "test_acc", "synthetic_test_acc",
                                                       "sent_bytes_per_step", "seconds", "end_wait_seconds",
                                                       "steps")} for p in per]}
            results.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"\n{'run':<20} {'layers':>11} {'train s':>8} {'steps':>7} {'steps/s':>8} {'test acc':>8}")
    for r in results:
        print(f"{r['run']:<20} {r['layers']:>11,} {r['train_seconds']:>8.1f} {r['steps']:>7} "
              f"{r['steps_per_s_summed']:>8.2f} {r['test_acc']:>8.4f}")
        for p in r.get("sections", []):
            synthetic = "" if p["synthetic_test_acc"] is None else f" synthetic {p['synthetic_test_acc']:.4f}"
            print(f"    section {p['section']}: {p['steps_per_s']:.2f} steps/s, blocked {p['blocked_seconds']:.3f} s, "
                  f"idle at the end {p['end_wait_seconds']:.1f} s, "
                  f"dropped {p['dropped']}, unanswered {p['unanswered']}, applied {p['late_applied']}, "
                  f"real {p['real_inputs']}/{p['real_inputs'] + p['synthetic_inputs']}, "
                  f"head {p['test_acc']:.4f}{synthetic}, {p['sent_bytes_per_step']:.0f} B/step")


if __name__ == "__main__":
    fire.Fire(main)
