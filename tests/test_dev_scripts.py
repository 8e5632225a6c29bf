"""The developer scripts in bench/ (long crash soaks and IDX fuzzing): fire command lines that run,
report, and refuse a bad flag in one line. Tiny runs here; the long runs are what the scripts are for."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import MNIST_DIR, have_mnist, kernel_builds

BENCH = Path(__file__).resolve().parent.parent / "bench"


def run_script(name: str, *args: str, cwd: Path, **env_vars: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEEPNET_DATA=str(MNIST_DIR), **env_vars)
    return subprocess.run([sys.executable, str(BENCH / name), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_fuzz_idx_runs_every_property(tmp_path):
    proc = run_script("fuzz_idx.py", "--examples", "20", "--seed", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "120 inputs, no failure" in proc.stdout  # six properties x 20 examples
    assert "mutated MNIST splits" in proc.stdout


@pytest.mark.skipif(not have_mnist(), reason="needs MNIST")
def test_crash_soak_kills_and_checks(tmp_path):
    proc = run_script("crash_soak.py", "--kills", "1", "--layers", "2000", "--steps", "40", "--modes", "in-memory",
                      cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "in-memory: 1 kills survived" in proc.stdout and "resumed to the end bit-exactly" in proc.stdout
    assert "streamed:" not in proc.stdout


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump")
@pytest.mark.parametrize("build", [m.__name__.rsplit("_", 1)[-1] for m in kernel_builds()
                                   if m.__name__.endswith(("avx2", "avx512"))])
def test_loop_counts_follow_the_activations(tmp_path, build):
    """The counts of each vector build this CPU runs (AVX2's pieces on 8-lane halves, AVX-512's on 16-lane
    vectors): relu's recomputation has no division and the fewest multiplies, tanh's the most; the carry
    and the update do not depend on the activation, and the update is bound by its issues, reading memory
    fewer times than it multiplies (the AVX2 halves once read each dz pair again for every product: 55
    loads a layer against 38 multiplies and FMAs); AVX-512's carry by its FMA pipes."""
    proc = run_script("loop_counts.py", "--json-out", cwd=tmp_path, DEEPNET_KERNELS=build)
    assert proc.returncode == 0, proc.stderr
    assert build in json.loads(proc.stdout)["module"]
    counts = json.loads(proc.stdout)["counts"]
    recompute = {name: counts[name]["recompute2"] for name in ("softsign", "relu", "tanh")}
    assert recompute["relu"]["div"] == 0 < recompute["softsign"]["div"] == recompute["tanh"]["div"]
    assert recompute["relu"]["fma_mul"] < recompute["softsign"]["fma_mul"] < recompute["tanh"]["fma_mul"]
    for piece in ("carry", "update"):
        assert counts["relu"][piece] == counts["softsign"][piece] == counts["tanh"][piece]
        assert counts["softsign"][piece]["fma_mul"] > 0
    update, carry = counts["softsign"]["update"], counts["softsign"]["carry"]
    assert update["issue_cycles_per_layer"] > update["fma_pipe_cycles_per_layer"]   # its shuffles bound it
    assert 0 < update["loads"] <= update["fma_mul"]
    assert update["issue_cycles_per_layer"] > update["load_cycles_per_layer"] > 0
    assert counts["softsign"]["recompute2"]["loads"] > 0
    if build == "avx512":
        assert carry["issue_cycles_per_layer"] < carry["fma_pipe_cycles_per_layer"]


