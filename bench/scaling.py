"""Seconds per step against depth and against width, with the line each should follow from the
arithmetic floor (bench/floor.py), measured with `deepnet bench` one configuration after the other.

    python bench/scaling.py --plot docs/img/scaling-zen3.png [--depths 1e6,3e6,1e7,3e7,1e8] [--widths 4,8,16,32,64]

Depth: width 4, softsign, batch 16, in RAM. Width: the depth set so a step takes about a second at the
floor's rate (per-layer figures are compared). Prints one JSON line per run, then a table; draws both
panels (log-log) with the floor, and the floor times the ratio measured at the smallest configuration
(where a point departs from that line, something other than arithmetic grows).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import fire

import floor

BATCH, ACTIVATION = 16, "softsign"


def _bench(layers: int, width: int, steps: int, workdir: str | None) -> dict:
    args = [sys.executable, "-m", "deepnet", "bench", "--layers", str(layers), "--width", str(width),
            "--steps", str(steps), "--json", "--quiet"]
    if workdir:
        args += ["--workdir", workdir]
    done = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _floor(layers: int, width: int, facts: dict, clock_ghz: float) -> float:
    return floor.floor_seconds(layers=layers, width=width, batch=BATCH, activation=ACTIVATION,
                               lanes_per_cycle=facts["fma_lanes_per_cycle"], cores=facts["cores"],
                               clock_hz=clock_ghz * 1e9)["floor_s"]


def main(depths: tuple = (1_000_000, 3_000_000, 10_000_000, 30_000_000, 100_000_000),
         widths: tuple = (4, 8, 16, 32, 64), steps: int = 3, plot: str | None = None,
         workdir: str | None = None) -> None:
    """Measure both sweeps, print them, and draw them into ``plot`` (needs matplotlib)."""
    facts = floor.machine_facts()
    clock = floor.run_limit_kernel(facts["build"], 20_000, reps=1)
    clock_ghz = (clock or {}).get("clock_ghz") or 3.0
    rows = []
    for layers in depths:
        run = _bench(int(layers), 4, steps, workdir)
        rows.append({"sweep": "depth", "layers": int(layers), "width": 4, "s_per_step": run["seconds_per_step"],
                     "floor_s": _floor(int(layers), 4, facts, clock_ghz)})
        print(json.dumps(rows[-1]), flush=True)
    for width in widths:
        per_layer_floor = _floor(1, int(width), facts, clock_ghz)
        layers = max(1000, int(round(0.2 / per_layer_floor, -3)))
        run = _bench(layers, int(width), steps, workdir)
        rows.append({"sweep": "width", "layers": layers, "width": int(width), "s_per_step": run["seconds_per_step"],
                     "floor_s": _floor(layers, int(width), facts, clock_ghz)})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{facts['cpu']}, {facts['build']}, {facts['cores']} cores, L2 {facts['l2_bytes']} B, "
          f"{clock_ghz:.2f} GHz (dependent adds)")
    print("| sweep | layers | width | s/step | floor s | ratio | ns per layer |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['sweep']} | {r['layers']:,} | {r['width']} | {r['s_per_step']:.4f} | {r['floor_s']:.4f} | "
              f"{r['s_per_step'] / r['floor_s']:.2f} | {1e9 * r['s_per_step'] / r['layers']:.1f} |")
    if plot:
        _draw(rows, facts, clock_ghz, plot)


def _draw(rows: list[dict], facts: dict, clock_ghz: float, out: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    for i, (sweep, x_key, x_label) in enumerate((("depth", "layers", "layers (width 4)"),
                                                 ("width", "width", "width (per-layer time)"))):
        ax = fig.add_subplot(1, 2, i + 1)
        part = [r for r in rows if r["sweep"] == sweep]
        xs = [r[x_key] for r in part]
        scale = (lambda r: 1.0) if sweep == "depth" else (lambda r: 1e9 / r["layers"])
        measured = [r["s_per_step"] * scale(r) for r in part]
        bound = [r["floor_s"] * scale(r) for r in part]
        ratio = part[0]["s_per_step"] / part[0]["floor_s"]
        ax.plot(xs, measured, "o-", label="measured (deepnet bench)")
        ax.plot(xs, bound, "k--", label="arithmetic floor")
        ax.plot(xs, [b * ratio for b in bound], ":", color="gray", label=f"floor x {ratio:.1f} (first point)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(xs, [f"{x:,}" if sweep == "width" else f"{x / 1e6:g}M" for x in xs])
        ax.minorticks_off()
        ax.set_xlabel(x_label + ", log scale")
        ax.set_ylabel("seconds per step, log scale" if sweep == "depth" else "ns per layer per step, log scale")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{facts['cpu']}: {facts['build']}, {facts['cores']} cores, L2 {facts['l2_bytes'] // 1024} KiB, "
                 f"{clock_ghz:.2f} GHz; softsign, batch 16, in RAM", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    fire.Fire(main)
