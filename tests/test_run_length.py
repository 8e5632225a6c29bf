"""Run length and training-loop conventions: --until-step, the structured Ctrl-C stop, the schedule that
continues when the same flags are given again, dense step schedules and --lr, --keep-best and
--patience, the steady-state ETA, and a library that prints nothing."""

from __future__ import annotations

import logging
import math
import os
import signal

import numpy as np
import pytest

import deepnet
from deepnet import ModelFile
from deepnet.errors import ConfigError
from deepnet.nn.mlp import MLP
from deepnet.nn.network import DeepNet
from deepnet.training import heldout as _heldout
from deepnet.training import schedule as _schedule
from deepnet.training.best import best_path
from deepnet.training.loop import StepClock
from deepnet.training.schedule import Schedule
from deepnet.training.signals import Interrupted, StopSignal
from helpers import read_weights
from test_reliability import assert_same, file_state

TINY = dict(layers=200, width=4, seed=3, batch=4, train_limit=500, test_samples=0, progress=False)


def interrupt_at(step: int):
    """An on_report that sends this process SIGINT once the run reports ``step`` (report_every=1): the
    run's own handler finishes the step, saves and stops, as for a Ctrl-C."""
    def on_report(row: dict) -> None:
        if row["step"] == step:
            os.kill(os.getpid(), signal.SIGINT)
    return on_report


# ---------------------------------------------------------------------------------------------------
# --until-step


def test_until_step_trains_to_the_step_and_then_takes_none(tmp_path, mnist_dir):
    path = tmp_path / "m.h5"
    assert deepnet.train(path, until_step=4, **TINY)["step"] == 4
    final = deepnet.train(path, until_step=7, **TINY)
    assert (final["steps"], final["step"]) == (3, 7)
    again = deepnet.train(path, until_step=7, test_samples=50, progress=False)
    assert (again["steps"], again["step"]) == (0, 7) and 0 <= again["test_acc"] <= 1  # still a final result
    assert math.isnan(again["seconds_per_step"])
    with pytest.raises(ConfigError, match="--until-step 5 is before the model's step 7"):
        deepnet.train(path, until_step=5, progress=False)
    with pytest.raises(ConfigError, match="--steps .* and --until-step .* cannot both be given"):
        deepnet.train(tmp_path / "new.h5", steps=3, until_step=5, progress=False)
    assert not (tmp_path / "new.h5").exists()


def test_ctrl_c_then_the_same_command_finishes_the_plan_bit_for_bit(tmp_path, mnist_dir):
    """A cosine schedule with warmup, decaying to --until-step: interrupted at step 5, then the same call
    again, gives the file of one uninterrupted call (weights, generator, log)."""
    flags = dict(until_step=12, schedule="cosine", warmup=3, final_lr_ratio=0.1, report_every=1, **TINY)
    deepnet.train(tmp_path / "one.h5", **flags)
    with pytest.raises(Interrupted) as stopped:
        deepnet.train(tmp_path / "two.h5", on_report=interrupt_at(5), **flags)
    exc = stopped.value
    assert (exc.held_step, exc.until_step) == (5, 12)
    assert str(exc) == f"stopped after step 5 of 12; {tmp_path / 'two.h5'} holds step 5"
    assert deepnet.train(tmp_path / "two.h5", **flags)["step"] == 12
    assert_same(file_state(tmp_path / "one.h5"), file_state(tmp_path / "two.h5"))
    with ModelFile.open(tmp_path / "two.h5") as f:
        stored = Schedule.from_dict(f.train_settings["layer_schedule"])
    assert (stored.start_step, stored.decay_steps) == (0, 12)  # the first run's schedule, continued


def test_steps_given_again_starts_a_new_decay(tmp_path, mnist_dir):
    path = tmp_path / "m.h5"
    deepnet.train(path, steps=4, schedule="cosine", **TINY)
    deepnet.train(path, steps=4, schedule="cosine", **TINY)
    with ModelFile.open(path) as f:
        stored = Schedule.from_dict(f.train_settings["layer_schedule"])
    assert (stored.start_step, stored.decay_steps) == (4, 8)