def test_ab_builds_times_two_trees_in_turn(tmp_path):
    """This tree against itself (its module copied and loaded a second time): both sides timed every round,
    the ratios their quotients, and the settings as given."""
    tree = str(BENCH.parent)
    proc = run_script("ab_builds.py", tree, "--build", "portable", "--layers", "3000", "--rounds", "3", "--threads",
                      "1", "--block", "8", "--split", "blocks", "--json-out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert (result["build"], result["layers"], result["threads"], result["block"]) == ("portable", 3000, 1, 8)
    this, other = result["seconds"]["this"], result["seconds"]["other"]
    assert len(this) == len(other) == 3 and min(this + other) > 0
    ratios = sorted(o / t for o, t in zip(other, this))
    assert result["ratio_other_over_this"]["median"] == pytest.approx(ratios[1])
    assert list(tmp_path.iterdir()) == []


def test_ab_builds_times_two_ways_of_one_tree(tmp_path):
    """The other side with its own block and split: this tree's 8-sample blocks shared by blocks against its
    16-sample blocks split by segments, each side reported with its own."""
    proc = run_script("ab_builds.py", str(BENCH.parent), "--build", "portable", "--layers", "3000", "--rounds",
                      "2", "--threads", "2", "--block", "8", "--split", "blocks", "--other-block", "16",
                      "--other-split", "segments", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "block  8, blocks" in lines[1] and "block 16, segments" in lines[2]
    assert list(tmp_path.iterdir()) == []


def test_targets_runs_each_figure_per_build_in_rounds(tmp_path):
    """Every figure on both builds named, once a round; figures with one command share its runs (the
    peak memory is the softsign step's), and at another depth than 10M only width 32 is judged."""
    work = tmp_path / "models"
    work.mkdir()
    proc = run_script("targets.py", "--layers", "3000", "--rounds", "2", "--builds", "portable,auto", "--figures",
                      "softsign,memory,width32", "--workdir", str(work), "--json-out", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    rows = {(r["figure"], r["build"]): r for r in result["rows"]}
    assert set(rows) == {(f, b) for f in ("softsign", "memory", "width32") for b in ("portable", "auto")}
    assert len(result["runs"]) == 4 and all(len(r["results"]) == 2 for r in result["runs"])
    for build in ("portable", "auto"):
        softsign, memory, wide = rows[("softsign", build)], rows[("memory", build)], rows[("width32", build)]
        step_run = next(r for r in result["runs"] if r["build"] == build and "--width" not in r["command"])
        assert step_run["command"][:2] == ["--layers", "3000"]
        assert softsign["values"] == [run["seconds_per_step"] for run in step_run["results"]]
        assert memory["values"] == [run["peak_rss_bytes"] / 1e9 for run in step_run["results"]]
        assert softsign["met"] is None and memory["met"] is None
        assert wide["values"] == [1.0 / run["seconds_per_step"] for run in next(
            r for r in result["runs"] if r["build"] == build and "--width" in r["command"])["results"]]
        assert wide["met"] == (wide["median"] >= 100.0)
        for row in (softsign, wide):   # each run's threads counted once, e.g. "2/2 in 1, 1/2 in 1"
            assert sum(int(part.split(" in ")[1]) for part in row["threads"].split(", ")) == 2
    assert rows[("softsign", "portable")]["kernels"].startswith("_kernels ")
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("name, args, message", [
    ("ab_builds.py", ["."], "is not a deepnet source tree"),
    ("ab_builds.py", [str(BENCH.parent), "--other-split", "diagonal"], "--other-split must be blocks or segments"),
    ("ab_builds.py", [str(BENCH.parent), "--rounds", "1"], "--rounds must be an integer >= 2"),
    ("ab_builds.py", [str(BENCH.parent), "--kind", "sideways"], "--kind must be backward or forward"),
    ("crash_soak.py", ["--modes", "streamed,bogus"], "--modes must be streamed, in-memory or both"),
    ("crash_soak.py", ["--kills", "0"], "--kills must be > 0"),
    ("fuzz_idx.py", ["--examples", "-5"], "--examples must be > 0"),
    ("loop_counts.py", ["--activations", "softsign,bogus"], "--activations must name built-in activations"),
    ("targets.py", ["--figures", "softsign,bogus"], "--figures takes names among softsign"),
    ("targets.py", ["--builds", "avx2,avx2"], "--builds must name distinct builds"),
    ("targets.py", ["--builds", "sse9"], "--builds: DEEPNET_KERNELS must be one of"),
    ("targets.py", ["--rounds", "0"], "--rounds must be an integer >= 1"),
])
def test_a_bad_flag_is_one_line(tmp_path, name, args, message):
    proc = run_script(name, *args, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert list(tmp_path.iterdir()) == []
