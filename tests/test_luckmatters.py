"""deepnet.tools.correlation and deepnet.tools.luckmatters: the unit correlation against np.corrcoef, the
hand-written backprop against central finite differences, and short teacher-student runs (the long run that
checks LuckMatters' 0.99 claim is marked slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from deepnet.tools import luckmatters as lm
from deepnet.tools.correlation import best_matches, unit_correlations


# ---------------------------------------------------------------- correlation


def _corrcoef_reference(t: np.ndarray, s: np.ndarray) -> np.ndarray:
    """np.corrcoef on the stacked units, the teacher-by-student block, with the rows/columns of constant
    units set to 0 (np.corrcoef gives NaN for them, or +-1 from the rounding residue of the centring)."""
    k = t.shape[1]
    with np.errstate(invalid="ignore", divide="ignore"):
        block = np.corrcoef(np.hstack([t, s]), rowvar=False)[:k, k:]
    block[[len(set(col)) == 1 for col in t.T], :] = 0.0
    block[:, [len(set(col)) == 1 for col in s.T]] = 0.0
    return block


def test_unit_correlations_match_corrcoef_with_a_dead_unit():
    rng = np.random.default_rng(1)
    t = rng.normal(size=(200, 4))
    s = np.hstack([2.5 * t[:, :2] + 0.3 * rng.normal(size=(200, 2)), rng.normal(size=(200, 3)),
                   np.full((200, 1), 0.1)])  # last student unit constant (a dead ReLU would be all 0)
    t[:, 3] = -1.7  # a dead teacher unit too
    corr = unit_correlations(t, s)
    assert corr.shape == (4, 6) and corr.dtype == np.float64
    np.testing.assert_allclose(corr, _corrcoef_reference(t, s), atol=1e-12)
    assert np.all(corr[3] == 0.0) and np.all(corr[:, 5] == 0.0)
    assert corr[0, 0] > 0.9 and corr[1, 1] > 0.9


def test_unit_correlations_are_scale_and_shift_invariant_and_float32_safe():
    rng = np.random.default_rng(2)
    t = rng.normal(size=(50, 3))
    s = rng.normal(size=(50, 5))
    base = unit_correlations(t, s)
    np.testing.assert_allclose(unit_correlations(3 * t + 7, 0.01 * s - 2), base, atol=1e-12)
    np.testing.assert_allclose(unit_correlations(t.astype(np.float32), s.astype(np.float32)), base, atol=1e-6)
    np.testing.assert_allclose(unit_correlations(t, t), np.corrcoef(t, rowvar=False), atol=1e-12)
    assert np.all(np.abs(base) <= 1.0)


def test_unit_correlations_reject_bad_shapes():
    with pytest.raises(ValueError):
        unit_correlations(np.zeros((5, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError):
        unit_correlations(np.zeros(5), np.zeros((5, 2)))
    with pytest.raises(ValueError):
        unit_correlations(np.zeros((1, 2)), np.zeros((1, 2)))


def test_best_matches_on_a_constructed_case():
    corr = np.array([[0.1, 0.9, -0.95, 0.3],
                     [0.5, 0.5, 0.2, 0.4],   # tie: the lower index wins
                     [0.0, 0.0, 0.0, 0.0],   # a dead teacher unit
                     [-0.2, 0.7, 0.1, 0.99]])
    best, index = best_matches(corr)
    np.testing.assert_array_equal(index, [1, 0, 0, 3])
    np.testing.assert_allclose(best, [0.9, 0.5, 0.0, 0.99])
    assert index.dtype == np.int64 and best.dtype == np.float64
    with pytest.raises(ValueError):
        best_matches(np.zeros((3, 0)))


def test_correlation_recovers_a_permuted_copy():
    rng = np.random.default_rng(3)
    t = np.maximum(rng.normal(size=(300, 6)), 0)
    perm = rng.permutation(6)
    s = np.hstack([np.maximum(rng.normal(size=(300, 4)), 0), 2.0 * t[:, perm]])  # student = noise, then copies
    best, index = best_matches(unit_correlations(t, s))
    np.testing.assert_allclose(best, 1.0, atol=1e-12)
    np.testing.assert_array_equal(index, 4 + np.argsort(perm))


# ---------------------------------------------------------------- network and gradient


def _tiny_nets(seed: int = 0):
    rng = np.random.default_rng(seed)
    teacher = lm.make_teacher(rng, 5, (3, 4), 6)
    student = lm.make_student(rng, 5, (3, 4), 6, 2)
    x = rng.normal(0, 3.0, (7, 5))
    _, target = lm.forward(teacher, x)
    return teacher, student, x, target


@pytest.mark.parametrize("reduction", ["mean", "half_sum"])
def test_backprop_matches_central_finite_differences(reduction):
    _, student, x, target = _tiny_nets()
    loss, gw, gb = lm.loss_and_grads(student, x, target, reduction)
    assert loss == pytest.approx(lm.loss_only(student, x, target, reduction), rel=1e-14)
    eps = 1e-6
    for params, grads in ((student.weights, gw), (student.biases, gb)):
        for p, g in zip(params, grads):
            assert g.shape == p.shape
            numeric = np.empty_like(p)
            for idx in np.ndindex(p.shape):
                old = p[idx]
                p[idx] = old + eps
                up = lm.loss_only(student, x, target, reduction)
                p[idx] = old - eps
                down = lm.loss_only(student, x, target, reduction)
                p[idx] = old
                numeric[idx] = (up - down) / (2 * eps)
            np.testing.assert_allclose(g, numeric, rtol=1e-5, atol=1e-8)


def test_backprop_matches_an_independent_per_sample_computation():
    """The batch gradient = the mean of per-sample gradients written out with explicit ReLU gate matrices."""
    _, student, x, target = _tiny_nets(seed=4)
    _, gw, gb = lm.loss_and_grads(student, x, target, "half_sum")
    ws, bs = student.weights, student.biases
    acc_w = [np.zeros_like(w) for w in ws]
    acc_b = [np.zeros_like(b) for b in bs]
    for xi, ti in zip(x, target):
        acts, gates = [xi], []
        for w, b in zip(ws[:-1], bs[:-1]):
            z = w @ acts[-1] + b
            gates.append(np.diag((z > 0).astype(float)))
            acts.append(gates[-1] @ z)
        delta = ws[-1] @ acts[-1] + bs[-1] - ti  # d(1/2 |y - t|^2)/dy
        for layer in range(len(ws) - 1, -1, -1):
            acc_w[layer] += np.outer(delta, acts[layer])
            acc_b[layer] += delta
            if layer:
                delta = gates[layer - 1] @ ws[layer].T @ delta
    for a, g in zip(acc_w + acc_b, gw + gb):
        np.testing.assert_allclose(g, a / len(x), rtol=1e-12, atol=1e-14)


def test_teacher_construction_follows_luckmatters():
    teacher = lm.make_teacher(np.random.default_rng(5), 20, (10, 15), 100)
    for w, b in zip(teacher.weights, teacher.biases):
        np.testing.assert_allclose(np.linalg.norm(w, axis=1), 1.0, atol=1e-4)  # rows / (norm + 1e-5)
        assert len({tuple(row) for row in np.round(w, 12)}) == w.shape[0]  # distinct rows
        assert np.all(np.abs(b) <= 0.5 / (np.linalg.norm(w, axis=1).min()) + 1e-9)
    assert [w.shape for w in teacher.weights] == [(10, 20), (15, 10), (100, 15)]
    student = lm.make_student(np.random.default_rng(6), 20, (10, 15), 100, 10)
    assert [w.shape for w in student.weights] == [(100, 20), (150, 100), (100, 150)]
    assert np.abs(student.weights[1]).max() <= 1 / np.sqrt(100)


def test_normalize_fan_in_and_perturbed_student():
    rng = np.random.default_rng(7)
    teacher = lm.make_teacher(rng, 4, (3,), 5, bias=0.0)
    student = lm.make_student(rng, 4, (3,), 5, 2, init_std=0.0, perturb_from=teacher)
    np.testing.assert_allclose(student.weights[0][:3], teacher.weights[0])
    assert np.all(student.weights[0][3:] == 0) and np.all(student.weights[1][:, 3:] == 0)
    student.weights[0][3:] = rng.normal(size=(3, 4))
    lm.normalize_fan_in(student)
    for w, b in zip(student.weights, student.biases):
        np.testing.assert_allclose(np.sqrt((w ** 2).sum(axis=1) + b ** 2), 1.0)


# ---------------------------------------------------------------- runs


@pytest.mark.parametrize("seed, dtype", [(0, "float32"), (1, "float32"), (2, "float64")])
def test_small_run_matches_the_lowest_layer(seed, dtype):
    """A scaled-down recon_multilayer run (2 hidden layers of 5 and 8 teacher units, 5x student, std-10
    inputs, lr 0.01, 3000 steps, ~0.7 s): the lowest layer goes from ~0.5 to > 0.98 mean best correlation."""
    rows = []
    result = lm.reproduce(data_d=10, ks=(5, 8), d_output=30, node_multi=5, batch=64, lr=0.01, iterations=3000,
                          n_train=20_000, n_eval=512, record_every=1000, seed=seed, on_record=rows.append,
                          dtype=dtype)
    json.dumps(result, allow_nan=False)  # plain JSON
    assert result["settings"]["dtype"] == dtype
    assert not result["diverged"] and result["iterations_done"] == 3000
    assert [r["iteration"] for r in result["records"]] == [0, 1000, 2000, 3000] and rows == result["records"]
    first, last = result["records"][0], result["records"][-1]
    assert first["best_corr_mean"][0] < 0.7
    assert last["best_corr_mean"][0] > 0.98
    assert last["heldout_loss"] < 0.01 * first["heldout_loss"]
    final = result["final"]
    assert final[0]["mean_best_corr"] == pytest.approx(last["best_corr_mean"][0])
    split = final[0]["w_row_norm"]
    assert split["matched"]["count"] + split["unmatched"]["count"] == 25
    assert result["settings"]["student_widths"] == [25, 40]


def test_row_norm_split():
    """test_multilayer.py's README run (20,000 steps, ~4 s): the 20 teacher-matched units keep fan-out norms
    ~1, the 20 extra units' fall to ~1e-4."""
    result = lm.reproduce_row_norm()
    layer = result["final"][0]
    assert layer["mean_best_corr"] > 0.9999
    assert layer["best_student"] == list(range(20))  # the perturbed units are the matches
    split = layer["w_row_norm"]
    assert split["matched"]["count"] == 20 and split["matched"]["min"] > 0.9
    assert split["unmatched"]["count"] == 20 and split["unmatched"]["max"] < 1e-3
    initial = result["initial"][0]["w_row_norm"]
    assert initial["unmatched"]["mean"] > 0.1  # it was not small to begin with


