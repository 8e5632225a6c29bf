"""The evaluations a training run makes, kept in the model file (/train/evals, deepnet.formats.evals):
what is recorded, the same durability as /train/log (commit record, interrupted appends, checkpoints,
resume, kills), old files, validation, and the MLP file."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import deepnet
from deepnet.errors import ConfigError, ModelFileError
from deepnet.formats import evals, layout
from deepnet.formats.commit import EVAL_ROWS
from deepnet.formats.hdf5 import ModelFile
from deepnet.formats.mlp_file import append_mlp_evaluation, read_mlp_file
from deepnet.nn.mlp import MLP
from deepnet.tools.check import check_model


def new_model(path: Path, layers: int = 20) -> Path:
    ModelFile.create(path, layers=layers, width=2, activation="tanh", seed=1, progress=False).close()
    return path


def table(rows: np.ndarray) -> list[tuple]:
    """Rows as plain tuples (bit-exact floats) for comparisons."""
    return [(int(r["step"]), r["kind"].decode(), int(r["samples"]), float(r["loss"]), float(r["accuracy"]))
            for r in rows]


RUN = dict(layers=200, width=4, activation="softsign", seed=4, batch=5, train_limit=600, holdout=100,
           eval_every=3, test_samples=50, progress=False)


# ---------------------------------------------------------------------------------------------------
# what a run records


@pytest.mark.parametrize("in_memory", [False, True], ids=["streamed", "in-memory"])
def test_train_records_heldout_and_test_evaluations(tmp_path, mini_env, in_memory):
    path = tmp_path / "m.h5"
    final = deepnet.train(path, steps=7, in_memory=in_memory, checkpoint_every=2, report_every=2, **RUN)
    with ModelFile.open(path) as f:
        rows = table(f.read_evaluations())
        assert f.eval_rows == len(rows) == evals.stored_count(f.h5)
    assert [r[:3] for r in rows] == [(3, "heldout", 100), (6, "heldout", 100), (7, "test", 50)]
    assert rows[-1][3:] == (final["test_loss"], final["test_acc"])
    assert rows[1][4] == final["heldout_acc"]
    assert all(0 <= r[4] <= 1 and r[3] > 0 for r in rows)


def test_report_rows_carry_the_heldout_accuracy_the_file_records(tmp_path, mini_env):
    reports: list[dict] = []
    deepnet.train(tmp_path / "m.h5", steps=7, report_every=2, on_report=reports.append, **RUN)
    with ModelFile.open(tmp_path / "m.h5") as f:
        held = {r[0]: r[4] for r in table(f.read_evaluations()) if r[1] == "heldout"}
    assert [(r["step"], r["heldout_acc"]) for r in reports] == \
        [(2, None), (3, held[3]), (4, None), (6, held[6]), (7, None)]


def test_streamed_and_in_memory_runs_record_the_same_figures(tmp_path, mini_env):
    deepnet.train(tmp_path / "s.h5", steps=7, **RUN)
    deepnet.train(tmp_path / "m.h5", steps=7, in_memory=True, checkpoint_every=5, **RUN)
    with ModelFile.open(tmp_path / "s.h5") as a, ModelFile.open(tmp_path / "m.h5") as b:
        assert table(a.read_evaluations()) == table(b.read_evaluations())


@pytest.mark.parametrize("in_memory", [False, True], ids=["streamed", "in-memory"])
def test_resumed_runs_neither_duplicate_nor_lose_evaluations(tmp_path, mini_env, in_memory):
    deepnet.train(tmp_path / "one.h5", steps=12, in_memory=in_memory, checkpoint_every=4, **RUN)
    for steps in (4, 5, 3):  # pieces ending on and off the evaluation steps
        deepnet.train(tmp_path / "two.h5", steps=steps, in_memory=in_memory, checkpoint_every=4, **RUN)
    with ModelFile.open(tmp_path / "one.h5") as a, ModelFile.open(tmp_path / "two.h5") as b:
        one, two = table(a.read_evaluations()), table(b.read_evaluations())
    held = lambda rows: [r for r in rows if r[1] == "heldout"]  # noqa: E731
    assert held(one) == held(two) and [r[0] for r in held(two)] == [3, 6, 9, 12]
    assert [r[0] for r in two if r[1] == "test"] == [4, 9, 12]  # one test at the end of each piece
    assert [r for r in two if r[1] == "test"][-1] == [r for r in one if r[1] == "test"][-1]


def test_speedrun_records_its_evaluations(tmp_path, mini_env):
    path = tmp_path / "s.h5"
    report = deepnet.speedrun(model=path, layers=50, width=4, holdout=100, eval_every=2, max_steps=5,
                              target_acc=0.99, eval_gate=1.0, test_samples=50)
    with ModelFile.open(path) as f:
        rows = table(f.read_evaluations())
    assert [r[:3] for r in rows] == [(2, "heldout", 100), (4, "heldout", 100), (5, "test", 50)]
    assert rows[-1][4] == report["test_acc"] and rows[1][4] == report["heldout_acc"]


def test_train_mlp_records_its_test_evaluation_and_keeps_it(tmp_path, mini_env):
    path = tmp_path / "m.h5"
    first = deepnet.train_mlp(path, hidden=8, steps=6, batch=8, report_every=4, test_samples=40, train_limit=500)
    second = deepnet.train_mlp(path, steps=5, batch=8, report_every=2, test_samples=30, train_limit=500)
    rows = table(read_mlp_file(path).evals)
    assert rows == [(6, "test", 40, first["test_loss"], first["test_acc"]),
                    (11, "test", 30, second["test_loss"], second["test_acc"])]
    # a run without a test evaluation keeps them through its saves
    deepnet.train_mlp(path, steps=2, batch=8, report_every=1, test_samples=0, train_limit=500)
    assert table(read_mlp_file(path).evals) == rows


# ---------------------------------------------------------------------------------------------------
# the file: commits, checkpoints, interrupted appends


def test_an_evaluation_of_the_held_step_is_committed_at_once(tmp_path):
    path = new_model(tmp_path / "m.h5")
    with ModelFile.open(path, "r+") as f:
        seq = f.record["seq"]
        f.record_evaluation(0, "test", 10, 2.3, 0.1)
        assert f.record["seq"] == seq + 1 and f.record[EVAL_ROWS] == 1
    with ModelFile.open(path) as f:
        assert table(f.read_evaluations()) == [(0, "test", 10, 2.3, 0.1)]


def test_a_later_step_waits_for_the_checkpoint_that_writes_it(tmp_path):
    path = new_model(tmp_path / "m.h5")
    with ModelFile.open(path, "r+") as f:
        core, heads = f.read_core(), f.read_heads()
        f.record_evaluation(2, "heldout", 10, 1.5, 0.3)
        f.record_evaluation(4, "heldout", 10, 1.2, 0.4)
        assert f.eval_rows == 0 and f.waiting_evaluations.size == 2
        f.rewrite(core, step=3, heads=heads)
        assert table(f.read_evaluations()) == [(2, "heldout", 10, 1.5, 0.3)]
        assert table(f.waiting_evaluations) == [(4, "heldout", 10, 1.2, 0.4)]
        f.rewrite(core, step=4, heads=heads)
        f.record_evaluation(4, "test", 20, 1.0, 0.5)   # the step the file holds now: committed at once
    with ModelFile.open(path) as f:
        assert [r[:2] for r in table(f.read_evaluations())] == [(2, "heldout"), (4, "heldout"), (4, "test")]
        assert f.eval_rows == 3


def test_waiting_evaluations_are_lost_with_their_steps(tmp_path):
    path = new_model(tmp_path / "m.h5")
    with ModelFile.open(path, "r+") as f:
        f.record_evaluation(5, "heldout", 10, 1.5, 0.3)
    with ModelFile.open(path) as f:
        assert f.eval_rows == 0 and f.read_evaluations().size == 0


def test_rows_past_the_committed_count_are_ignored_then_overwritten(tmp_path):
    path = new_model(tmp_path / "m.h5")
    with ModelFile.open(path, "r+") as f:
        f.record_evaluation(0, "test", 10, 2.0, 0.2)
    with h5py.File(path, "r+") as h:  # an append a kill cut off after its rows, before the record
        ds = h[layout.TRAIN_EVALS]
        ds.resize((3,))
        ds[1:3] = evals.evaluation_rows([(9, "heldout", 1, 9.0, 0.9)] * 2)
    with ModelFile.open(path, "r+") as f:
        assert table(f.read_evaluations()) == [(0, "test", 10, 2.0, 0.2)] and evals.stored_count(f.h5) == 3
        report = check_model(path)
        assert report.healthy and any("2 rows past the committed ones" in line for line in report.findings)
        f.record_evaluation(0, "test", 20, 1.0, 0.3)
        assert evals.stored_count(f.h5) == 2
    with ModelFile.open(path) as f:
        assert table(f.read_evaluations()) == [(0, "test", 10, 2.0, 0.2), (0, "test", 20, 1.0, 0.3)]


def test_an_append_interrupted_before_its_record_commits_nothing(tmp_path, monkeypatch):
    path = new_model(tmp_path / "m.h5")
    with ModelFile.open(path, "r+") as f:
        f.record_evaluation(0, "test", 10, 2.0, 0.2)

        def killed(**changes):
            raise KeyboardInterrupt

        monkeypatch.setattr(f._commits, "write", killed)
        with pytest.raises(KeyboardInterrupt):
            f.record_evaluation(0, "test", 30, 1.0, 0.5)
    with ModelFile.open(path) as f:
        assert f.eval_rows == 1 and evals.stored_count(f.h5) == 2
        assert table(f.read_evaluations()) == [(0, "test", 10, 2.0, 0.2)]


def test_a_record_counting_more_rows_than_stored_is_refused(tmp_path):
    path = new_model(tmp_path / "m.h5")
    with ModelFile.open(path, "r+") as f:
        f._commits.write(**{EVAL_ROWS: 5})
    with pytest.raises(ModelFileError, match=r"counts 5 rows of /train/evals but the dataset has 0"):
        ModelFile.open(path)


def test_an_old_file_without_the_dataset_opens_and_gets_it(tmp_path):
    path = new_model(tmp_path / "m.h5")
    with h5py.File(path, "r+") as h:
        del h[layout.TRAIN_EVALS]
    with ModelFile.open(path, "r+") as f:
        assert f.read_evaluations().size == 0 and f.eval_rows == 0
        assert check_model(path).healthy
        f.record_evaluation(0, "heldout", 10, 2.0, 0.2)
    with ModelFile.open(path) as f:
        assert table(f.read_evaluations()) == [(0, "heldout", 10, 2.0, 0.2)]


def test_a_record_from_before_the_count_reads_as_none(tmp_path):
    path = new_model(tmp_path / "m.h5")
    with ModelFile.open(path, "r+") as f:
        record = f.record
        del record[EVAL_ROWS]
        f._commits._record = record   # as a deepnet before /train/evals committed it
        f.step = 0
        assert EVAL_ROWS not in f.record
    with ModelFile.open(path) as f:
        assert f.eval_rows == 0 and f.read_evaluations().size == 0


@pytest.mark.parametrize("dtype, shape, maxshape, message", [
    (layout.LOG_DTYPE, (0,), (None,), "dtype"),
    (layout.EVAL_DTYPE, (2,), (2,), "1-D and resizable"),
    (layout.EVAL_DTYPE, (1, 1), (None, 1), "1-D and resizable"),
])
def test_a_malformed_dataset_is_refused_on_opening(tmp_path, dtype, shape, maxshape, message):
    path = new_model(tmp_path / "m.h5")
    with h5py.File(path, "r+") as h:
        del h[layout.TRAIN_EVALS]
        h.create_dataset(layout.TRAIN_EVALS, shape=shape, maxshape=maxshape, dtype=dtype)
    with pytest.raises(ModelFileError, match=f"/train/evals.*{message}"):
        ModelFile.open(path)
    with pytest.raises(ModelFileError, match="/train/evals"):
        check_model(path)


@pytest.mark.parametrize("row, message", [
    ((0, "train", 10, 1.0, 0.5), "kind must be one of heldout, test"),
    ((0, "test", 0, 1.0, 0.5), "samples must be an integer >= 1"),
    ((-1, "test", 10, 1.0, 0.5), "step must be an integer >= 0"),
    ((1.5, "test", 10, 1.0, 0.5), "step must be an integer"),
    ((0, "test", 10, 1.0, 1.5), r"accuracy must be in \[0, 1\]"),
    ((0, "test", 10, float("nan"), 0.5), "loss must be a number >= 0"),
])
def test_bad_evaluations_are_refused_in_one_line(tmp_path, row, message):
    path = new_model(tmp_path / "m.h5")
    with ModelFile.open(path, "r+") as f:
        with pytest.raises(ConfigError, match=message) as info:
            f.record_evaluation(*row)
        assert "\n" not in str(info.value) and f.eval_rows == 0


def test_check_describes_and_refuses(tmp_path):
    path = new_model(tmp_path / "m.h5")
    with ModelFile.open(path, "r+") as f:
        f.record_evaluation(0, "heldout", 10, 2.0, 0.2)
        f.record_evaluation(0, "test", 10, 2.0, 0.2)
    assert "evaluations: 1 heldout (step 0), 1 test (step 0)" in check_model(path).findings
    with h5py.File(path, "r+") as h:  # an evaluation of a step the file does not hold: damage
        h[layout.TRAIN_EVALS][1] = evals.evaluation_rows([(7, "test", 10, 2.0, 0.2)])[0]
    report = check_model(path)
    assert report.status == "damaged" and "evaluation of step 7, after the committed step 0" in report.summary


def test_a_checkpoint_copies_an_unknown_kind_along(tmp_path):
    """Rows of a kind a newer deepnet wrote are kept as they are through a checkpoint."""
    path = new_model(tmp_path / "m.h5")
    with ModelFile.open(path, "r+") as f:
        f.record_evaluation(0, "test", 10, 2.0, 0.2)
    with h5py.File(path, "r+") as h:
        h[layout.TRAIN_EVALS][0] = (0, b"future", 10, 2.0, 0.2)
    with ModelFile.open(path, "r+") as f:
        f.rewrite(f.read_core(), step=1, heads=f.read_heads())
        assert [r[1] for r in table(f.read_evaluations())] == ["future"]
    assert any("kind this deepnet does not know: 'future'" in line for line in check_model(path).findings)


def test_mlp_file_saves_keep_evaluations_of_the_same_model_only(tmp_path):
    path = tmp_path / "m.h5"
    net = MLP.new(4, seed=1)
    net.save(path)
    append_mlp_evaluation(path, 0, "test", 10, 2.3, 0.1)
    net = MLP.load(path)
    net.train_step(np.zeros((2, 784), np.float32), np.array([0, 1]), 0.1)
    net.save(path)
    assert table(read_mlp_file(path).evals) == [(0, "test", 10, 2.3, 0.1)]
    MLP.new(4, seed=2).save(path)  # another model saved over it
    assert read_mlp_file(path).evals.size == 0
    with pytest.raises(ConfigError, match="kind must be"):
        append_mlp_evaluation(path, 0, "bogus", 10, 2.3, 0.1)
    with h5py.File(path, "r+") as h:  # an MLP file from before the dataset
        del h[layout.TRAIN_EVALS]
    assert read_mlp_file(path).evals.size == 0
    assert check_model(path).healthy


# ---------------------------------------------------------------------------------------------------
# killed writers


@pytest.mark.parametrize("in_memory", [False, True], ids=["streamed", "in-memory"])
def test_killed_runs_keep_every_committed_evaluation_once(tmp_path, mini, in_memory):
    """Kill `deepnet train` at random moments (evaluating every other step), continue, finish: the
    evaluations in the file are always the reference run's at committed steps, each once."""
    args = ["--layers", "3000", "--width", "4", "--seed", "2", "--batch", "5", "--train-limit", "600",
            "--holdout", "100", "--eval-every", "2", "--test-samples", "0", "--report-every", "3"]
    if in_memory:
        args += ["--in-memory", "--checkpoint-every", "3"]
    env = dict(os.environ, DEEPNET_DATA=str(mini))

    def train(path: Path, steps: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "deepnet", "train", "--model", str(path), "--steps",
                                 str(steps), *args], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    started = time.monotonic()
    assert train(tmp_path / "ref.h5", 40).wait(timeout=300) == 0
    whole = time.monotonic() - started  # start-up included: kills land anywhere in a run
    with ModelFile.open(tmp_path / "ref.h5") as f:
        reference = {r[0]: r for r in table(f.read_evaluations())}
    assert sorted(reference) == list(range(2, 41, 2))

    path = tmp_path / "m.h5"

    def committed() -> int:
        if not path.exists():
            return 0
        with ModelFile.open(path) as f:
            return f.step

    rand = random.Random(7)
    kills = 0
    while kills < 5 and committed() < 40:
        proc = train(path, 40 - committed())
        time.sleep(rand.uniform(0.15, 0.6) * whole)  # a kill lands before even a warm run ends
        proc.send_signal(signal.SIGKILL)
        kills += proc.wait(timeout=60) == -signal.SIGKILL
        if not path.exists():
            continue
        with ModelFile.open(path) as f:
            step, rows, healthy = f.step, table(f.read_evaluations()), f.state().healthy
        steps = [r[0] for r in rows]
        assert steps == sorted(set(steps)) and all(s <= step for s in steps)
        assert all(reference[r[0]] == r for r in rows)
        if not healthy:  # killed mid-step (streamed): its evaluations are checked; going on needs --resume-torn,
            return       # whose mixed step no longer follows the reference run
    if committed() < 40:
        assert train(path, 40 - committed()).wait(timeout=300) == 0
    with ModelFile.open(path) as f:
        rows = table(f.read_evaluations())
    steps = [r[0] for r in rows]
    assert steps == sorted(set(steps)) and all(reference[r[0]] == r for r in rows)
    assert steps[-1] == 40 and kills
