"""`deepnet diagnose` beside one evaluation of its probe batch (issue 22: it should take about that).

Times ``deepnet.api.diagnose`` on a 1M-layer model (width 4, softsign, 100 bands, the first 64 MNIST
test images), with and without the gradient, then ``deepnet.api.evaluate`` of the same 64 images in the
same run; ``extra_info`` has both medians and their ratio. Whole calls: opening the file and reading
the data count in both.

Under --benchmark-disable (CI) it runs once at 20,000 layers. Needs MNIST in $DEEPNET_DATA.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest

from benchlib import record, run_pedantic
from deepnet import api

FULL_LAYERS = 1_000_000
SMOKE_LAYERS = 20_000
PROBE = 64


@pytest.mark.parametrize("gradient", [True, False], ids=["with-gradient", "no-gradient"])
def test_diagnose_beside_one_evaluation(benchmark, model_dir, gradient):
    data_dir = os.environ.get("DEEPNET_DATA")
    if not data_dir:
        pytest.skip("set $DEEPNET_DATA to the MNIST directory")
    benchmark.group = "diagnose: 100 bands, 64 probe images, beside deepnet eval of the same 64"
    layers = SMOKE_LAYERS if benchmark.disabled else FULL_LAYERS
    path = model_dir / f"diagnose-L{layers}.h5"
    if not path.exists():
        api.init(path, layers=layers, width=4, activation="softsign", seed=0)
    results: list[dict] = []
    run_pedantic(benchmark, lambda: results.append(api.diagnose(path, probe_samples=PROBE, gradient=gradient,
                                                                data_dir=data_dir)), rounds=3)
    evaluations = []
    for _ in range(1 if benchmark.disabled else 3):
        started = time.perf_counter()
        api.evaluate(path, test_samples=PROBE, data_dir=data_dir)
        evaluations.append(time.perf_counter() - started)
    assert len(results[-1]["bands"]) == 100 and results[-1]["bands"][0]["weight_change"] == 0.0
    assert (results[-1]["bands"][0]["grad_norm"] is not None) == gradient
    median = record(benchmark, layers=layers, probe=PROBE, gradient=gradient)
    evaluation = statistics.median(evaluations)
    benchmark.extra_info["evaluate_s"] = evaluation
    if median is not None:
        benchmark.extra_info.update(diagnose_over_evaluate=median / evaluation,
                                    summary=f"diagnose {median:.3f} s, evaluate {evaluation:.3f} s "
                                            f"({median / evaluation:.1f}x)")
