"""The data sources behind --data and --coarsen: any IDX dataset, NPZ arrays, MNIST coarsened, a teacher.

Each is checked against a plain NumPy computation of what the model must be fed, through every path that
feeds a model (train, eval, train-mlp/eval-mlp, speedrun, diagnose), and every bad input is one line."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from deepnet import api
from deepnet.data import coarse
from deepnet.data.sources import open_dataset, parse_source
from deepnet.data.teacher import TeacherDataset, teacher_weights
from deepnet.errors import ConfigError, DataError, DeepnetError
from deepnet.formats.data_record import DataRecord, read_data_record
from deepnet.formats.hdf5 import ModelFile
from deepnet.formats.idx import write_idx
from deepnet.nn.network import DeepNet
from reference import core_forward

SMALL = dict(layers=40, width=4, steps=30, report_every=10, batch=8)


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


# ---------------------------------------------------------------------------------------------------------
# datasets the tests write themselves


def make_idx_dataset(directory, *, side=(9, 7), classes=5, n_train=300, n_test=60, seed=0):
    """Images whose class is drawn in their mean brightness, so a classifier can learn them."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for stem, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, classes, n).astype(np.uint8)
        base = (labels[:, None, None] * (200 // classes)).astype(np.int64)
        images = np.clip(base + rng.integers(0, 40, (n, *side)), 0, 255).astype(np.uint8)
        write_idx(directory / f"{stem}-images-idx3-ubyte", images)
        write_idx(directory / f"{stem}-labels-idx1-ubyte", labels)
    return directory


def make_npz(path, *, n=200, features=6, classes=3, test=True, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    x = rng.normal(0, 1, (n, features)) + y[:, None]
    arrays = {"x": x, "y": y}
    if test:
        arrays.update(x_test=x[:50] + 0.1, y_test=y[:50])
    np.savez(path, **arrays)
    return path


# ---------------------------------------------------------------------------------------------------------
# idx:DIR


def test_idx_dataset_trains_evaluates_and_records_its_shape(tmp_path):
    data = make_idx_dataset(tmp_path / "ds")
    model = tmp_path / "m.h5"
    final = api.train(model, data=f"idx:{data}", lr=0.2, **{**SMALL, "steps": 150})
    with ModelFile.open(model) as mf:
        assert (mf.input_dim, mf.n_classes) == (63, 5)
        assert read_data_record(mf.h5, mf.path) == DataRecord(source=f"idx:{data.resolve()}")
    assert final["test_samples"] == 60                      # the whole test split by default
    again = api.evaluate(model)                             # the recorded source, no flag needed
    assert again["samples"] == 60 and again["accuracy"] == pytest.approx(final["test_acc"])
    assert final["test_acc"] > 0.4                          # five classes: chance is 0.2
    assert api.info(model)["data"] == f"idx:{data.resolve()}, cross-entropy on labels"


def test_idx_inputs_are_the_pixels_over_255(tmp_path):
    data = make_idx_dataset(tmp_path / "ds", n_train=10, n_test=5)
    dataset = open_dataset(DataRecord(source=parse_source(f"idx:{data}")))
    x, y = dataset.test(None)
    from deepnet.formats.idx import load_idx_split
    images, labels = load_idx_split(data, "test")
    np.testing.assert_array_equal(x, images.reshape(5, -1).astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(y, labels)


def test_idx_errors_are_one_line(tmp_path):
    data = make_idx_dataset(tmp_path / "ds", n_train=10, n_test=5)
    (data / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError) as exc:
        api.train(tmp_path / "m.h5", data=f"idx:{data}", **SMALL)
    assert "t10k-labels-idx1-ubyte" in one_line(exc)
    assert not (tmp_path / "m.h5").exists()
    with pytest.raises(ConfigError) as exc:
        api.train(tmp_path / "m.h5", data=f"idx:{tmp_path / 'nowhere'}", **SMALL)
    assert "is not a directory" in one_line(exc)
    for bad in ("cifar", "idx:", "npz", "teacher"):
        with pytest.raises(ConfigError) as exc:
            parse_source(bad)
        assert "--data must be" in one_line(exc)


# ---------------------------------------------------------------------------------------------------------
# npz:FILE


def test_npz_float_features_train_and_evaluate(tmp_path):
    path = make_npz(tmp_path / "d.npz")
    model = tmp_path / "m.h5"
    final = api.train(model, data=f"npz:{path}", lr=0.1, **{**SMALL, "steps": 200})
    with ModelFile.open(model) as mf:
        assert (mf.input_dim, mf.n_classes) == (6, 3)
    dataset = open_dataset(DataRecord(source=parse_source(f"npz:{path}")))
    x, _ = dataset.test(None)
    with np.load(path) as f:
        np.testing.assert_array_equal(x, f["x_test"].astype(np.float32))
    assert final["test_samples"] == 50 and final["test_acc"] > 0.5


def test_npz_without_a_test_split_skips_the_test_unless_asked(tmp_path):
    path = make_npz(tmp_path / "d.npz", test=False)
    final = api.train(tmp_path / "m.h5", data=f"npz:{path}", **SMALL)
    assert "test_acc" not in final
    with pytest.raises(ConfigError) as exc:
        api.evaluate(tmp_path / "m.h5")
    assert "no test split" in one_line(exc)
    with pytest.raises(ConfigError) as exc:
        api.train(tmp_path / "m.h5", test_samples=10, **SMALL)
    assert "no test split" in one_line(exc)


def test_every_evaluation_says_what_it_needed_a_missing_test_split_for(tmp_path):
    """A source without a test split: each command that needs one refuses in one line naming its purpose,
    before it writes anything (the speedrun creates no model)."""
    path = make_npz(tmp_path / "d.npz", test=False)
    api.train(tmp_path / "m.h5", data=f"npz:{path}", **SMALL)
    api.train_mlp(tmp_path / "mlp.h5", data=f"npz:{path}", hidden=8, steps=5, batch=8, report_every=5)
    cases = [
        (lambda: api.evaluate(tmp_path / "m.h5"), "has no test split to evaluate on"),
        (lambda: api.evaluate(tmp_path / "mlp.h5"), "has no test split to evaluate on"),
        (lambda: api.speedrun(tmp_path / "sr.h5", data=f"npz:{path}", layers=40, holdout=20, max_steps=5),
         "has no test split for the speedrun's final evaluation"),
    ]
    for call, message in cases:
        with pytest.raises(ConfigError) as exc:
            call()
        assert message in one_line(exc)
    assert not (tmp_path / "sr.h5").exists()


@pytest.mark.parametrize("arrays, needle", [
    ({"x": np.zeros((5, 3))}, "no array 'y'"),
    ({"x": np.zeros((5, 3)), "y": np.zeros(4, int)}, "one label per sample"),
    ({"x": np.zeros((5, 3)), "y": np.zeros(5)}, "integer labels"),
    ({"x": np.full((5, 3), np.nan), "y": np.zeros(5, int)}, "not finite"),
    ({"x": np.zeros((5, 3)), "y": np.zeros(5, int), "x_test": np.zeros((2, 3))}, "without its partner"),
    ({"x": np.zeros((5, 3)), "y": np.arange(5) - 1}, "labels in 0.."),
    ({"x": np.zeros((5, 3)), "y": np.zeros(5, int)}, "a single class"),
])
def test_npz_errors_are_one_line_and_create_nothing(tmp_path, arrays, needle):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    with pytest.raises(DeepnetError) as exc:
        api.train(tmp_path / "m.h5", data=f"npz:{path}", **SMALL)
    assert needle in one_line(exc)
    assert not (tmp_path / "m.h5").exists()


def test_a_model_refuses_data_of_other_inputs(tmp_path):
    model = tmp_path / "m.h5"
    api.train(model, data=f"npz:{make_npz(tmp_path / 'a.npz')}", **SMALL)
    other = make_npz(tmp_path / "b.npz", features=5)
    for run in (lambda: api.evaluate(model, data=f"npz:{other}"),
                lambda: api.train(model, data=f"npz:{other}", **SMALL)):
        with pytest.raises(ConfigError) as exc:
            run()
        assert "takes 6 inputs" in one_line(exc)


# ---------------------------------------------------------------------------------------------------------
# --coarsen K


def test_coarsened_mnist_feeds_the_model_its_cells(tmp_path, mini_env):
    model = tmp_path / "m.h5"
    final = api.train(model, coarsen=4, test_samples=100, **SMALL)
    with ModelFile.open(model) as mf:
        assert mf.input_dim == 98                        # 7 x 7 cells, two values each
        assert read_data_record(mf.h5, mf.path).coarsen == 4
    assert (mini_env / coarse.COARSE_MNIST_NAME).exists()  # written once into the data directory
    assert api.info(model)["data"] == "mnist, coarsen 4x4 (ratio) inputs, cross-entropy on labels"
    # What eval feeds the model is decode(coarsen(pixels)), computed here independently of the file.
    from deepnet.formats.idx import load_mnist
    images, labels = load_mnist(mini_env, "test")
    cells = images[:100].reshape(100, 7, 4, 7, 4).astype(np.int64)
    peak, total = cells.max(axis=(2, 4)), cells.sum(axis=(2, 4))
    val2 = np.where(peak > 0, (2 * 255 * total + 16 * peak) // np.maximum(2 * 16 * peak, 1), 0)
    x = np.stack([peak / 255.0, peak * val2 / 255.0 / 255.0], axis=-1).reshape(100, 98).astype(np.float32)
    with DeepNet.open(model) as net:
        want = net.evaluate(x, labels[:100])
    got = api.evaluate(model, test_samples=100)
    assert got["accuracy"] == want.accuracy and got["loss"] == pytest.approx(want.loss, rel=1e-6)
    assert final["test_acc"] == want.accuracy


def test_a_coarsened_model_refuses_another_cell_size(tmp_path, mini_env):
    model = tmp_path / "m.h5"
    api.train(model, coarsen=3, test_samples=0, **SMALL)
    with pytest.raises(ConfigError) as exc:
        api.train(model, coarsen=2, **SMALL)
    assert "coarsen 3x3" in one_line(exc) and "--coarsen 2" in one_line(exc)
    with pytest.raises(ConfigError) as exc:
        api.train(model, coarsen=1, **SMALL)
    assert "--coarsen 1" in one_line(exc)
    plain = tmp_path / "plain.h5"
    api.train(plain, test_samples=0, **SMALL)
    with pytest.raises(ConfigError) as exc:
        api.train(plain, coarsen=4, **SMALL)
    assert "takes pixels inputs" in one_line(exc)
    with pytest.raises(ConfigError):
        api.train(tmp_path / "new.h5", coarsen=0, **SMALL)


def test_coarsened_idx_and_the_raw_decoding(tmp_path):
    data = make_idx_dataset(tmp_path / "ds", side=(9, 7), n_train=40, n_test=10)
    dataset = open_dataset(DataRecord(source=parse_source(f"idx:{data}"), coarsen=3, decode="raw"))
    assert dataset.input_dim == 3 * 3 * 2            # 9x7 in 3x3 cells: 3 x 3 cells (the last column partial)
    from deepnet.formats.idx import load_idx_split
    images, _ = load_idx_split(data, "test")
    x, _ = dataset.test(None)
    np.testing.assert_array_equal(x, coarse.decode(coarse.coarsen(images, 3), "raw"))


def test_the_branch_takes_the_coarse_inputs_too(tmp_path, mini_env):
    model = tmp_path / "b.h5"
    final = api.train(model, coarsen=4, branch="mlp", hidden=8, test_samples=50, **SMALL)
    with DeepNet.open(model) as net:
        assert net.branch.params()["w1"].shape == (98, 8)
    assert api.evaluate(model, test_samples=50)["accuracy"] == final["test_acc"]


def test_mlp_and_speedrun_apply_the_recorded_transform(tmp_path, mini_env):
    mlp = tmp_path / "mlp.h5"
    result = api.train_mlp(mlp, hidden=16, steps=20, batch=16, coarsen=2, test_samples=50, report_every=10)
    assert result["test_samples"] == 50
    from deepnet.nn.mlp import MLP
    net = MLP.load(mlp)
    assert net.input_dim == 392 and net.data.coarsen == 2
    assert api.evaluate(mlp, test_samples=50)["accuracy"] == result["test_acc"]
    with pytest.raises(ConfigError):
        api.train_mlp(mlp, steps=5, coarsen=4)
    kept = tmp_path / "sr.h5"
    report = api.speedrun(model=kept, layers=20, coarsen=4, holdout=100, eval_every=10, max_steps=20,
                          target_acc=0.99, test_samples=50)
    with ModelFile.open(kept) as mf:
        assert mf.input_dim == 98 and read_data_record(mf.h5, mf.path).coarsen == 4
    assert report["test_samples"] == 50


# ---------------------------------------------------------------------------------------------------------
# teacher:FILE


def test_teacher_weights_are_the_stated_draws(tmp_path):
    path = tmp_path / "t.h5"
    api.teacher(path, layers=300, width=4, input_dim=20, outputs=10, data_std=10.0, init_scale=2.0, seed=3)
    core, heads = teacher_weights(layers=300, width=4, input_dim=20, outputs=10, data_std=10.0, init_scale=2.0,
                                  seed=3)
    with ModelFile.open(path) as mf:
        np.testing.assert_array_equal(mf.read_core(), core)
        for key, value in mf.read_heads().items():
            np.testing.assert_array_equal(value, heads[key])
        assert mf.activation == "relu" and mf.alpha == pytest.approx(1 / np.sqrt(300))
    assert core.std() == pytest.approx(2.0 / 2.0, rel=0.05)              # init_scale / sqrt(width)
    assert heads["input_weight"].std() == pytest.approx(1 / (10 * np.sqrt(20)), rel=0.2)


def test_a_student_learns_its_teacher_exactly_and_resumably(tmp_path):
    teacher = tmp_path / "t.h5"
    api.teacher(teacher, layers=30, width=4, input_dim=8, outputs=6)
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    flags = dict(data=f"teacher:{teacher}", layers=60, width=8, activation="relu", lr=0.01, batch=16,
                 report_every=20, test_samples=500)
    first = api.train(one, steps=150, **flags)
    api.train(two, steps=15, **{**flags, "test_samples": 0})
    api.train(two, until_step=150, **flags)
    for a, b in zip(ModelFile.open(one).read_core(), ModelFile.open(two).read_core()):
        np.testing.assert_array_equal(a, b)                # fresh samples, but from the stored generator
    with ModelFile.open(one) as mf:
        assert read_data_record(mf.h5, mf.path).loss == "mse" and mf.n_classes == 6
    # The targets are the teacher's outputs: checked against an independent float64 forward.
    dataset = TeacherDataset(DataRecord(source=parse_source(f"teacher:{teacher}"), loss="mse"))
    x, y = dataset.test(5)
    dataset.close()
    with ModelFile.open(teacher) as mf:
        heads, core, alpha = mf.read_heads(), mf.read_core(), mf.alpha
    h0 = np.tanh(x.astype(np.float64) @ heads["input_weight"] + heads["input_bias"])
    h, _ = core_forward(h0, core, alpha, "relu")
    np.testing.assert_allclose(y, h @ heads["output_weight"] + heads["output_bias"], rtol=1e-4, atol=1e-5)
    api.train(tmp_path / "untrained.h5", until_step=0, **flags)
    assert first["test_loss"] < 0.5 * api.evaluate(tmp_path / "untrained.h5", test_samples=500)["loss"]


def test_teacher_flag_errors_are_one_line(tmp_path):
    teacher = tmp_path / "t.h5"
    api.teacher(teacher, layers=5, width=4, input_dim=8, outputs=6)
    for needs_a_fixed_set, what in [
            (lambda: api.train(tmp_path / "s.h5", data=f"teacher:{teacher}", holdout=10, **SMALL), "--holdout"),
            (lambda: api.train(tmp_path / "s.h5", data=f"teacher:{teacher}", train_limit=10, **SMALL),
             "--train-limit"),
            (lambda: api.train_mlp(tmp_path / "m.h5", data=f"teacher:{teacher}", steps=1), "train-mlp"),
            (lambda: api.speedrun(model=tmp_path / "r.h5", data=f"teacher:{teacher}", max_steps=1), "a speedrun")]:
        with pytest.raises(ConfigError) as exc:
            needs_a_fixed_set()
        assert one_line(exc) == (f"{what}{' (it holds images out)' if what == 'a speedrun' else ''} needs a fixed "
                                 f"training set; teacher:{teacher} draws fresh samples every step")
    assert not any(tmp_path.glob("[smr].h5"))
    with pytest.raises(ConfigError) as exc:
        api.train(tmp_path / "s.h5", data=f"teacher:{teacher}", coarsen=2, **SMALL)
    assert "--coarsen" in one_line(exc)
    with pytest.raises(ConfigError) as exc:
        api.train(tmp_path / "s.h5", loss="mse", **SMALL)
    assert "--loss mse needs target vectors" in one_line(exc)
    plain = tmp_path / "plain.h5"
    api.init(plain, layers=5, width=4, input_dim=8, n_classes=6)
    with pytest.raises(ConfigError) as exc:
        api.train(tmp_path / "s.h5", data=f"teacher:{plain}", **SMALL)
    assert "not a teacher" in one_line(exc)
    with pytest.raises(ConfigError):
        api.teacher(tmp_path / "t2.h5", outputs=1)
    with pytest.raises(DeepnetError):
        api.teacher(teacher)                                # exists: refused without --overwrite
    assert not (tmp_path / "s.h5").exists()


def test_teacher_labels_train_a_classifier(tmp_path):
    teacher = tmp_path / "t.h5"
    api.teacher(teacher, layers=10, width=4, input_dim=8, outputs=4)
    final = api.train(tmp_path / "s.h5", data=f"teacher:{teacher}", loss="xent", test_samples=200, **SMALL)
    dataset = TeacherDataset(DataRecord(source=parse_source(f"teacher:{teacher}"), loss="xent"))
    x, y = dataset.test(200)
    np.testing.assert_array_equal(y, np.argmax(dataset.outputs(x), axis=1))
    dataset.close()
    assert final["test_samples"] == 200


# ---------------------------------------------------------------------------------------------------------
# the command line


def test_data_command_coarsens_once(tmp_path, mini):
    run = [sys.executable, "-m", "deepnet", "data", str(mini), "--coarsen", "2,4", "--json"]
    out = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import json
    result = json.loads(out.stdout)
    assert result["coarse_ks"][:2] == [2, 4] or set([2, 4]) <= set(result["coarse_ks"])
    info = coarse.coarse_file_info(result["coarse_file"])
    assert {2, 4} <= set(info["ks"])
    bad = subprocess.run([sys.executable, "-m", "deepnet", "data", str(mini), "--coarsen", "1"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "--coarsen" in bad.stderr