def test_the_resolve_rule():
    stored = {"layer_schedule": Schedule("cosine", warmup_steps=5, decay_steps=100, final_ratio=0.1).to_dict(),
              "head_schedule": Schedule("cosine", warmup_steps=5, decay_steps=100, final_ratio=0.1).to_dict()}
    same = _schedule.resolve(stored, step=40, run_end=100, default=Schedule(), kind="cosine", warmup=5,
                             final_ratio=0.1)
    assert same["layer_schedule"].start_step == 0 and same["layer_schedule"].decay_steps == 100
    for changed in (dict(run_end=120), dict(run_end=100, warmup=6), dict(run_end=100, final_ratio=0.2),
                    dict(run_end=100, kind="linear")):
        args = {"kind": "cosine", "warmup": 5, "final_ratio": 0.1, **changed}
        new = _schedule.resolve(stored, step=40, default=Schedule(), **args)["layer_schedule"]
        assert new.start_step == 40, changed
    assert _schedule.resolve(stored, step=40, run_end=70, default=Schedule())["layer_schedule"].start_step == 0
    with pytest.raises(ConfigError, match="takes no --warmup"):
        _schedule.resolve(None, step=0, run_end=10, default=Schedule(), kind="step:5=0.1", warmup=2)
    with pytest.raises(ConfigError, match="--schedule must be"):
        _schedule.resolve(None, step=0, run_end=10, default=Schedule(), kind="sine")


def test_mlp_until_step_and_its_stop(tmp_path, mnist_dir):
    common = dict(hidden=16, batch=16, train_limit=1000, test_samples=0, report_every=1, progress=False)
    deepnet.train_mlp(tmp_path / "one.h5", until_step=30, **common)
    with pytest.raises(Interrupted) as stopped:
        deepnet.train_mlp(tmp_path / "two.h5", until_step=30, on_report=interrupt_at(11), **common)
    assert (stopped.value.held_step, stopped.value.until_step) == (11, 30)
    assert "stopped after step 11 of 30" in str(stopped.value)
    assert MLP.load(tmp_path / "two.h5").step == 11
    final = deepnet.train_mlp(tmp_path / "two.h5", until_step=30, **common)
    assert (final["steps"], final["step"]) == (19, 30)
    a, b = MLP.load(tmp_path / "one.h5"), MLP.load(tmp_path / "two.h5")
    for key in a.params():
        assert np.array_equal(a.params()[key], b.params()[key]), key  # the cosine over steps 0..30, continued
    with pytest.raises(Interrupted) as stopped:  # --steps: the plan ends at the first step plus --steps
        deepnet.train_mlp(tmp_path / "two.h5", steps=10, on_report=interrupt_at(33), **common)
    assert (stopped.value.held_step, stopped.value.until_step) == (33, 40)
    with pytest.raises(ConfigError, match="cannot both be given"):
        deepnet.train_mlp(tmp_path / "x.h5", steps=3, until_step=4, **common)
    with pytest.raises(ConfigError, match="--until-step 5 is before the model's step 33"):
        deepnet.train_mlp(tmp_path / "two.h5", until_step=5, **common)


# ---------------------------------------------------------------------------------------------------
# --lr and dense step schedules


def recorded_rates(monkeypatch) -> list:
    seen = []
    original = DeepNet.train_step

    def train_step(self, x, y, *, layer_lr, head_lr, **kw):
        seen.append((self.step, layer_lr, head_lr))
        return original(self, x, y, layer_lr=layer_lr, head_lr=head_lr, **kw)

    monkeypatch.setattr(DeepNet, "train_step", train_step)
    return seen


def expected_step_rates(first: int, steps: int, base_layer: float, base_head: float, points) -> list:
    out = []
    for t in range(first, first + steps):
        layer = base_layer
        for at, value in points:
            if t >= at:
                layer = value
        out.append((t, layer, base_head * layer / base_layer))
    return out


