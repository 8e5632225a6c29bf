"""The full-size figures of TARGETS.md, measured in rounds: each round runs every figure's `deepnet bench`
command once per build named, the builds' order alternating from round to round (so a shared machine's slow
stretches fall on every build alike), then prints per figure and build the median of the runs, their range,
whether the target is met and the threads the timed steps ran their forward and backward passes on.

    python bench/targets.py [--rounds 3] [--builds avx512,avx2] [--figures softsign,tanh] [--json-out]

Each run is a fresh `python -m deepnet bench ... --json` process (its own model file, warm-up and thread
choice), exactly the commands of bench/README.md, "Full-size commands"; figures whose commands are the
same share one run (the peak memory is the softsign step's run: ``ru_maxrss`` survives ``execve``, which this
small parent process does not disturb). `--layers` runs the 10M-layer figures at
another depth (a smoke test: the targets are then not compared).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass

from tqdm import tqdm

import devcli  # bench/, the script's directory
import floor
from deepnet.errors import ConfigError, DeepnetError
from deepnet.kernels.builtin import KERNELS_ENV, build_label, builtin_module

FULL_LAYERS = 10_000_000
WIDE_LAYERS = 10_000          # the width-32 figure's depth


@dataclass(frozen=True)
class Figure:
    """One figure of TARGETS.md: the `deepnet bench` flags that measure it and what it must reach."""

    name: str
    label: str
    flags: tuple[str, ...]
    result_key: str           # the key of `deepnet bench --json` it reads
    unit: str
    target: float
    at_least: bool            # the target is a minimum (rates), not a maximum (times, memory)
    deep: bool = True         # run at --layers (the 10M-layer figures)

    def value(self, run: dict) -> float:
        raw = run[self.result_key]
        if self.unit == "steps/s":
            return 1.0 / raw
        return raw / 1e9 if self.unit == "GB" else raw

    def meets(self, value: float) -> bool:
        return value >= self.target if self.at_least else value <= self.target

    @property
    def command(self) -> str:
        """The full-size command, as bench/README.md ("Full-size commands") writes it."""
        return f"deepnet bench --layers {FULL_LAYERS if self.deep else WIDE_LAYERS:_} {' '.join(self.flags)}"


_STEP = ("--steps", "5")
FIGURES: tuple[Figure, ...] = (
    Figure("softsign", "10M softsign step, in RAM", _STEP, "seconds_per_step", "s", 0.45, False),
    Figure("streamed", "10M softsign step, streamed (file in page cache)", _STEP + ("--streamed",),
           "seconds_per_step", "s", 0.6, False),
    Figure("tanh", "10M tanh step, in RAM", _STEP + ("--activation", "tanh"), "seconds_per_step", "s", 0.7, False),
    Figure("relu", "10M relu step, in RAM", _STEP + ("--activation", "relu"), "seconds_per_step", "s", 0.45, False),
    Figure("evaluation", "evaluation, 10M layers, 2048 images", ("--eval-samples", "2048", "--steps", "1"),
           "eval_images_per_s", "images/s", 250.0, True),
    Figure("width32", "width 32, 10k layers, batch 1", ("--width", "32", "--batch", "1", "--steps", "200"),
           "seconds_per_step", "steps/s", 100.0, True, deep=False),
    Figure("memory", "peak memory, 10M in-memory training", _STEP, "peak_rss_bytes", "GB", 1.3, False),
)
TARGETS: dict[str, Figure] = {f.name: f for f in FIGURES}


def _command(figure: Figure, layers: int) -> tuple[str, ...]:
    depth = layers if figure.deep else WIDE_LAYERS
    return ("--layers", str(depth)) + figure.flags


def _run(command: tuple[str, ...], build: str, workdir: str | None) -> dict:
    args = [sys.executable, "-m", "deepnet", "bench", *command, "--json", "--quiet"]
    if workdir:
        args += ["--workdir", workdir]
    env = dict(os.environ) if build == "auto" else {**os.environ, KERNELS_ENV: build}
    done = subprocess.run(args, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise ConfigError(f"`deepnet bench {' '.join(command)}` ({build}) failed: "
                          f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _threads(runs: list[dict]) -> str:
    """The forward/backward threads of each run's timed steps, counted over the runs ("2/2 in 3")."""
    per_run = Counter()
    for run in runs:
        steps = Counter(f"{f}/{b}" for f, b in run.get("step_threads") or [])
        if steps:
            per_run[steps.most_common(1)[0][0]] += 1
    return ", ".join(f"{k} in {v}" for k, v in per_run.most_common())


