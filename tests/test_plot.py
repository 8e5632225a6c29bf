"""Training curves (deepnet.tools.plot, `deepnet plot`): a real, non-trivial image for dense and mlp files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import deepnet
from deepnet.cli import main
from deepnet.errors import ConfigError, ModelFileError
from deepnet.formats.hdf5 import ModelFile
from deepnet.nn.mlp import MLP
from deepnet.tools.plot import moving_average, plot_training

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
