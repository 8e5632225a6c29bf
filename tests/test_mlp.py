"""The baseline MLP (deepnet.nn.mlp, `deepnet train-mlp` / `eval-mlp`): the gradient, the file, resuming,
the schedules, the errors, and learning on real MNIST (a small fast budget; the full recipe is slow)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest

import deepnet
from deepnet.cli import main
from deepnet.errors import ConfigError, ModelFileError
from deepnet.formats.hdf5 import LOG_DTYPE
from deepnet.formats.mlp_file import model_kind
from deepnet.nn.mlp import MLP
from deepnet.api import evaluate_mlp, train_mlp
from deepnet.training.mlp import MLP_RECIPE, ORIGINAL_MLP_RECIPE
from deepnet.training.schedule import parse_run_schedule


def _files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _run(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip() and "it/s" not in line and "|" not in line]
    assert len(lines) == 1 and lines[0].startswith("deepnet: error: "), err
    assert "Traceback" not in err
    return lines[0]


# ----------------------------------------------------------------------------------------------
# the maths


def _loss64(params: dict, x: np.ndarray, y: np.ndarray) -> float:
    w1, b1, w2, b2 = (params[k].astype(np.float64) for k in ("w1", "b1", "w2", "b2"))
    h = np.maximum(x.astype(np.float64) @ w1 + b1, 0)
    z = h @ w2 + b2
    z -= z.max(axis=1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(y)), y]))


def test_train_step_is_sgd_on_the_softmax_cross_entropy():
    rng = np.random.default_rng(1)
    net = MLP.new(7, seed=3, input_dim=12, n_classes=4)
    net.b1[:] = rng.uniform(0.05, 0.2, 7)  # keep every ReLU away from its kink for finite differences
    x = rng.uniform(0, 1, (9, 12)).astype(np.float32)
    y = rng.integers(0, 4, 9)
    before = {k: v.copy() for k, v in net.params().items()}
    loss, acc, _ = net.train_step(x, y, lr=1.0)
    assert loss == pytest.approx(_loss64(before, x, y), rel=1e-5)
    assert acc == np.mean(np.argmax(MLP(**before).logits(x), axis=1) == y)
    eps = 1e-4
    for name in ("w1", "b1", "w2", "b2"):
        grad = before[name] - net.params()[name]  # lr = 1
        flat = before[name].reshape(-1)
        for i in rng.choice(flat.size, size=min(6, flat.size), replace=False):
            plus = {k: v.astype(np.float64) for k, v in before.items()}
            minus = {k: v.astype(np.float64) for k, v in before.items()}
            plus[name].reshape(-1)[i] += eps
            minus[name].reshape(-1)[i] -= eps
            numeric = (_loss64(plus, x, y) - _loss64(minus, x, y)) / (2 * eps)
            assert grad.reshape(-1)[i] == pytest.approx(numeric, rel=2e-3, abs=2e-6), (name, i)
    assert net.step == 1


def test_init_is_he_and_xavier_uniform_and_seeded():
    a, b, c = MLP.new(300, seed=5), MLP.new(300, seed=5), MLP.new(300, seed=6)
    assert np.array_equal(a.w1, b.w1) and not np.array_equal(a.w1, c.w1)
    assert a.w1.dtype == np.float32 and a.w1.shape == (784, 300) and a.w2.shape == (300, 10)
    assert np.abs(a.w1).max() <= math.sqrt(6 / 784) and np.abs(a.w1).max() > 0.95 * math.sqrt(6 / 784)
    assert np.abs(a.w2).max() <= math.sqrt(6 / 310) and np.abs(a.w2).max() > 0.9 * math.sqrt(6 / 310)
    assert not a.b1.any() and not a.b2.any()


@pytest.mark.parametrize("spec, expect", [
    ("constant", [0.1, 0.1, 0.1, 0.1]),
    ("cosine", [0.1, 0.05 * (1 + math.cos(math.pi / 4)), 0.05, 0.05 * (1 + math.cos(3 * math.pi / 4))]),
    ("linear", [0.1, 0.075, 0.05, 0.025]),
    ("step:2=0.03", [0.1, 0.1, 0.03, 0.03]),
    ("step:1=0.05,3=0.01", [0.1, 0.05, 0.05, 0.01]),
])
def test_schedules(spec, expect):
    schedule = parse_run_schedule(spec, 4)
    assert [schedule.lr(0.1, t) for t in range(4)] == pytest.approx(expect)


@pytest.mark.parametrize("spec", ["cosin", "step:", "step:10", "step:a=0.1", "step:5=0.1,3=0.2", "step:0=0.1",
                                  "step:5=-1", 3])
def test_bad_schedules(spec):
    with pytest.raises(ConfigError, match="--schedule"):
        parse_run_schedule(spec, 4)


def test_recipes_are_documented_values():
    assert (MLP_RECIPE.hidden, MLP_RECIPE.batch, MLP_RECIPE.lr, MLP_RECIPE.schedule) == (512, 128, 0.2, "cosine")
    assert (ORIGINAL_MLP_RECIPE.hidden, ORIGINAL_MLP_RECIPE.batch, ORIGINAL_MLP_RECIPE.steps) == (128, 128, 5000)
    assert parse_run_schedule(ORIGINAL_MLP_RECIPE.schedule, 5000).lr(ORIGINAL_MLP_RECIPE.lr, 4999) == 0.03


# ----------------------------------------------------------------------------------------------
# the file


def test_file_layout_and_round_trip(tmp_path):
    net = MLP.new(16, seed=2)
    rng = np.random.default_rng(0)
    for _ in range(3):
        net.train_step(rng.uniform(0, 1, (5, 784)), rng.integers(0, 10, 5), 0.1)
    net.rng_state = np.random.default_rng([2, 1]).bit_generator.state
    path = tmp_path / "m.h5"
    net.save(path)
    assert _files(tmp_path) == ["m.h5"]  # no temporary left beside it
    with h5py.File(path, "r") as f:
        a = f.attrs
        assert a["format"] == "deepnet" and a["format_version"] == 1 and a["kind"] == "mlp"
        assert (a["hidden"], a["input_dim"], a["n_classes"], a["step"], a["seed"]) == (16, 784, 10, 3, 2)
        assert json.loads(a["rng_state"])["bit_generator"] == "PCG64"
        assert a["created"] and a["updated"]
        assert f["mlp/w1"].shape == (784, 16) and f["mlp/b1"].shape == (16,)
        assert f["mlp/w2"].shape == (16, 10) and f["mlp/b2"].shape == (10,)
        assert all(f[f"mlp/{k}"].dtype == np.float32 for k in ("w1", "b1", "w2", "b2"))
        assert f["train/log"].dtype == LOG_DTYPE and list(f["train/log"]["step"]) == [1, 2, 3]
    back = MLP.load(path)
    for k, v in net.params().items():
        assert np.array_equal(back.params()[k], v)
    assert back.step == 3 and back.seed == 2 and back.rng_state == net.rng_state
    assert model_kind(path) == "mlp"


def test_kinds_are_told_apart(tmp_path, capsys):
    deepnet.init(tmp_path / "dense.h5", layers=10, width=4, activation="softsign", progress=False)
    MLP.new(8).save(tmp_path / "mlp.h5")
    (tmp_path / "notes.txt").write_text("hello")
    assert model_kind(tmp_path / "dense.h5") == "dense" and model_kind(tmp_path / "notes.txt") is None
    with pytest.raises(ModelFileError, match="kind 'dense'"):
        MLP.load(tmp_path / "dense.h5")
    with pytest.raises(ModelFileError, match="not a deepnet model file"):
        MLP.load(tmp_path / "notes.txt")
    with pytest.raises(ModelFileError, match="no model file"):
        MLP.load(tmp_path / "missing.h5")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    line = _one_line_error(*_run(capsys, "eval-mlp", "--model", tmp_path / "dense.h5", "--samples", 10)[::2])
    assert "kind 'dense'" in line
    code, out, err = _run(capsys, "eval", "--model", tmp_path / "mlp.h5", "--test-samples", 10, "--json")
    assert code == 0 and json.loads(out)["hidden"] == 8, err  # eval dispatches on the model's kind
    line = _one_line_error(*_run(capsys, "train", "--model", tmp_path / "mlp.h5", "--steps", 1, "--layers", 5)[::2])
    assert "is an MLP model; --layers applies to dense models only" in line  # train dispatches, but not these
    line = _one_line_error(*_run(capsys, "train-mlp", "--model", tmp_path / "dense.h5", "--steps", 1)[::2])
    assert "kind 'dense'" in line
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before

    code, out, _ = _run(capsys, "info", tmp_path / "mlp.h5", "--json")
    info = json.loads(out)
    assert code == 0 and info["kind"] == "mlp" and info["hidden"] == 8 and info["step"] == 0
    code, out, _ = _run(capsys, "info", tmp_path / "dense.h5", "--json")
    assert code == 0 and json.loads(out)["kind"] == "dense"


# ----------------------------------------------------------------------------------------------
# training on MNIST


def test_learns_on_a_small_budget_and_resumes_exactly(tmp_path, mnist_dir, capsys):
    common = dict(batch=64, lr=0.1, schedule="constant", train_limit=5000, report_every=50, progress=False)
    rows = []
    final = train_mlp(tmp_path / "a.h5", hidden=32, steps=200, test_samples=2000, on_report=rows.append, **common)
    assert capsys.readouterr().out == ""  # the API prints nothing
    assert [r["event"] for r in rows] == ["report"] * 4 and final["event"] == "final"
    assert [r["step"] for r in rows] == [50, 100, 150, 200] and all(r["lr"] == 0.1 for r in rows)
    assert final["test_acc"] > 0.8, final
    assert rows[-1]["loss"] == final["loss"]
    # 120 + 80 steps in two runs draw the same minibatches as 200 in one.
    train_mlp(tmp_path / "b.h5", hidden=32, steps=120, test_samples=0, **common)
    train_mlp(tmp_path / "b.h5", steps=80, test_samples=0, **common)
    a, b = MLP.load(tmp_path / "a.h5"), MLP.load(tmp_path / "b.h5")
    for k in ("w1", "b1", "w2", "b2"):
        assert np.array_equal(a.params()[k], b.params()[k]), k
    assert b.step == 200 and np.array_equal(a.read_log()["loss"], b.read_log()["loss"])
    assert _files(tmp_path) == ["a.h5", "b.h5"]
    figures = evaluate_mlp(tmp_path / "a.h5", test_samples=2000)
    assert figures["accuracy"] == pytest.approx(final["test_acc"])


def test_cli_train_and_eval(tmp_path, mnist_dir, capsys):
    model = tmp_path / "m.h5"
    code, out, err = _run(capsys, "train-mlp", "--model", model, "--hidden", 16, "--steps", 30, "--batch", 32,
                          "--lr", 0.2, "--schedule", "step:20=0.05", "--report-every", 10, "--test-samples", 500,
                          "--train-limit", 2000, "--seed", 4)
    assert code == 0, err
    assert "step" in out and "test" in out and "accuracy" in out
    code, out, err = _run(capsys, "eval-mlp", "--model", model, "--samples", 500, "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["event"] == "eval" and result["step"] == 30 and result["samples"] == 500
    assert 0 < result["accuracy"] <= 1


@pytest.mark.parametrize("args, match", [
    (["--hidden", 0], "--hidden"),
    (["--steps", 0], "--steps"),
    (["--batch", -1], "--batch"),
    (["--lr", 0], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--schedule", "sine"], "--schedule"),
    (["--train-limit", 70000], "--train-limit"),
    (["--test-samples", 20000], "--test-samples"),
    (["--report-every", 0], "--report-every"),
    (["--hiden", 3], "no flag --hiden"),
])
def test_bad_values_write_nothing(tmp_path, mnist_dir, capsys, args, match):
    steps = [] if "--steps" in args else ["--steps", 2]
    line = _one_line_error(*_run(capsys, "train-mlp", "--model", tmp_path / "new.h5", *steps, *args)[::2])
    assert match in line
    assert _files(tmp_path) == []


def test_hidden_must_agree_with_an_existing_file(tmp_path, mnist_dir):
    MLP.new(8).save(tmp_path / "m.h5")
    before = (tmp_path / "m.h5").read_bytes()
    with pytest.raises(ConfigError, match="hidden 8 but --hidden 9"):
        train_mlp(tmp_path / "m.h5", hidden=9, steps=1, test_samples=0, progress=False)
    assert (tmp_path / "m.h5").read_bytes() == before


@pytest.mark.slow
def test_default_recipe_reaches_0975_on_the_full_test_set(tmp_path, mnist_dir):
    final = train_mlp(tmp_path / "mlp.h5", test_samples=10_000)
    assert final["test_samples"] == 10_000
    assert final["test_acc"] >= 0.975, final


def test_blas_threads_are_limited_and_restored():
    from deepnet.nn.blas import openblas_controls, blas_threads

    before = [n for _, n in openblas_controls()]
    if not before:
        pytest.skip("no OpenBLAS found in this process")
    with blas_threads(1):
        assert all(n == 1 for _, n in openblas_controls())
    assert [n for _, n in openblas_controls()] == before


@pytest.mark.parametrize("corrupt, match", [
    (lambda f: f.attrs.__setitem__("format_version", 2), "format_version"),
    (lambda f: f.attrs.__setitem__("format_version", "one"), "format_version"),
    (lambda f: f.attrs.__setitem__("hidden", 9), "/mlp/w1"),
    (lambda f: f.attrs.__setitem__("hidden", 0), "hidden is 0"),
    (lambda f: f.attrs.__setitem__("step", "x"), "step"),
    (lambda f: f.attrs.__delitem__("seed"), "missing the attribute"),
    (lambda f: f.__delitem__("mlp/b2"), "/mlp/b2"),
    (lambda f: f.__delitem__("train/log"), "/train/log"),
    (lambda f: f.attrs.__setitem__("rng_state", "[1, 2]"), "rng_state"),
    (lambda f: f.attrs.__setitem__("rng_state", "{nope"), "rng_state"),
])
def test_corrupt_files_are_refused_in_one_line(tmp_path, corrupt, match):
    path = tmp_path / "m.h5"
    MLP.new(8).save(path)
    with h5py.File(path, "r+") as f:
        corrupt(f)
    with pytest.raises(ModelFileError, match=match) as exc:
        MLP.load(path)
    assert "\n" not in str(exc.value)
