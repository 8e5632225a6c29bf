"""`deepnet speedrun` (deepnet.training.speedrun): reaches a small target quickly and reports consistent figures;
the max-steps path says clearly that the target was not reached."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import deepnet
from deepnet import ModelFile
from deepnet.errors import ConfigError
from deepnet.training.heldout import read_rows
from deepnet.cli import show_speedrun
from deepnet.training.speedrun import SPEEDRUN, SpeedrunRecipe, speedrun
from helpers import MNIST_DIR, have_mnist

pytestmark = pytest.mark.skipif(not have_mnist(), reason="no MNIST")
SMALL = ["--layers", "100", "--holdout", "2000", "--test-samples", "2000", "--eval-every", "25"]


def run(*args, cwd):
    # The subprocess runs the deepnet these tests imported, not whichever one is installed.
    env = {"DEEPNET_DATA": str(MNIST_DIR), "PATH": "", "PYTHONPATH": str(Path(deepnet.__file__).parents[1])}
    return subprocess.run([sys.executable, "-m", "deepnet", "speedrun", *args], cwd=cwd, capture_output=True,
                          text=True, env=env, timeout=300)


def test_small_speedrun_reaches_its_target(tmp_path):
    proc = run("--target-acc", "0.5", *SMALL, "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    report = lines[-1]
    assert report["event"] == "speedrun" and report["reached"] is True
    assert report["heldout_acc"] >= 0.5 and report["target_acc"] == 0.5
    assert report["steps"] % 25 == 0 and report["steps"] <= SPEEDRUN.max_steps
    assert 0 < report["time_to_target"] == pytest.approx(report["seconds"], rel=1e-6)
    assert report["time_to_target"] == pytest.approx(report["train_seconds"] + report["eval_seconds"], rel=1e-9)
    assert report["evaluations"] >= 1 and report["heldout_samples"] == 2000
    assert report["test_samples"] == 2000 and 0.3 < report["test_acc"] <= 1
    assert report["recipe"]["layers"] == 100 and report["recipe"]["in_memory"] is True
    assert report["model"] is None and "CPUs" in report["machine"]
    # the table rows (JSON reports) end at the step the target was reached, with its held-out figure
    reports = [e for e in lines if e["event"] == "report"]
    assert reports[-1]["step"] == report["steps"] and reports[-1]["heldout_acc"] == report["heldout_acc"]
    assert all("eta_seconds" not in e for e in reports)  # the run stops at its target: no ETA to max-steps
    assert list(tmp_path.iterdir()) == []  # the temporary model is gone


def test_speedrun_text_and_kept_model(tmp_path, mnist_dir, capsys):
    report = speedrun(model=tmp_path / "kept.h5", layers=50, target_acc=0.4, holdout=1000, eval_every=20,
                      test_samples=500, progress=False)
    assert capsys.readouterr().out == ""  # the API returns the report; the CLI prints it
    show_speedrun(report, {"json": False})
    out = capsys.readouterr().out
    assert report["reached"] and "time to target" in out and "to held-out accuracy" in out and "machine" in out
    with ModelFile.open(tmp_path / "kept.h5") as f:
        assert f.step == report["steps"]
        assert f.train_settings["holdout"] == 1000 and f.train_settings["train_limit"] == 59_000
        assert read_rows(f.h5)["step"][-1] == report["steps"]
    # a kept model must be new
    with pytest.raises(ConfigError, match="already exists"):
        speedrun(model=tmp_path / "kept.h5", layers=50, progress=False)


def test_target_not_reached(tmp_path):
    proc = run("--target-acc", "0.99", *SMALL, "--max-steps", "50", "--eval-gate", "1", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "NOT reached in 50 steps" in proc.stdout
    assert "best held-out accuracy" in proc.stdout and "test" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith("deepnet: error: the target held-out accuracy 0.99 "
                                                           "was not reached in 50 steps")
    proc = run("--target-acc", "0.99", *SMALL, "--max-steps", "50", "--json", cwd=tmp_path)
    report = json.loads(proc.stdout.splitlines()[-1])
    assert proc.returncode == 1 and report["reached"] is False and report["time_to_target"] is None
    assert report["steps"] == 50 and "test_acc" in report


def test_recipe_is_one_place_and_checked(tmp_path, mnist_dir):
    assert isinstance(SPEEDRUN, SpeedrunRecipe) and SPEEDRUN.target_acc == 0.70 and SPEEDRUN.layers == 10_000_000
    with pytest.raises(ConfigError, match="--target-acc"):
        speedrun(target_acc=1.5, layers=5)
    with pytest.raises(ConfigError, match="--eval-every"):
        speedrun(eval_every=0, layers=5)
    with pytest.raises(ConfigError, match="no setting"):
        speedrun(lr=0.1)
