"""Nothing non-finite is ever committed (issue 18 item 1): core, heads, branch, weight average, MLP.

A step whose updated weights are not finite is refused with one line naming the step and what went
non-finite; the file keeps its last good step (streamed core: a detectable torn step, never a
committed one), and no NumPy RuntimeWarning reaches the terminal.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import deepnet
from deepnet import DeepNet, ModelFile
from deepnet.errors import ModelFileError
from deepnet.formats.hdf5 import HEAD_KEYS
from deepnet.nn import heads as heads_module
from deepnet.nn.branch import MLPBranch
from deepnet.nn.finite import NonFiniteError
from deepnet.nn.mlp import MLP
from deepnet.training.ema import WeightAverage
from helpers import MNIST_DIR, have_mnist

needs_mnist = pytest.mark.skipif(not have_mnist(), reason=f"MNIST is not in {MNIST_DIR}")


def new_model(path, *, layers=300, chunk=50, branch=None, hidden=None):
    deepnet.init(path, layers=layers, width=4, activation="softsign", seed=1, branch=branch, hidden=hidden,
                 progress=False)
    return path


def batch(seed=0, n=6):
    rng = np.random.default_rng(seed)
    return rng.uniform(0, 1, (n, 784)).astype(np.float32), rng.integers(0, 10, n)


@pytest.fixture(autouse=True)
def warnings_are_errors():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield


def contents(path):
    with ModelFile.open(path) as f:
        return f.read_core(), f.read_heads(), f.step, f.state().status


@pytest.mark.parametrize("in_memory", [False, True], ids=["streamed", "in-memory"])
def test_huge_head_lr_is_refused_before_anything_is_written(tmp_path, in_memory):
    """issue 18 item 1: --head-lr 1e300 makes the output head infinite: refused, nothing written."""
    path = new_model(tmp_path / "m.h5")
    x, y = batch()
    with DeepNet.open(path, writable=True, in_memory=in_memory, chunk_layers=50) as net:
        net.train_step(x, y, layer_lr=0.1, head_lr=0.1)
        net.save()
    before = path.read_bytes()
    with DeepNet.open(path, writable=True, in_memory=in_memory, chunk_layers=50) as net:
        with pytest.raises(NonFiniteError, match=r"^step 2 refused: the updated output head is not finite; "
                                                 r"nothing was written \(.* holds step 1\)$"):
            net.train_step(x, y, layer_lr=1e300, head_lr=1e300)
        assert net.step == 1 and net.unusable is None
        net.save()
    assert path.read_bytes() == before


def test_huge_layer_lr_streamed_leaves_a_torn_step_never_a_committed_one(tmp_path):
    """issue 18 item 1: --layer-lr 1e300 makes the first chunk's updated core rows infinite: the step
    stops there and is not committed (the memory-mapped chunk is marked: a torn step)."""
    path = new_model(tmp_path / "m.h5")
    x, y = batch()
    with DeepNet.open(path, writable=True, chunk_layers=50) as net:
        with pytest.raises(NonFiniteError) as e:
            net.train_step(x, y, layer_lr=1e300, head_lr=0.1)
        assert str(e.value).startswith("step 1 failed: the updated weights of layers 250..299 are not finite; ")
        assert "\n" not in str(e.value)
    core, _, step, status = contents(path)
    assert step == 0 and status == "torn"
    assert np.isfinite(core[:250]).all()   # no chunk after the first was touched


def test_huge_layer_lr_through_h5py_writes_nothing(tmp_path, monkeypatch):
    """issue 18 item 1: through h5py the non-finite chunk is not written back: the file is unchanged."""
    monkeypatch.setenv("DEEPNET_NO_MMAP", "1")
    path = new_model(tmp_path / "m.h5")
    before = contents(path)
    x, y = batch()
    with DeepNet.open(path, writable=True, chunk_layers=50) as net:
        with pytest.raises(NonFiniteError, match=r"^step 1 failed: the updated weights of layers 250\.\.299 are "
                                                 r"not finite; .* holds step 0$"):
            net.train_step(x, y, layer_lr=1e300, head_lr=0.1)
    after = contents(path)
    assert np.array_equal(before[0], after[0]) and after[2:] == (0, "healthy")


@needs_mnist
def test_huge_layer_lr_in_memory_keeps_the_last_checkpoint(tmp_path, mnist_dir):
    """issue 18 item 1: in memory the damaged weights in RAM are never saved."""
    path = tmp_path / "m.h5"
    run = dict(layers=200, width=4, batch=4, train_limit=200, test_samples=0, in_memory=True, progress=False)
    deepnet.train(path, steps=2, **run)
    before = contents(path)
    with pytest.raises(NonFiniteError, match=r"^step 3 failed: the updated weights of layers .* are not finite; "
                                             r"the weights in RAM are unusable and will not be saved"):
        deepnet.train(path, steps=2, layer_lr=1e300, **run)
    after = contents(path)
    assert np.array_equal(before[0], after[0]) and after[2:] == (2, "healthy")
    assert all(np.isfinite(after[1][k]).all() for k in HEAD_KEYS)


@pytest.mark.parametrize("in_memory", [False, True], ids=["streamed", "in-memory"])
def test_non_finite_input_head_stops_the_step_before_its_commit(tmp_path, monkeypatch, in_memory):
    """issue 18 item 1: the input head's new values are known only after the core's backward pass: if
    they are not finite the step is not committed (streamed: a torn step) and nothing is saved."""
    path = new_model(tmp_path / "m.h5")
    real = heads_module.stepped_input
    monkeypatch.setattr(heads_module, "stepped_input",
                        lambda *a: {k: v * np.float32(np.inf) for k, v in real(*a).items()})
    x, y = batch()
    with DeepNet.open(path, writable=True, in_memory=in_memory, chunk_layers=50) as net:
        with pytest.raises(NonFiniteError, match=r"^step 1 failed: the updated input head is not finite; "):
            net.train_step(x, y, layer_lr=0.1, head_lr=0.1)
        assert net.unusable
        if in_memory:
            with pytest.raises(ModelFileError, match="not saving"):
                net.save()
    core, heads, step, status = contents(path)
    assert step == 0 and status == ("healthy" if in_memory else "torn")
    assert all(np.isfinite(heads[k]).all() for k in HEAD_KEYS)


@pytest.mark.parametrize("in_memory", [False, True], ids=["streamed", "in-memory"])
def test_non_finite_branch_update_is_refused_before_anything_is_written(tmp_path, monkeypatch, in_memory):
    """issue 18 item 1: the MLP branch's new values are checked before the core is touched."""
    path = new_model(tmp_path / "m.h5", branch="mlp", hidden=8)
    before = path.read_bytes()
    real = MLPBranch.stepped
    monkeypatch.setattr(MLPBranch, "stepped",
                        lambda self, g, lr: {**real(self, g, lr), "b2": np.full(10, np.nan, np.float32)})
    x, y = batch()
    with DeepNet.open(path, writable=True, in_memory=in_memory, chunk_layers=50) as net:
        with pytest.raises(NonFiniteError, match=r"^step 1 refused: the updated MLP branch is not finite; nothing"):
            net.train_step(x, y, layer_lr=0.1, head_lr=0.1)
        assert np.isfinite(net.branch.b2).all()
        net.save()
    assert path.read_bytes() == before


