"""LuckMatters' teacher-student claims, measured with deepnet.tools.luckmatters (NumPy, float32 training).

    python bench/luckmatters.py                      # everything (~7-8 min on the 2-vCPU machine)
    python bench/luckmatters.py --seeds 0 --epochs 10 --high_lrs 0.2   # a quicker look (~1 min)
    python bench/luckmatters.py --json out.json      # also save every result dict
    python bench/luckmatters.py --help               # the flags (a fire command line)

Runs (see the docstring of deepnet/tools/luckmatters.py for the settings and their sources):

1. recon_multilayer.py as their README runs it: ks [10, 15, 20, 25], data_d 20, inputs N(0, 10^2) (a fixed set
   of 100,000), student 10x wider, batch 64, lr 0.05, d_output 100, 40 epochs of SGD on the MSE. Claim:
   lowest layer mean best correlation 0.999 "in a few iterations", the second ~0.95.
2. The same with d_output 10 (their note: "d_output = 10 also works ... but not as good as d_output = 100").
3. Higher learning rates (their note: "High lr seems to make it unstable"), fewer epochs.
4. test_multilayer.py's W_row_norm run (1 hidden layer, perturbed student, fan-in normalised every step).
   Claim: the fan-out norms of the teacher-matched units ~1.1-1.5, of the others ~1e-4.

Progress goes to stderr, one line per record; the tables go to stdout at the end.
"""

from __future__ import annotations

import platform
import sys
import time
from pathlib import Path

import fire

from deepnet.tools import luckmatters as lm

STEPS_PER_EPOCH = 1563  # ceil(100,000 / 64)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def progress(name: str):
    started = time.perf_counter()

    def show(row: dict) -> None:
        corr = " ".join(fmt(c) for c in row["best_corr_mean"])
        print(f"[{name}] it {row['iteration']:6d}  heldout {fmt(row['heldout_loss'], '.4g'):>9}  corr {corr}"
              f"  {time.perf_counter() - started:5.0f}s", file=sys.stderr, flush=True)
    return show


def first_epoch_reaching(result: dict, layer: int, level: float) -> str:
    for row in result["records"]:
        value = row["best_corr_mean"][layer] if layer < len(row["best_corr_mean"]) else None
        if value is not None and value >= level:
            return f"{row['iteration'] / STEPS_PER_EPOCH:.2f}"
    return "never"


def trajectory_table(result: dict, epochs: list[float]) -> str:
    wanted = {round(e * STEPS_PER_EPOCH) for e in epochs}
    n_layers = len(result["final"])
    headers = ["epoch", "iter", "train", "heldout"] + [f"L{i} mean/min" for i in range(n_layers)]
    rows = []
    for row in result["records"]:
        if row["iteration"] in wanted or row is result["records"][-1]:
            rows.append([f"{row['iteration'] / STEPS_PER_EPOCH:.2f}", str(row["iteration"]),
                         fmt(row["train_loss"], ".4g"), fmt(row["heldout_loss"], ".4g")]
                        + [f"{fmt(m)}/{fmt(n, '.3f')}" for m, n in zip(row["best_corr_mean"], row["best_corr_min"])])
    return table(headers, rows)


def row_norm_table(diagnostics: list[dict], label: str) -> list[list[str]]:
    rows = []
    for layer in diagnostics:
        split = layer["w_row_norm"]
        m, u, a = split["matched"], split["unmatched"], split["unaligned"]
        rows.append([label, f"L{layer['layer']}", fmt(layer["mean_best_corr"]), fmt(layer["match_count_0.9"], ".1f"),
                     str(m["count"]), fmt(m["mean"], ".3g"), fmt(m["min"], ".3g"),
                     str(u["count"]), fmt(u["mean"], ".3g"), fmt(u["max"], ".3g"),
                     str(a["count"]), fmt(a["mean"], ".3g"), fmt(a["max"], ".3g")])
    return rows


ROW_NORM_HEADERS = ["run", "layer", "best corr", "n>=0.9", "matched", "mean", "min", "unmatched", "mean", "max",
                    "unaligned", "mean", "max"]