def test_dense_step_schedule_rates_and_resume(tmp_path, mnist_dir, monkeypatch):
    seen = recorded_rates(monkeypatch)
    flags = dict(layer_lr=0.1, head_lr=0.04, schedule="step:3=0.02,6=0.005", **TINY)
    deepnet.train(tmp_path / "a.h5", steps=8, **flags)
    expected = expected_step_rates(0, 8, 0.1, 0.04, [(3, 0.02), (6, 0.005)])
    assert [s for s, _, _ in seen] == list(range(8))
    assert np.allclose([r[1:] for r in seen], [r[1:] for r in expected], rtol=1e-12, atol=0)
    # in two pieces, the second without the flags: the stored schedule goes on
    seen.clear()
    deepnet.train(tmp_path / "b.h5", steps=4, **flags)
    deepnet.train(tmp_path / "b.h5", steps=4, **TINY)
    assert np.allclose([r[1:] for r in seen], [r[1:] for r in expected], rtol=1e-12, atol=0)
    assert_same(file_state(tmp_path / "a.h5"), file_state(tmp_path / "b.h5"))
    # started on a trained model, T counts from the run's first step
    seen.clear()
    deepnet.train(tmp_path / "b.h5", steps=5, lr=0.2, schedule="step:2=0.05", **TINY)
    assert np.allclose([r[1:] for r in seen], [r[1:] for r in expected_step_rates(0, 5, 0.2, 0.2, [(2, 0.05)])])
    assert [s for s, _, _ in seen] == list(range(8, 13))


def test_lr_sets_both_rates_and_the_specific_flags_win(tmp_path, mnist_dir, monkeypatch):
    seen = recorded_rates(monkeypatch)
    deepnet.train(tmp_path / "a.h5", steps=1, lr=0.3, **TINY)
    deepnet.train(tmp_path / "a.h5", steps=1, lr=0.3, head_lr=0.01, **TINY)
    deepnet.train(tmp_path / "a.h5", steps=1, lr=0.3, layer_lr=0.02, **TINY)
    deepnet.train(tmp_path / "a.h5", steps=1, **TINY)  # the last rates, stored
    assert [r[1:] for r in seen] == [(0.3, 0.3), (0.3, 0.01), (0.02, 0.3), (0.02, 0.3)]
    with pytest.raises(ConfigError, match="--lr"):
        deepnet.train(tmp_path / "a.h5", steps=1, lr=-1.0, progress=False)


# ---------------------------------------------------------------------------------------------------
# --keep-best and --patience


HELD = dict(holdout=300, eval_every=2, report_every=1, **TINY)


def scripted_accuracies(monkeypatch, values):
    """Held-out measurements that return ``values`` in turn (the real evaluation still runs and is stored)."""
    values = iter(values)
    original = _heldout.HeldOut.measure

    def measure(self, net):
        original(self, net)
        return next(values)

    monkeypatch.setattr(_heldout.HeldOut, "measure", measure)


@pytest.mark.parametrize("in_memory", [False, True], ids=["streamed", "in-memory"])
def test_keep_best_and_patience(tmp_path, mnist_dir, monkeypatch, in_memory):
    # evaluations at steps 2, 4, 6, 8, 10: the best is step 4 (0.3 again at step 10 is no improvement),
    # and the third evaluation after it without a new best stops the run, at step 10 of 20.
    scripted_accuracies(monkeypatch, [0.1, 0.3, 0.2, 0.25, 0.3, 0.9])
    final = deepnet.train(tmp_path / "p.h5", until_step=20, keep_best=True, patience=3, in_memory=in_memory,
                          **HELD)
    assert (final["step"], final["stopped_early"]) == (10, True)
    assert (final["best_heldout_acc"], final["best_heldout_step"]) == (0.3, 4)
    assert final["best_model"] == str(tmp_path / "p.best.h5") == str(best_path(tmp_path / "p.h5"))
    # the best file is the model at step 4: the same run stopped there
    monkeypatch.undo()
    deepnet.train(tmp_path / "ref.h5", until_step=4, in_memory=in_memory, **HELD)
    (best_heads, best_core), (ref_heads, ref_core) = read_weights(tmp_path / "p.best.h5"), read_weights(tmp_path / "ref.h5")
    assert np.array_equal(best_core, ref_core) and all(np.array_equal(best_heads[k], ref_heads[k]) for k in ref_heads)
    with ModelFile.open(tmp_path / "p.best.h5") as f:
        assert f.step == 4 and f.state().healthy
    assert deepnet.evaluate(tmp_path / "p.best.h5", test_samples=20)["step"] == 4