def measure(*, rounds: int, builds: list[str], figures: list[Figure], layers: int, workdir: str | None,
            show_progress: bool = False) -> dict:
    """Every figure's runs on every build, round after round; returns the runs and their summary rows."""
    commands = list(dict.fromkeys(_command(f, layers) for f in figures))
    runs: dict[tuple[str, tuple[str, ...]], list[dict]] = {}
    with tqdm(total=rounds * len(commands) * len(builds), unit="run", disable=not show_progress) as bar:
        for r in range(rounds):
            order = builds if r % 2 == 0 else builds[::-1]
            for command in commands:
                for build in order:
                    bar.set_description(f"round {r + 1}, {build}, {' '.join(command)}")
                    runs.setdefault((build, command), []).append(_run(command, build, workdir))
                    bar.update()
    rows = []
    for figure in figures:
        for build in builds:
            done = runs[(build, _command(figure, layers))]
            values = [figure.value(run) for run in done]
            median = statistics.median(values)
            rows.append({
                "figure": figure.name, "label": figure.label, "build": build, "kernels": done[0].get("kernels"),
                "unit": figure.unit, "values": values, "median": median, "low": min(values), "high": max(values),
                "target": figure.target, "at_least": figure.at_least,
                "met": figure.meets(median) if layers == FULL_LAYERS or not figure.deep else None,
                "threads": _threads(done) if figure.result_key == "seconds_per_step" else "",
                "cpu_stolen": [run.get("cpu_stolen_fraction") for run in done],
            })
    return {"layers": layers, "rounds": rounds, "builds": builds, "rows": rows,
            "runs": [{"build": b, "command": list(c), "results": v} for (b, c), v in runs.items()]}


def _format(value: float, unit: str) -> str:
    return f"{value:.4g} s" if unit == "s" else f"{value:.2f} GB" if unit == "GB" else f"{value:.0f} {unit}"


def table(result: dict) -> str:
    """The summary rows as a markdown table."""
    lines = ["| figure | build | target | median | runs | met | threads (forward/backward) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in result["rows"]:
        target = f"{'>=' if row['at_least'] else '<='} {row['target']:g} {row['unit']}"
        met = "-" if row["met"] is None else "yes" if row["met"] else "no"
        spread = " / ".join(_format(v, row["unit"]).split()[0] for v in row["values"])
        lines.append(f"| {row['label']} | {row['kernels']} | {target} | **{_format(row['median'], row['unit'])}** | "
                     f"{spread} | {met} | {row['threads']} |")
    return "\n".join(lines)


def _names(value) -> list[str]:
    """A comma-separated flag as a list (fire hands "a,b" over as a tuple already)."""
    parts = value if isinstance(value, (tuple, list)) else str(value).split(",")
    return [str(p).strip() for p in parts if str(p).strip()]


def main(rounds: int = 3, builds: str = "auto", figures: str = ",".join(f.name for f in FIGURES),
         layers: int = FULL_LAYERS, workdir: str | None = None, json_out: bool = False) -> None:
    """Measure the figures (names: softsign, streamed, tanh, relu, evaluation, width32, memory) in --rounds
    rounds on each of --builds (auto, portable, avx2, avx512: $DEEPNET_KERNELS's names) and print the table."""
    if not isinstance(rounds, int) or isinstance(rounds, bool) or rounds < 1:
        raise ConfigError(f"--rounds must be an integer >= 1, not {rounds!r}")
    if not isinstance(layers, int) or isinstance(layers, bool) or layers < 1:
        raise ConfigError(f"--layers must be a positive integer, not {layers!r}")
    names = _names(figures)
    unknown = [n for n in names if n not in TARGETS]
    if unknown or not names:
        raise ConfigError(f"--figures takes names among {', '.join(TARGETS)}, not {','.join(names)!r}")
    chosen = [b.lower() for b in _names(builds)]
    if not chosen or len(set(chosen)) != len(chosen):
        raise ConfigError(f"--builds must name distinct builds, not {','.join(chosen)!r}")
    for build in chosen:
        try:
            builtin_module(build)
        except DeepnetError as exc:
            raise ConfigError(f"--builds: {exc}") from None
    if workdir is not None and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir} is not a directory")
    facts = floor.machine_facts()
    result = measure(rounds=rounds, builds=chosen, figures=[TARGETS[n] for n in names], layers=layers,
                     workdir=workdir, show_progress=sys.stderr.isatty())
    result["machine"] = {**facts, "builds": {b: build_label(builtin_module(b)) for b in chosen}}
    if json_out:
        print(json.dumps(result))
        return
    print(f"\n{facts['cpu']}, {facts['cores']} cores, L2 {facts['l2_bytes']} B; {rounds} rounds"
          + ("" if layers == FULL_LAYERS else f"; the 10M figures at {layers:,} layers (targets not compared)"))
    print(table(result))


if __name__ == "__main__":
    devcli.run(main, "targets.py")