def main(seeds: tuple[int, ...] | int = (0, 1), epochs: int = 40, high_lrs: tuple[float, ...] | float = (0.1, 0.2, 0.5),
         high_lr_epochs: int = 10, records_per_epoch: int = 3, json: str | None = None) -> None:  # noqa: A002
    """Run the LuckMatters reproductions and print the tables.

    Args:
        seeds: seeds of the d_output 100 and d_output 10 runs.
        epochs: epochs of those runs (LuckMatters: 40).
        high_lrs: learning rates of the high-lr runs (seed 0, d_output 100).
        high_lr_epochs: epochs of each high-lr run.
        records_per_epoch: correlation records per epoch.
        json: if given, write every result dict to this file.
    """
    seeds = (seeds,) if isinstance(seeds, int) else tuple(seeds)
    high_lrs = (high_lrs,) if isinstance(high_lrs, (int, float)) else tuple(high_lrs)
    if not seeds or epochs < 1 or high_lr_epochs < 1 or records_per_epoch < 1:
        print("luckmatters: error: need at least one seed and positive epochs / records_per_epoch", file=sys.stderr)
        sys.exit(2)
    record_every = max(1, STEPS_PER_EPOCH // records_per_epoch)
    wall_start = time.perf_counter()
    results: dict[str, dict] = {}

    for d_output in (100, 10):
        for seed in seeds:
            name = f"d_output={d_output} lr=0.05 seed={seed}"
            results[name] = lm.reproduce(d_output=d_output, lr=0.05, seed=seed, iterations=epochs * STEPS_PER_EPOCH,
                                         record_every=record_every, on_record=progress(name))
    for lr in high_lrs:
        name = f"d_output=100 lr={lr:g} seed=0"
        results[name] = lm.reproduce(lr=lr, seed=0, iterations=high_lr_epochs * STEPS_PER_EPOCH,
                                     record_every=record_every, on_record=progress(name))
    results["row_norm"] = lm.reproduce_row_norm(on_record=progress("row_norm"))
    total = time.perf_counter() - wall_start

    print(f"CPU: {cpu_name()}; Python {platform.python_version()}; numpy {__import__('numpy').__version__}")
    print(f"total wall-clock {total:.0f} s\n")

    main_name = f"d_output=100 lr=0.05 seed={seeds[0]}"
    print(f"1. recon_multilayer README run ({main_name}): mean/min over teacher units of the best correlation")
    marks = [0, 1 / 3, 2 / 3, 1, 2, 3, 5, 8, 10, 15, 20, 30, 40]
    print(trajectory_table(results[main_name], [e for e in marks if e <= epochs]))
    print()

    print("2. End of every run: mean best correlation per layer (teacher widths 10, 15, 20, 25), first epoch the")
    print("   record reaches L0 >= 0.999 and L1 >= 0.95, held-out MSE, wall-clock")
    rows = []
    for name, result in results.items():
        if name == "row_norm":
            continue
        final = result["final"]
        rows.append([name, f"{result['iterations_done'] / STEPS_PER_EPOCH:.1f}", "yes" if result["diverged"] else "no",
                     fmt(result["records"][-1]["heldout_loss"], ".4g")]
                    + [fmt(layer["mean_best_corr"]) for layer in final]
                    + [first_epoch_reaching(result, 0, 0.999), first_epoch_reaching(result, 1, 0.95),
                       f"{result['seconds']:.0f}s"])
    print(table(["run", "epochs", "nan", "heldout", "L0", "L1", "L2", "L3", "L0>=.999 @ep", "L1>=.95 @ep", "time"],
                rows))
    print()

    print("   d_output 100 vs 10, mean over seeds of the final mean best correlation:")
    rows = []
    for d_output in (100, 10):
        finals = [results[f"d_output={d_output} lr=0.05 seed={s}"]["final"] for s in seeds]
        rows.append([str(d_output)] + [fmt(sum(f[i]["mean_best_corr"] for f in finals) / len(finals))
                                       for i in range(len(finals[0]))]
                    + [fmt(sum(f[i]["min_best_corr"] for f in finals) / len(finals)) for i in range(len(finals[0]))])
    print(table(["d_output", "L0 mean", "L1 mean", "L2 mean", "L3 mean", "L0 min", "L1 min", "L2 min", "L3 min"], rows))
    print()

    print("3. W_row_norm (norm of a student unit's outgoing weights), matched = some teacher unit's best match,")
    print("   unaligned = correlation < 0.9 with every teacher unit; n>=0.9 = student units >= 0.9 per teacher unit")
    rows = row_norm_table(results[main_name]["initial"], "recon start")
    rows += row_norm_table(results[main_name]["final"], "recon end")
    rows += row_norm_table(results["row_norm"]["initial"], "row_norm start")
    rows += row_norm_table(results["row_norm"]["final"], "row_norm end")
    print(table(ROW_NORM_HEADERS, rows))
    print(f"   row_norm run: {results['row_norm']['iterations_done']} steps, final held-out loss "
          f"{fmt(results['row_norm']['records'][-1]['heldout_loss'], '.3g')}, {results['row_norm']['seconds']:.1f}s")

    if json is not None:
        import json as json_module
        Path(json).write_text(json_module.dumps(results, indent=1))
        print(f"\nresults written to {json}")


if __name__ == "__main__":
    fire.Fire(main)