def test_non_finite_weight_average_is_never_saved_or_written_back(tmp_path):
    """issue 18 item 1: an average that overflows (live weights near float32's limit) is never written to
    a file nor written back into the live weights."""
    import h5py

    path = new_model(tmp_path / "m.h5", layers=20)
    with DeepNet.open(path, writable=True, in_memory=True) as net:
        average = WeightAverage.start(net, 0.5, every=1)
        net.core_weights[0, 0] = np.float32(3e38)
        average.core[0, 0] = np.float32(-3e38)
        net.step = 1
        with pytest.raises(NonFiniteError, match=r"^step 1 failed, nothing written back \(.* holds step 0\): "
                                                 r"the weight average is not finite at step 1$"):
            average.after_step(net)
        assert net.core_weights[0, 0] == np.float32(3e38)
        with h5py.File(tmp_path / "other.h5", "w") as h5, \
                pytest.raises(NonFiniteError, match="^not saving the model with its weight average: "):
            average.write_copy(h5)
        average.close()


def test_mlp_huge_lr_is_refused_and_changes_nothing():
    """issue 18 item 1: the MLP baseline refuses a step whose new weights are not finite."""
    net = MLP.new(16, seed=0)
    params = {k: v.copy() for k, v in net.params().items()}
    x, y = batch(n=8)
    with pytest.raises(NonFiniteError, match=r"^step 1 refused: the updated MLP weights .* are not finite"):
        net.train_step(x, y, 1e300)
    assert net.step == 0
    assert all(np.array_equal(params[k], v) for k, v in net.params().items())


@needs_mnist
def test_train_mlp_saves_the_good_steps_and_refuses_the_bad_one(tmp_path, mnist_dir, monkeypatch):
    """issue 18 item 1: `train-mlp` with an exploding rate exits with one line; the file holds the last
    good step (or is not created when the first step is refused)."""
    path = tmp_path / "m.h5"
    with pytest.raises(NonFiniteError, match=r"^step 1 refused: .*; nothing was written$"):
        deepnet.train_mlp(path, hidden=16, steps=5, lr=1e300, test_samples=0, train_limit=100)
    assert not path.exists()
    real = MLP.stepped

    def explode_at_4(self, grads, lr):
        return real(self, grads, 1e300 if self.step == 3 else lr)

    monkeypatch.setattr(MLP, "stepped", explode_at_4)
    with pytest.raises(NonFiniteError, match=rf"^step 4 refused: .*; saved the last good step, 3, to {path}$"):
        deepnet.train_mlp(path, hidden=16, steps=5, test_samples=0, train_limit=100, report_every=100)
    stored = MLP.load(path)
    assert stored.step == 3 and all(np.isfinite(v).all() for v in stored.params().values())
