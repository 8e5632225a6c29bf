"""Learning-rate schedules (deepnet.training.schedule): the factors, the stored form, the resume rule, and that a
resumed run continues a schedule bit for bit."""

from __future__ import annotations

import math

import numpy as np
import pytest

import deepnet
from deepnet import ModelFile
from deepnet.errors import ConfigError
from deepnet.training.schedule import Schedule, resolve
from helpers import read_weights


def test_constant_and_warmup():
    s = Schedule()
    assert [s.factor(t) for t in (0, 1, 10_000)] == [1.0, 1.0, 1.0]
    w = Schedule("constant", warmup_steps=4)
    assert [w.factor(t) for t in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_and_linear_values():
    c = Schedule("cosine", decay_steps=100, final_ratio=0.1)
    assert c.factor(0) == 1.0
    assert c.factor(50) == pytest.approx(0.1 + 0.9 * 0.5)
    assert c.factor(25) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert c.factor(100) == pytest.approx(0.1) and c.factor(5000) == pytest.approx(0.1)
    lin = Schedule("linear", warmup_steps=10, decay_steps=110, final_ratio=0.0)
    assert lin.factor(4) == pytest.approx(0.5)           # warmup: (t + 1) / 10
    assert lin.factor(10) == 1.0                          # the decay starts after the warmup
    assert lin.factor(60) == pytest.approx(0.5)
    assert lin.factor(110) == 0.0 and lin.factor(200) == 0.0
    # a schedule started later is shifted: same shape from its start_step
    later = Schedule("linear", warmup_steps=10, decay_steps=1110, start_step=1000)
    assert [later.factor(1000 + t) for t in (4, 10, 60, 110)] == [lin.factor(t) for t in (4, 10, 60, 110)]
    # unresolved decay: needs an end
    with pytest.raises(ConfigError, match="needs decay_steps"):
        Schedule("cosine").factor(3)
    assert Schedule("cosine").factor(50, end=100) == pytest.approx(0.5)
    assert Schedule("cosine").resolved(100) == Schedule("cosine", decay_steps=100)


def test_json_round_trip_and_validation():
    for s in (Schedule(), Schedule("cosine", 5, 1000, 0.1, 20), Schedule("linear", 0, None, 1.0)):
        assert Schedule.from_json(s.to_json()) == s
        assert Schedule.from_dict(s.to_dict()) == s
    assert Schedule("COSINE").kind == "cosine"
    for bad, match in (({"kind": "step"}, "--schedule"), ({"warmup_steps": -1}, "--warmup"),
                       ({"final_ratio": 1.5}, "--final-lr-ratio"), ({"decay_steps": 0}, "--decay-steps")):
        with pytest.raises(ConfigError, match=match):
            Schedule(**bad)
    with pytest.raises(ConfigError, match="unknown fields"):
        Schedule.from_dict({"kind": "cosine", "gamma": 2})
    with pytest.raises(ConfigError, match="not valid JSON"):
        Schedule.from_json("{")


def test_resolve_rule():
    default = Schedule()
    new = resolve(None, step=0, run_end=100, default=default, kind="cosine", final_ratio=0.2)
    assert new["layer_schedule"] == new["head_schedule"] == Schedule("cosine", 0, 100, 0.2, 0)
    stored = {k: v.to_dict() for k, v in new.items()}
    # no flags: the stored schedules as they are, whatever this run's length
    assert resolve(stored, step=40, run_end=90, default=default) == new
    # any flag: a new schedule from the current step, other fields as stored, decay to this run's end
    again = resolve(stored, step=100, run_end=300, default=default, warmup=10)
    assert again["layer_schedule"] == Schedule("cosine", 10, 300, 0.2, 100)
    with pytest.raises(ConfigError, match="must be after the model's step 100"):
        resolve(stored, step=100, run_end=300, default=default, decay_steps=50)
    # an old model's settings without schedules: the default
    assert resolve({"layer_lr": 0.1}, step=7, run_end=9, default=default)["head_schedule"] == default


def test_train_uses_and_stores_the_schedule(tmp_path, mnist_dir, capsys):
    path = tmp_path / "m.h5"
    deepnet.train(path, steps=8, layers=10, width=4, layer_lr=0.1, head_lr=0.2, schedule="linear", warmup=2,
                  final_lr_ratio=0.5, test_samples=0, progress=False)
    capsys.readouterr()
    with ModelFile.open(path) as f:
        settings = f.train_settings
    assert settings["layer_lr"] == 0.1 and settings["head_lr"] == 0.2
    assert Schedule.from_dict(settings["layer_schedule"]) == Schedule("linear", 2, 8, 0.5, 0)
    assert settings["head_schedule"] == settings["layer_schedule"]


@pytest.mark.parametrize("in_memory", [True, False], ids=["in_memory", "streamed"])
def test_resume_continues_the_schedule_bit_exactly(tmp_path, mnist_dir, capsys, in_memory):
    """N steps in one run == N/2 + N/2 (the second run given no schedule flags), with a cosine schedule."""
    kw = dict(layers=16, width=4, test_samples=0, progress=False, in_memory=in_memory)
    one = tmp_path / "one.h5"
    deepnet.train(one, steps=20, schedule="cosine", warmup=3, final_lr_ratio=0.1, decay_steps=20,
                  layer_lr=0.3, head_lr=0.3, **kw)
    two = tmp_path / "two.h5"
    deepnet.train(two, steps=10, schedule="cosine", warmup=3, final_lr_ratio=0.1, decay_steps=20,
                  layer_lr=0.3, head_lr=0.3, **kw)
    deepnet.train(two, steps=10, **kw)
    capsys.readouterr()
    (h1, c1), (h2, c2) = read_weights(one), read_weights(two)
    assert np.array_equal(c1, c2)
    for key in h1:
        assert np.array_equal(h1[key], h2[key]), key
    # ... and the schedule mattered: a constant-rate run ends elsewhere.
    const = tmp_path / "const.h5"
    deepnet.train(const, steps=20, layer_lr=0.3, head_lr=0.3, **kw)
    capsys.readouterr()
    assert not np.array_equal(read_weights(const)[1], c1)


def test_the_mlp_schedules_are_schedules_and_store_nothing_new():
    """The MLP baseline's --schedule values are Schedule values; a dense schedule's stored form is unchanged."""
    from deepnet.training.schedule import parse_run_schedule

    cosine = parse_run_schedule("cosine", 5000)
    assert isinstance(cosine, Schedule) and cosine.lr(0.2, 0) == 0.2
    # the MLP's rounding of the cosine angle, pi * t / steps, bit for bit
    assert all(cosine.lr(0.2, t) == 0.2 * 0.5 * (1.0 + math.cos(math.pi * t / 5000)) for t in range(0, 5000, 7))
    stepped = parse_run_schedule("step:2500=0.03", 5000)
    assert (stepped.lr(0.05, 2499), stepped.lr(0.05, 2500)) == (0.05, 0.03)
    assert Schedule.from_dict(stepped.to_dict()) == stepped
    assert set(Schedule("cosine", decay_steps=10).to_dict()) == {"kind", "warmup_steps", "decay_steps",
                                                                 "final_ratio", "start_step"}
    with pytest.raises(ConfigError, match="--schedule"):
        Schedule("step")  # a step schedule needs its points
