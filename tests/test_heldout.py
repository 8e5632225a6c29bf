"""Held-out evaluation while training (deepnet.training.heldout), the table's new columns, /train/heldout, and
what `deepnet info` and `deepnet plot` make of it."""

from __future__ import annotations

import json

import numpy as np
import pytest

import deepnet
from deepnet import ModelFile
from deepnet.cli import main
from deepnet.errors import ConfigError
from deepnet.formats.layout import HELDOUT_DTYPE as DTYPE
from deepnet.training.heldout import read_rows, train_limit
from deepnet.tools.plot import merge_heldout, read_train_log


@pytest.mark.parametrize("in_memory", [True, False], ids=["in_memory", "streamed"])
def test_heldout_rows_and_split(tmp_path, mnist_dir, capsys, in_memory):
    path = tmp_path / "m.h5"
    mode = "--in-memory" if in_memory else "--noin-memory"
    assert main(["train", "--model", str(path), "--steps", "12", "--layers", "10", "--width", "4", "--holdout", "500",
                 "--eval-every", "5", "--report-every", "4", "--test-samples", "0", mode, "--json"]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    reports = [e for e in events if e["event"] == "report"]
    final = events[-1]
    # rows every 4 steps and after each held-out evaluation (steps 5 and 10)
    assert [e["step"] for e in reports] == [4, 5, 8, 10, 12]
    assert [e.get("heldout_acc") is not None for e in reports] == [False, True, False, True, False]
    assert all(e["eta_seconds"] >= 0 for e in reports) and reports[-1]["eta_seconds"] == 0
    for e in reports:  # the rate counts the training batch (16), not the evaluation batch just used
        assert e["layer_samples_per_s"] == pytest.approx(10 * 16 / e["seconds_per_step"])
    assert final["heldout_step"] == 10 and final["heldout_samples"] == 500
    with ModelFile.open(path) as f:
        rows = read_rows(f.h5)
        settings = f.train_settings
    assert rows.dtype == DTYPE and list(rows["step"]) == [5, 10]
    assert rows["heldout_acc"][-1] == final["heldout_acc"] == reports[3]["heldout_acc"]
    # the held-out images are the last 500 and minibatches come from before them
    assert settings["holdout"] == 500 and settings["eval_every"] == 5 and settings["train_limit"] == 59_500

    # a resumed run keeps the split and the cadence (stored), and appends to the same dataset
    deepnet.train(path, steps=6, test_samples=0, in_memory=in_memory)
    with ModelFile.open(path) as f:
        assert list(read_rows(f.h5)["step"]) == [5, 10, 15]
        assert f.train_settings["train_limit"] == 59_500


def test_table_shows_heldout_and_eta(tmp_path, mnist_dir, capsys):
    assert main(["train", "--model", str(tmp_path / "m.h5"), "--steps", "6", "--layers", "5", "--holdout", "100",
                 "--eval-every", "3", "--report-every", "2", "--test-samples", "0"]) == 0
    out = capsys.readouterr().out.splitlines()
    header = out[0].split()
    assert header == ["step", "loss", "batch_acc", "heldout_acc", "s/step", "layer-samples/s", "ETA"]
    widths = {len(line) for line in out[:5]}
    assert len(widths) == 1, out[:5]  # aligned
    assert "held-out" in "\n".join(out)
    # without held-out evaluation, no empty column
    assert main(["train", "--model", str(tmp_path / "n.h5"), "--steps", "2", "--layers", "5", "--report-every", "1",
                 "--test-samples", "0"]) == 0
    assert capsys.readouterr().out.splitlines()[0].split() == ["step", "loss", "batch_acc", "s/step",
                                                               "layer-samples/s", "ETA"]


def test_heldout_options_are_checked(tmp_path, mnist_dir):
    with pytest.raises(ConfigError, match="--holdout N needs --eval-every"):
        deepnet.train(tmp_path / "m.h5", steps=1, layers=5, holdout=100, progress=False)
    with pytest.raises(ConfigError, match="give --holdout N too"):
        deepnet.train(tmp_path / "m.h5", steps=1, layers=5, eval_every=3, progress=False)
    with pytest.raises(ConfigError, match=r"--train-limit must be in 1..59900 \(the last 100 are held out\)"):
        deepnet.train(tmp_path / "m.h5", steps=1, layers=5, holdout=100, eval_every=1, train_limit=60_000,
                      progress=False)
    assert train_limit(None, None, 60_000, 60_000, 1000) == 59_000
    assert train_limit(None, 30_000, 60_000, 60_000, 1000) == 30_000
    assert train_limit(20_000, 30_000, 60_000, 60_000, 0) == 20_000


def test_plot_and_info_use_heldout(tmp_path, mnist_dir, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "m.h5"
    deepnet.train(path, steps=6, layers=5, holdout=100, eval_every=2, test_samples=0, in_memory=True,
                  schedule="cosine", progress=False)
    capsys.readouterr()
    rows, _ = read_train_log(path)
    assert {"heldout_acc", "heldout_loss"} <= set(rows.dtype.names)
    assert np.isnan(rows["heldout_acc"][0]) and np.isfinite(rows["heldout_acc"][1])
    from deepnet.tools.plot import plot_training

    result = plot_training(path, tmp_path / "c.png", width=400, height=300)
    assert "heldout_acc" in result["columns"] and "heldout_loss" in result["columns"]
    from deepnet.cli import main

    assert main(["info", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["last_heldout"]["step"] == 6 and info["last_heldout"]["measurements"] == 3
    assert info["train_settings"]["holdout"] == 100
    assert info["layer_schedule"] == "cosine from step 0 to 0x at step 6"


def test_merge_heldout_joins_on_step():
    log = np.zeros(4, dtype=[("step", "<i8"), ("loss", "<f8")])
    log["step"] = [1, 2, 3, 4]
    held = np.array([(2, 0.5, 0.9), (4, 0.4, 0.95), (9, 0.1, 1.0)], dtype=DTYPE)
    out = merge_heldout(log, held)
    assert np.isnan(out["heldout_acc"][[0, 2]]).all()
    assert list(out["heldout_acc"][[1, 3]]) == [0.9, 0.95]
