"""`deepnet diagnose M`: the figures across depth against an independent float64 reference, the initial
weights drawn again from the seed, the command line."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

import deepnet
from deepnet.data.sources import open_dataset
from deepnet.formats.data_record import DataRecord
from deepnet.formats import shards
from deepnet.formats.hdf5 import ModelFile
from deepnet.kernels.loader import kernels_for
from deepnet.tools.diagnose import band_bounds, diagnose_depth
from helpers import MNIST_DIR, have_mnist, kernel_builds
from reference import assert_close, core_backward, core_forward, softmax_xent, split_row

pytestmark = pytest.mark.skipif(not have_mnist(), reason=f"MNIST is not in {MNIST_DIR}")

LAYERS, WIDTH, PROBE = 300, 4, 24


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    path = tmp_path_factory.mktemp("diag") / "m.h5"
    deepnet.init(path, layers=LAYERS, width=WIDTH, activation="tanh", seed=4)
    initial = path.with_name("initial.h5")
    shutil.copy(path, initial)
    deepnet.train(path, steps=15, batch=16, lr=0.2, train_limit=2000, test_samples=0)
    return path, initial


def _numpy_initial(seed, scale, width, first, stop):
    """Rows first..stop-1 of the initial core as NumPy draws them (deepnet.formats.create's stream)."""
    ww = width * width
    rng = np.random.default_rng([seed, 0])
    rng.bit_generator.advance(first * ww)
    rows = np.zeros((stop - first, ww + width), np.float32)
    rows[:, :ww] = rng.uniform(-scale, scale, size=(stop - first, ww))
    return rows


@pytest.mark.parametrize("width", [1, 2, 3, 4, 5, 8])
def test_the_compiled_draws_are_numpys_in_every_build(width):
    """initial_change_sums meets NumPy's float32-rounded draws exactly (change 0) at every width, odd
    offsets and scales, in every build this CPU runs; perturbed rows give the float64 sums."""
    for calls in kernel_builds():
        for seed, scale, first, n in ((0, 1e-3, 0, 700), (7, 0.37, 12_345, 1_003), (3, 1.0, 10**9 + 7, 3)):
            initial = _numpy_initial(seed, scale, width, first, first + n)
            rng = np.random.default_rng([seed, 0])
            rng.bit_generator.advance(first * width * width)
            state = rng.bit_generator.state["state"]
            norms, changes = calls.initial_change_sums(initial, width * width, state["state"], state["inc"],
                                                       -scale, scale)
            assert changes == 0.0, (calls.__name__, width, seed)
            assert norms == pytest.approx(np.linalg.norm(initial.astype(np.float64), axis=1).sum(), rel=1e-12)
            moved = initial + np.random.default_rng(1).normal(0, scale, initial.shape).astype(np.float32)
            norms, changes = calls.initial_change_sums(moved, width * width, state["state"], state["inc"],
                                                       -scale, scale)
            delta = moved.astype(np.float64) - initial
            assert changes == pytest.approx(np.linalg.norm(delta, axis=1).sum(), rel=1e-12)


def test_the_initial_weights_are_drawn_again_exactly(trained):
    _, initial = trained
    with ModelFile.open(initial) as f:
        core, seed, scale = f.read_core(), f.seed, float(f.init_scale)
    calls = kernels_for("tanh", WIDTH).calls
    for first, stop in ((0, LAYERS), (0, 1), (17, 123), (LAYERS - 5, LAYERS)):
        expected = _numpy_initial(seed, scale, WIDTH, first, stop)
        assert np.array_equal(expected, core[first:stop])
        rng = np.random.default_rng([seed, 0])
        rng.bit_generator.advance(first * WIDTH * WIDTH)
        state = rng.bit_generator.state["state"]
        assert calls.initial_change_sums(core[first:stop], WIDTH * WIDTH, state["state"], state["inc"], -scale,
                                         scale)[1] == 0.0


def test_band_bounds_cover_the_core_once():
    for layers, bands in ((10, 3), (7, 100), (1_000_000, 100)):
        bounds = band_bounds(layers, bands)
        assert bounds[0][0] == 0 and bounds[-1][1] == layers
        assert all(a[1] == b[0] and a[1] > a[0] for a, b in zip(bounds, bounds[1:]))
        assert len(bounds) == min(layers, bands)


def test_the_figures_match_a_float64_reference(trained):
    path, initial = trained
    result = diagnose_depth(path, bands=4, probe_samples=PROBE)
    with ModelFile.open(path) as f:
        core, heads, alpha = f.read_core(), f.read_heads(), float(f.alpha)
    with ModelFile.open(initial) as f:
        core0 = f.read_core()
    x, y = open_dataset(DataRecord()).test(PROBE)
    x = x.astype(np.float64)
    h = np.tanh(x @ heads["input_weight"].astype(np.float64) + heads["input_bias"])
    bounds = band_bounds(LAYERS, 4)
    starts, traces = [], []
    for (first, stop), band in zip(bounds, result["bands"]):
        starts.append(h)
        W, b = split_row(core[first], WIDTH)
        assert_close(band["update_norm"], np.linalg.norm(alpha * np.tanh(h @ W + b), axis=1).mean(), rtol=1e-4,
                     what="update")
        h_end, trace = core_forward(h, core[first:stop], alpha, "tanh")
        traces.append(trace)
        assert_close(band["h_norm"], np.linalg.norm(h_end, axis=1).mean(), rtol=1e-4, what="h")
        assert_close(band["band_change"], np.linalg.norm(h_end - h, axis=1).mean(), rtol=1e-3, what="band change")
        rows = core[first:stop].astype(np.float64)
        assert_close(band["weight_norm"], np.linalg.norm(rows, axis=1).mean(), rtol=1e-6, what="weights")
        assert_close(band["weight_change"], np.linalg.norm(rows - core0[first:stop], axis=1).mean(), rtol=1e-5,
                     what="weight change")
        h = h_end
    logits = h @ heads["output_weight"].astype(np.float64) + heads["output_bias"]
    loss, dlogits = softmax_xent(logits, y)
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    g = dlogits @ heads["output_weight"].astype(np.float64).T
    for (first, stop), trace, band in reversed(list(zip(bounds, traces, result["bands"]))):
        g, _, _ = core_backward(g, core[first:stop], trace, alpha, "tanh", 0.0)
        assert_close(band["grad_norm"], np.linalg.norm(g, axis=1).mean(), rtol=1e-4, what="gradient")
    assert all(band["weight_change"] > 0 for band in result["bands"])


def test_an_untrained_model_has_not_moved_and_a_sharded_root_gives_the_same(trained, tmp_path):
    path, initial = trained
    assert all(b["weight_change"] == 0.0 for b in diagnose_depth(initial, bands=3, probe_samples=8)["bands"])
    root = tmp_path / "root.h5"
    shards.shard_model(path, 2, root)
    assert diagnose_depth(root, bands=3, probe_samples=8)["bands"] == diagnose_depth(path, bands=3,
                                                                                    probe_samples=8)["bands"]


def test_without_the_gradient_the_other_figures_are_the_same(trained, tmp_path):
    path, _ = trained
    full = diagnose_depth(path, bands=4, probe_samples=PROBE)
    quick = diagnose_depth(path, bands=4, probe_samples=PROBE, gradient=False)
    assert all(band["grad_norm"] is None for band in quick["bands"])
    for a, b in zip(full["bands"], quick["bands"]):
        assert a["grad_norm"] > 0
        assert {k: v for k, v in a.items() if k != "grad_norm"} == {k: v for k, v in b.items() if k != "grad_norm"}
    assert quick["loss"] == full["loss"]
    pytest.importorskip("matplotlib")
    image = tmp_path / "quick.png"
    proc = _cli(str(path), "--bands", "4", "--no-gradient", "--plot", str(image))
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip().startswith(("0..", "75.."))]
    assert len(rows) == 2 and all(row[4] == "-" for row in rows)
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_probe_cut_over_threads_gives_the_same_figures(trained, monkeypatch):
    """The probe's samples are split between threads (each its own run forward and back); one thread or
    two give the same band figures."""
    path, _ = trained
    monkeypatch.setenv("DEEPNET_THREADS", "1")
    one = diagnose_depth(path, bands=3, probe_samples=PROBE)
    monkeypatch.setenv("DEEPNET_THREADS", "2")
    two = diagnose_depth(path, bands=3, probe_samples=PROBE)
    for a, b in zip(one["bands"], two["bands"]):
        for key in ("h_norm", "band_change", "grad_norm", "update_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key
        for key in ("weight_norm", "weight_change"):
            assert a[key] == pytest.approx(b[key], rel=1e-12), key


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "deepnet", "diagnose", *args], capture_output=True, text=True)