def test_a_too_high_learning_rate_is_reported_not_raised():
    result = lm.reproduce(data_d=10, ks=(5,), d_output=10, node_multi=2, lr=50.0, iterations=200,
                          n_train=1000, n_eval=64, record_every=100)
    assert result["diverged"] and result["iterations_done"] < 200
    json.dumps(result, allow_nan=False)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError):
        lm.reproduce(iterations=10, reduction="sum")
    with pytest.raises(ValueError):
        lm.reproduce(iterations=10, dtype="float16")
    with pytest.raises(ValueError):
        lm.reproduce(iterations=10, record_every=0)


@pytest.mark.slow
def test_luckmatters_claim_lowest_layer_reaches_0_99():
    """recon_multilayer.py's README run (lr 0.05, d_output 100, node_multi 10, std 10, 40 epochs; ~80 s):
    lowest layer >= 0.99 (0.999 within a few epochs), the next ~0.95."""
    result = lm.reproduce()
    assert not result["diverged"] and result["iterations_done"] == 62_520
    assert result["final"][0]["mean_best_corr"] >= 0.999
    epochs_to_0_999 = next(r["epoch"] for r in result["records"] if r["best_corr_mean"][0] >= 0.999)
    assert epochs_to_0_999 <= 10
    assert result["final"][1]["mean_best_corr"] >= 0.95


def test_the_command_prints_the_table_and_json():
    run = [sys.executable, "-m", "deepnet", "luckmatters", "--experiment", "row-norm", "--iterations", "300"]
    table = subprocess.run(run + ["--quiet"], capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    assert "W_row_norm matched" in table.stdout and "row-norm" in table.stdout
    as_json = subprocess.run(run + ["--json"], capture_output=True, text=True, timeout=120)
    lines = as_json.stdout.strip().splitlines()
    final = json.loads(lines[-1])
    assert final["iterations_done"] == 300 and final["experiment"] == "row-norm"
    assert all(json.loads(line)["event"] == "record" for line in lines[:-1]) and len(lines) > 2
    bad = subprocess.run([sys.executable, "-m", "deepnet", "luckmatters", "--experiment", "cifar"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--experiment must be one of" in bad.stderr