def test_the_best_survives_a_resume(tmp_path, mnist_dir, monkeypatch):
    path = tmp_path / "m.h5"
    scripted_accuracies(monkeypatch, [0.1, 0.3, 0.2])
    first = deepnet.train(path, until_step=6, keep_best=True, patience=3, **HELD)
    assert (first["best_heldout_step"], first["stopped_early"]) == (4, False)
    with ModelFile.open(path) as f:
        assert f.train_settings["best_heldout"] == {"acc": 0.3, "step": 4, "since": 1}
    monkeypatch.undo()
    # resumed: 0.25 and 0.3 are no better than the stored 0.3, so the third evaluation since step 4 stops it
    scripted_accuracies(monkeypatch, [0.25, 0.3, 0.99])
    final = deepnet.train(path, until_step=20, keep_best=True, patience=3, **HELD)
    assert (final["step"], final["stopped_early"], final["best_heldout_step"]) == (10, True, 4)
    with ModelFile.open(best_path(path)) as f:
        assert f.step == 4
    # its patience has run out: the same command takes no step, and says it stopped early
    again = deepnet.train(path, until_step=20, keep_best=True, patience=3, **HELD)
    assert (again["steps"], again["stopped_early"], again["best_model"]) == (0, True, str(best_path(path)))


def test_keep_best_and_patience_need_heldout(tmp_path, mnist_dir):
    for flags, name in ((dict(keep_best=True), "--keep-best"), (dict(patience=2), "--patience")):
        with pytest.raises(ConfigError, match=f"{name} judges by the held-out accuracy"):
            deepnet.train(tmp_path / "m.h5", steps=1, **flags, **TINY)
    with pytest.raises(ConfigError, match="--patience"):
        deepnet.train(tmp_path / "m.h5", steps=1, patience=0, holdout=100, eval_every=1, **TINY)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# ETA, notices, silence


def test_step_clock_leaves_out_the_warm_up():
    times = iter([0.0, 3.0, 6.0, 9.0, 9.8, 10.6, 11.4, 12.2, 14.2, 15.0])  # start, then after each step
    clock = StepClock(warmup=3, now=lambda: next(times))
    assert math.isnan(clock.seconds_per_step()) and clock.eta(0) == 0.0
    clock.tick()
    assert clock.seconds_per_step() == 3.0  # one interval: it is all there is
    clock.tick()
    clock.tick()
    assert clock.seconds_per_step() == 3.0  # the median of the early intervals after the first
    for _ in range(6):
        clock.tick()
    # after the 3 warm-up intervals: 0.8, 0.8, 0.8, 0.8, 2.0 (a held-out evaluation), 0.8
    assert clock.seconds_per_step() == pytest.approx((0.8 * 5 + 2.0) / 6)
    assert clock.eta(100) == pytest.approx(100 * (0.8 * 5 + 2.0) / 6)


def test_stop_signal_notices_are_logged(caplog):
    stop = StopSignal()
    with caplog.at_level(logging.INFO, logger="deepnet"), stop:
        stop.arm()
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.count == 1
    assert [r.name for r in caplog.records] == ["deepnet.training.signals"]
    assert caplog.records[0].getMessage().startswith("finishing the current step")


def test_the_library_prints_nothing(tmp_path, mnist_dir, capfd):
    deepnet.train(tmp_path / "m.h5", steps=3, report_every=1, keep_best=True, holdout=100, eval_every=1,
                  **{**TINY, "test_samples": 20})
    deepnet.train_mlp(tmp_path / "mlp.h5", hidden=8, steps=3, report_every=1, train_limit=200, test_samples=20,
                      progress=False)
    out = capfd.readouterr()
    assert (out.out, out.err) == ("", "")