def test_the_command_prints_a_table_json_and_a_plot(trained, tmp_path):
    path, _ = trained
    proc = _cli(str(path), "--bands", "5", "--probe-samples", "8")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any("||grad||" in line for line in lines) and lines[-1].strip().startswith("240..299")
    proc = _cli(str(path), "--bands", "5", "--probe-samples", "8", "--json")
    result = json.loads(proc.stdout)
    assert len(result["bands"]) == 5 and result["layers"] == LAYERS
    pytest.importorskip("matplotlib")
    image = tmp_path / "depth.png"
    proc = _cli(str(path), "--bands", "5", "--plot", str(image))
    assert proc.returncode == 0, proc.stderr
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,message", [
    (["--bands", "0"], "--bands must be an integer >= 1"),
    (["--probe-samples", "20000"], "--probe-samples"),
    (["--plot", "/no/such/dir/x.png"], "--plot /no/such/dir/x.png: directory"),
])
def test_bad_flags_are_one_line(trained, args, message):
    path, _ = trained
    proc = _cli(str(path), *args)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr


def test_teacher_correlations_match_a_float64_reference(tmp_path):
    teacher, student = tmp_path / "t.h5", tmp_path / "s.h5"
    deepnet.api.teacher(teacher, layers=20, width=3, input_dim=5, outputs=4, seed=2)
    deepnet.train(student, data=f"teacher:{teacher}", layers=40, width=6, activation="relu", steps=30, batch=16,
                  lr=0.01, test_samples=0)
    result = diagnose_depth(student, bands=4, probe_samples=200, teacher=teacher)
    assert result["teacher"]["layers"] == 20 and result["probe"].startswith("teacher:")
    from deepnet.data.sources import parse_source
    from deepnet.data.teacher import TeacherDataset
    dataset = TeacherDataset(DataRecord(source=parse_source(f"teacher:{teacher}"), loss="mse"))
    x, _ = dataset.test(200)
    dataset.close()

    def unit_acts(path, layer):
        with ModelFile.open(path) as f:
            core, heads, alpha, w = f.read_core(), f.read_heads(), float(f.alpha), f.width
        h0 = np.tanh(x.astype(np.float64) @ heads["input_weight"] + heads["input_bias"])
        h, _ = core_forward(h0, core[:layer], alpha, "relu")
        W, b = split_row(core[layer].astype(np.float64), w)
        return np.maximum(h @ W + b, 0.0), W

    for band, (first, _) in zip(result["bands"], band_bounds(40, 4)):
        assert band["teacher_layer"] == first * 20 // 40
        t_acts, _ = unit_acts(teacher, band["teacher_layer"])
        s_acts, W = unit_acts(student, first)
        with np.errstate(invalid="ignore", divide="ignore"):
            corr = np.corrcoef(t_acts.T, s_acts.T)[:3, 3:]
        corr = np.where(np.isfinite(corr), corr, 0.0)        # a dead unit correlates with nothing
        best = corr.max(axis=1)
        assert band["corr_mean"] == pytest.approx(best.mean(), abs=1e-4)
        assert band["corr_min"] == pytest.approx(best.min(), abs=1e-4)
        matched = np.zeros(6, bool)
        matched[corr.argmax(axis=1)] = True
        norms = np.linalg.norm(W, axis=0)
        assert band["row_norm_matched"] == pytest.approx(norms[matched].mean(), rel=1e-5)
        assert band["row_norm_unmatched"] == pytest.approx(norms[~matched].mean(), rel=1e-5)

    table = _cli(str(student), "--teacher", str(teacher), "--bands", "4", "--probe-samples", "50")
    assert table.returncode == 0, table.stderr
    assert "corr min" in table.stdout and "|w| matched" in table.stdout
    pytest.importorskip("matplotlib")
    image = tmp_path / "teacher.png"
    drawn = _cli(str(student), "--teacher", str(teacher), "--bands", "4", "--plot", str(image))
    assert drawn.returncode == 0, drawn.stderr
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_teacher_flag_refusals(trained, tmp_path):
    path, _ = trained
    plain = tmp_path / "plain.h5"
    deepnet.init(plain, layers=5, width=4)
    with pytest.raises(deepnet.errors.ConfigError, match="not a teacher"):
        diagnose_depth(path, teacher=plain)
    teacher = tmp_path / "t.h5"
    deepnet.api.teacher(teacher, layers=5, width=4, input_dim=20, outputs=10)
    with pytest.raises(deepnet.errors.ConfigError, match="takes 784 inputs"):
        diagnose_depth(path, teacher=teacher)
