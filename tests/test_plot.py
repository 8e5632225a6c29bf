"""Training curves (deepnet.tools.plot, `deepnet plot`): a real, non-trivial image for dense and mlp files,
and what a reader of it sees: labelled ticks on every axis, the evaluations in the legend, the title."""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np
import pytest

import deepnet
from deepnet.cli import main
from deepnet.errors import ConfigError, ModelFileError
from deepnet.formats import layout
from deepnet.formats.hdf5 import ModelFile
from deepnet.nn.mlp import MLP
from deepnet.tools.plot import build_figure, figure_facts, moving_average, plot_training, read_curves

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _mlp_with_log(path: Path, steps: int = 300) -> Path:
    """An MLP trained a few hundred steps on a learnable toy problem (no MNIST needed)."""
    rng = np.random.default_rng(0)
    centers = rng.uniform(0, 1, (10, 784)).astype(np.float32)
    net = MLP.new(16, seed=1)
    for _ in range(steps):
        y = rng.integers(0, 10, 32)
        x = centers[y] + rng.normal(0, 0.8, (32, 784)).astype(np.float32)
        net.train_step(x, y, 0.05)
    net.save(path)
    return path


def _image_checks(path: Path, size: tuple[int, int]) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    Image = pytest.importorskip("PIL.Image")
    with Image.open(path) as im:
        im.load()
        assert abs(im.size[0] - size[0]) <= 2 and abs(im.size[1] - size[1]) <= 2, im.size
        pixels = np.asarray(im.convert("RGB")).reshape(-1, 3)
    colours = np.unique(pixels, axis=0)
    assert len(colours) > 50, len(colours)  # curves, antialiased text and lines: not a blank canvas
    assert (pixels != 255).any(axis=1).mean() > 0.01  # something is drawn on at least 1% of the image


def test_moving_average():
    v = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert np.allclose(moving_average(v, 1), v)
    assert np.allclose(moving_average(v, 2), [1.0, 1.5, 2.5, 3.5, 4.5])
    assert np.allclose(moving_average(v, 10), [1.0, 1.5, 2.0, 2.5, 3.0])


def test_mlp_curves_png(tmp_path):
    model = _mlp_with_log(tmp_path / "m.h5")
    result = plot_training(model, tmp_path / "curves.png", width=720, height=480)
    assert result["rows"] == 300 and set(result["columns"]) == {"loss", "batch_acc"} and result["smooth"] == 6
    _image_checks(tmp_path / "curves.png", (720, 480))
    assert sorted(os.listdir(tmp_path)) == ["curves.png", "m.h5"]  # no temporary left


def test_dense_curves_default_output_and_svg(tmp_path):
    deepnet.init(tmp_path / "d.h5", layers=10, width=4, activation="softsign", progress=False)
    n = 500
    steps = np.arange(1, n + 1)
    rng = np.random.default_rng(0)
    with ModelFile.open(tmp_path / "d.h5", "r+") as f:
        f.append_log(steps, 2.3 * np.exp(-steps / 150) + 0.1 + rng.uniform(0, 0.2, n),
                     np.clip(0.1 + 0.8 * (1 - np.exp(-steps / 100)) + rng.uniform(-0.1, 0.1, n), 0, 1),
                     np.full(n, 0.01))
    result = plot_training(tmp_path / "d.h5", smooth=25)
    assert result["out"] == str(tmp_path / "d.png") and result["smooth"] == 25
    _image_checks(tmp_path / "d.png", (1200, 800))
    plot_training(tmp_path / "d.h5", tmp_path / "d.svg", width=400, height=300)
    assert (tmp_path / "d.svg").read_text()[:200].lstrip().startswith("<?xml")


def test_refusals_write_nothing(tmp_path):
    deepnet.init(tmp_path / "empty.h5", layers=5, width=2, activation="tanh", progress=False)
    (tmp_path / "notes.txt").write_text("hi")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ConfigError, match="empty training log"):
        plot_training(tmp_path / "empty.h5", tmp_path / "x.png")
    with pytest.raises(ModelFileError, match="not a deepnet model file"):
        plot_training(tmp_path / "notes.txt", tmp_path / "x.png")
    with pytest.raises(ModelFileError, match="no model file"):
        plot_training(tmp_path / "missing.h5", tmp_path / "x.png")
    with pytest.raises(ConfigError, match="unknown image type 'xyz'"):
        plot_training(tmp_path / "empty.h5", tmp_path / "x.xyz")
    with pytest.raises(ConfigError, match="does not exist"):
        plot_training(tmp_path / "empty.h5", tmp_path / "nodir" / "x.png")
    with pytest.raises(ConfigError, match="--width"):
        plot_training(tmp_path / "empty.h5", tmp_path / "x.png", width=0)
    assert sorted(os.listdir(tmp_path)) == before


