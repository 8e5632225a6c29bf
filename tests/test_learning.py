"""The recipe learns MNIST (the real data set, found through $DEEPNET_DATA)."""

from __future__ import annotations

import numpy as np
import pytest

import deepnet
from deepnet import ModelFile
from helpers import read_weights


def core_moved(path, layers, width, activation, seed) -> np.ndarray:
    """Per layer, the largest change of a core weight since initialisation (same seed, fresh file)."""
    fresh = path.with_name("fresh-" + path.name)
    deepnet.init(fresh, layers=layers, width=width, activation=activation, seed=seed, progress=False)
    _, core0 = read_weights(fresh)
    _, core = read_weights(path)
    return np.abs(core - core0).max(axis=1)


@pytest.mark.parametrize("in_memory", [False, True], ids=["streamed", "in_memory"])
def test_loss_drops_quickly(tmp_path, mnist_dir, capsys, in_memory):
    """200 steps on 20 layers: the loss falls clearly and the test accuracy is far above chance."""
    path = tmp_path / "small.h5"
    deepnet.train(path, steps=200, layers=20, width=4, activation="softsign", batch=16, seed=0,
                  test_samples=0, report_every=50, in_memory=in_memory, progress=False)
    capsys.readouterr()
    with ModelFile.open(path) as f:
        log = f.read_log()
    assert list(log["step"]) == list(range(1, 201))
    first, last = float(log["loss"][:50].mean()), float(log["loss"][-50:].mean())
    assert first > 1.8, f"an untrained 10-class model starts near ln 10 = 2.30, got {first:.3f}"
    assert last < first - 0.3, f"loss did not drop: first 50 steps {first:.3f}, last 50 {last:.3f}"

    result = deepnet.evaluate(path, test_samples=2000, progress=False)
    capsys.readouterr()
    assert result["accuracy"] > 0.4, result
    # The core learns too, not only the heads: every layer's weights moved off their initial values.
    moved = core_moved(path, 20, 4, "softsign", 0)
    assert np.all(moved > 1e-4), moved


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_100_layers_width_4_reach_65_percent(tmp_path, mnist_dir, capsys, seed):
    """The design's learning claim: width 4, 100 softsign layers, batch 16, 1000 steps at the recipe's
    default learning rates reach >= 65% on all 10,000 test images."""
    path = tmp_path / "m.h5"
    final = deepnet.train(path, steps=1000, layers=100, width=4, activation="softsign", batch=16, seed=seed,
                          layer_lr=deepnet.RECIPE.layer_lr, head_lr=deepnet.RECIPE.head_lr,
                          test_samples=0, progress=False, data_dir=str(mnist_dir))
    result = deepnet.evaluate(path, test_samples=10_000, progress=False)
    capsys.readouterr()
    assert final["step"] == 1000
    assert result["samples"] == 10_000
    assert result["accuracy"] >= 0.65, result
    assert np.all(core_moved(path, 100, 4, "softsign", seed) > 1e-4)
