"""Shared helpers of the benchmarks in bench/ (pytest-benchmark; see bench/README.md).

Run them explicitly -- the repo's pytest config points at tests/ only:

    python -m pytest bench                      # timed; prints pytest-benchmark's tables + a figures summary
    python -m pytest bench --benchmark-disable  # each benchmark body once, untimed (what CI runs)

The helpers live in bench/benchlib.py; this file puts bench/ on sys.path, frees cached weights between
modules, gives the model files a temporary directory, and prints the derived figures (layer-samples/s,
extrapolated full-size figures vs targets) after pytest-benchmark's tables. Nothing asserts on a time.

Environment knobs (optional): ``DEEPNET_BENCH_ROUNDS`` (minimum timed rounds per benchmark, default 5) and
``DEEPNET_BENCH_BUDGET`` (seconds of timed rounds to aim for per benchmark, default 0.3).
The kernels build under test follows ``$DEEPNET_KERNELS`` (auto/portable/avx2/avx512) like the package does,
except in test_portable.py, which loads each build explicitly.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# The benchmark modules import their helpers by name (``from benchlib import ...``), in any import mode.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import FIGURES, PARAMS  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _free_params():
    """Drop the cached weights after each module (the step depth sweep holds ~100 MB)."""
    yield
    PARAMS.clear()


# -- a summary of the derived figures at the end of a timed run ---------------------------------------

def _fmt_rate(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def pytest_terminal_summary(terminalreporter):
    if not FIGURES:
        return
    tr = terminalreporter
    tr.section("deepnet benchmark figures (median of each benchmark's rounds)")
    for name, info in FIGURES:
        parts = []
        if "layer_samples_per_s" in info:
            parts.append(f"{_fmt_rate(info['layer_samples_per_s'])} layer-samples/s")
        if "speedup_vs_portable" in info:
            parts.append(f"{info['speedup_vs_portable']:.2f}x portable")
        if "summary" in info:
            parts.append(info["summary"])
        tr.write_line(f"{name:<60} {info.get('median_s', float('nan')) * 1e3:9.2f} ms  " + "  ".join(parts))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """A temporary directory for the benchmark model files (removed by pytest's tmp_path retention)."""
    return tmp_path_factory.mktemp("deepnet-bench-models")