def test_cli_plot(tmp_path, capsys):
    model = _mlp_with_log(tmp_path / "m.h5", steps=120)
    assert main(["plot", str(model), "--out", str(tmp_path / "c.png"), "--size", "500x400",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["event"] == "plot" and result["rows"] == 120
    _image_checks(tmp_path / "c.png", (500, 400))
    deepnet.init(tmp_path / "e.h5", layers=5, width=2, activation="tanh", progress=False)
    assert main(["plot", str(tmp_path / "e.h5"), "--out", str(tmp_path / "e.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "empty training log" in err[0]
    assert not (tmp_path / "e.png").exists()


# ---------------------------------------------------------------------------------------------------
# what a reader of the figure sees (deepnet.tools.plot.build_figure / figure_facts)


def _dense_with_evaluations(path: Path, losses: np.ndarray, *, heldout: bool = True, test: bool = True) -> Path:
    """A dense model file whose log holds `losses` (one per step) and, optionally, held-out evaluations
    every 100 steps and a test evaluation at the end."""
    deepnet.init(path, layers=20, width=2, activation="tanh", progress=False)
    n = losses.size
    steps = np.arange(1, n + 1)
    acc = np.clip(0.1 + 0.8 * (1 - np.exp(-steps / 100)), 0, 1)
    with ModelFile.open(path, "r+") as f:
        f.append_log(steps, losses, acc, np.full(n, 0.01))
        f.step = n
        if heldout:
            for s in range(100, n + 1, 100):
                f.record_evaluation(s, "heldout", 1000, float(losses[s - 1]) * 0.9, float(acc[s - 1]) + 0.02)
        if test:
            f.record_evaluation(n, "test", 10_000, float(losses[-1]), float(acc[-1]) - 0.01)
    return path


def _facts(path: Path, **kwargs) -> dict:
    fig, drawn = build_figure(read_curves(path), name=path.name, **kwargs)
    return {**drawn, **figure_facts(fig)}


def _assert_every_axis_labelled(facts: dict) -> None:
    for panel in facts["axes"]:
        assert panel["xlabel"] == "step" and panel["ylabel"]
        for which in ("xticklabels", "yticklabels"):
            labels = panel[which]
            assert len(labels) >= 3 and all(labels), (panel["ylabel"], which, labels)


def test_figure_of_a_wide_loss_range_has_a_labelled_log_axis(tmp_path):
    steps = np.arange(1, 601)
    losses = 2.3 * np.exp(-steps / 150) + 0.05  # 2.3 down to about 0.06: a log axis
    facts = _facts(_dense_with_evaluations(tmp_path / "d.h5", losses))
    _assert_every_axis_labelled(facts)
    loss, acc = facts["axes"]
    assert loss["yscale"] == "log" and loss["ylabel"] == "loss (log scale)"
    assert acc["yscale"] == "linear" and acc["ylabel"] == "accuracy"
    assert all(float(t) > 0 for t in loss["yticklabels"])  # plain numbers, not 10^-1
    assert "held-out loss (1,000 images)" in loss["legend"] and "test loss (10,000 images)" in loss["legend"]
    assert "held-out accuracy (1,000 images)" in acc["legend"] and "test accuracy (10,000 images)" in acc["legend"]
    assert any(e.startswith("batch accuracy (mean of") for e in acc["legend"])
    assert facts["title"].startswith("d.h5: 20 layers x width 2, tanh, step 600\n")
    assert "held-out accuracy" in facts["title"] and "test accuracy" in facts["title"]
    assert {"heldout_acc", "test_acc", "heldout_loss", "test_loss", "loss", "batch_acc"} == set(facts["columns"])


@pytest.mark.parametrize("low, high", [(0.9, 1.1), (0.95, 4.0), (1.001, 4.9), (0.05, 0.26), (0.3, 2.4)])
def test_every_loss_range_gets_at_least_three_labelled_ticks(tmp_path, low, high):
    losses = np.linspace(high, low, 300)
    facts = _facts(_dense_with_evaluations(tmp_path / "d.h5", losses, test=False))
    _assert_every_axis_labelled(facts)
    loss = facts["axes"][0]
    log = high >= 5 * low * 0.9  # held-out losses are 0.9 x the batch ones
    assert loss["yscale"] == ("log" if log else "linear")
    assert loss["ylabel"] == ("loss (log scale)" if log else "loss")


def test_figure_without_evaluations_and_of_an_mlp(tmp_path):
    facts = _facts(_dense_with_evaluations(tmp_path / "d.h5", np.linspace(2.3, 0.5, 50), heldout=False, test=False))
    _assert_every_axis_labelled(facts)
    assert not any("held-out" in e or "test" in e for p in facts["axes"] for e in p["legend"])
    assert set(facts["columns"]) == {"loss", "batch_acc"}
    model = _mlp_with_log(tmp_path / "m.h5", steps=120)
    facts = _facts(model)
    _assert_every_axis_labelled(facts)
    assert facts["title"].startswith("m.h5: mlp, hidden 16, step 120")


def test_plot_of_a_trained_model_shows_its_evaluations(tmp_path, mnist_dir):
    path = tmp_path / "m.h5"
    deepnet.train(path, steps=9, layers=30, holdout=200, eval_every=3, test_samples=100, progress=False)
    result = plot_training(path, tmp_path / "m.png", width=600, height=400)
    assert result["evaluations"] == 4 and {"heldout_acc", "test_acc"} <= set(result["columns"])
    _image_checks(tmp_path / "m.png", (600, 400))
    acc = _facts(path)["axes"][1]
    assert "held-out accuracy (200 images)" in acc["legend"] and "test accuracy (100 images)" in acc["legend"]


def test_a_file_from_before_the_evaluations_shows_its_heldout_dataset(tmp_path):
    path = _dense_with_evaluations(tmp_path / "d.h5", np.linspace(2.3, 0.5, 300), heldout=False, test=False)
    with h5py.File(path, "r+") as h:
        del h[layout.TRAIN_EVALS]
        h.create_dataset(layout.TRAIN_HELDOUT, data=np.array([(100, 1.0, 0.5), (200, 0.8, 0.6)], layout.HELDOUT_DTYPE))
    curves = read_curves(path)
    assert curves.evals["step"].tolist() == [100, 200] and set(curves.evals["samples"]) == {0}
    acc = _facts(path)["axes"][1]
    assert "held-out accuracy" in acc["legend"]  # of unknown size: no count shown
