"""The residual MLP branch (deepnet.nn.branch): the combined step is exact, it is stored and loaded with the
model, evaluation includes it, and a model without one behaves exactly as before."""

from __future__ import annotations

import subprocess
from pathlib import Path
import sys

import h5py
import numpy as np
import pytest

import deepnet
import reference_branch as rb
from deepnet import DeepNet, ModelFile
from deepnet.nn.branch import MLPBranch
from deepnet.errors import ConfigError
from deepnet.formats.layout import BRANCH_GROUP, mlp_paths
from helpers import MNIST_DIR, have_mnist, read_weights
from reference import Model64, assert_close, assert_update_close, softmax_xent

HIDDEN = 12


def branch_model(path, *, layers=30, width=4, activation="softsign", input_dim=20, seed=0, hidden=HIDDEN):
    """A model with a branch whose every weight (biases included) is non-trivial."""
    deepnet.init(path, layers=layers, width=width, activation=activation, input_dim=input_dim, seed=seed,
                 branch="mlp", hidden=hidden, progress=False)
    rng = np.random.default_rng([seed, 77])
    with ModelFile.open(path, "r+") as f:
        f.write_core(rng.uniform(-0.5, 0.5, size=(layers, width * width + width)).astype(np.float32), 0)
        heads = f.read_heads()
        heads["input_bias"] = rng.uniform(-0.1, 0.1, width).astype(np.float32)
        heads["output_bias"] = rng.uniform(-0.1, 0.1, 10).astype(np.float32)
        f.write_heads(heads)
        for key in ("b1", "b2"):
            ds = f.h5[mlp_paths(BRANCH_GROUP)[key]]
            ds[...] = rng.uniform(-0.3, 0.3, ds.shape).astype(np.float32)
    return path


def read_branch(path) -> dict:
    with ModelFile.open(path) as f:
        return MLPBranch.read(f.h5, str(path), input_dim=f.input_dim, n_classes=f.n_classes).params()


def snapshot(net: DeepNet):
    net.save()
    heads, core = net.file.read_heads(), net.file.read_core()
    branch = MLPBranch.read(net.file.h5, net.file.path, input_dim=net.input_dim, n_classes=10).params()
    return heads, core, branch


def test_reference_branch_gradient_matches_finite_differences():
    rng = np.random.default_rng(3)
    u = lambda *s: rng.uniform(-0.5, 0.5, size=s)  # noqa: E731
    m = Model64(u(5, 3), u(3), u(4, 12), u(3, 10), u(10), 0.6, "tanh")
    br = {"w1": u(5, 6), "b1": u(6), "w2": u(6, 10), "b2": u(10)}
    x = rng.uniform(0, 1, size=(4, 5))
    y = rng.integers(0, 10, size=4)
    res = rb.train_step(m, br, x, y, layer_lr=0.3, head_lr=0.2)
    assert res.loss == pytest.approx(rb.loss(m, br, x, y), rel=1e-12)
    eps = 1e-6
    for key in rb.BRANCH_KEYS:
        param = br[key]
        fd = np.zeros_like(param)
        for idx in np.ndindex(param.shape):
            old = param[idx]
            param[idx] = old + eps
            up = rb.loss(m, br, x, y)
            param[idx] = old - eps
            down = rb.loss(m, br, x, y)
            param[idx] = old
            fd[idx] = (up - down) / (2 * eps)
        assert np.max(np.abs(fd)) > 1e-4, key
        np.testing.assert_allclose(res.branch_grads[key], fd, rtol=1e-5, atol=1e-7 * np.max(np.abs(fd)), err_msg=key)


@pytest.mark.parametrize("in_memory", [True, False], ids=["in_memory", "streamed"])
@pytest.mark.parametrize("activation", ["softsign", "tanh"])
def test_train_step_with_branch_matches_reference(tmp_path, activation, in_memory):
    """Three combined steps agree with the float64 reference (core, heads and branch, as stored in the file)."""
    path = branch_model(tmp_path / "m.h5", activation=activation)
    rng = np.random.default_rng(11)
    layer_lr, head_lr = 0.5, 0.2
    with DeepNet.open(path, writable=True, in_memory=in_memory, chunk_layers=7) as net:
        assert net.branch is not None and net.branch.hidden == HIDDEN
        heads, core, branch = snapshot(net)
        for step in (1, 2, 3):
            x = rng.uniform(0, 1, size=(6, 20)).astype(np.float32)
            y = rng.integers(0, 10, size=6)
            ref = rb.train_step(Model64.from_arrays(heads, core, net.file.alpha, activation), branch, x, y,
                                layer_lr, head_lr)
            result = net.train_step(x, y, layer_lr=layer_lr, head_lr=head_lr)
            assert result.loss == pytest.approx(ref.loss, rel=1e-5)
            assert result.batch_acc == ref.accuracy
            new_heads, new_core, new_branch = snapshot(net)
            assert_close(new_core, ref.model.core, what=f"step {step} core")
            assert_update_close(new_core, core, ref.model.core, what=f"step {step} core update")
            for key, value in ref.model.heads().items():
                assert_update_close(new_heads[key], heads[key], value, what=f"step {step} {key} update")
            for key in rb.BRANCH_KEYS:
                assert_close(new_branch[key], ref.branch[key], what=f"step {step} branch {key}")
                assert_update_close(new_branch[key], branch[key], ref.branch[key], what=f"step {step} branch {key} update")
            heads, core, branch = new_heads, new_core, new_branch


def test_logits_and_evaluate_include_the_branch(tmp_path):
    path = branch_model(tmp_path / "m.h5")
    rng = np.random.default_rng(5)
    x = rng.uniform(0, 1, size=(23, 20)).astype(np.float32)
    y = rng.integers(0, 10, size=23)
    heads, core = read_weights(path)
    branch = read_branch(path)
    with DeepNet.open(path) as net:
        m = Model64.from_arrays(heads, core, net.file.alpha, "softsign")
        ref = rb.logits(m, branch, x)
        assert_close(net.logits(x), ref, what="logits")
        # the branch really contributes
        assert np.max(np.abs(rb.branch_logits(branch, x))) > 0.1
        result = net.evaluate(x, y, batch=8)
    assert result.loss == pytest.approx(softmax_xent(ref, y)[0], rel=1e-5)


def test_branch_is_stored_and_leaves_core_and_heads_alone(tmp_path):
    deepnet.init(tmp_path / "plain.h5", layers=40, width=4, seed=3, progress=False)
    deepnet.init(tmp_path / "br.h5", layers=40, width=4, seed=3, branch="mlp", hidden=32, progress=False)
    h0, c0 = read_weights(tmp_path / "plain.h5")
    h1, c1 = read_weights(tmp_path / "br.h5")
    assert np.array_equal(c0, c1) and all(np.array_equal(h0[k], h1[k]) for k in h0)
    with ModelFile.open(tmp_path / "br.h5") as f:
        assert f.h5.attrs["branch"] == "mlp" and int(f.h5.attrs["branch_hidden"]) == 32
        shapes = {k: f.h5[mlp_paths(BRANCH_GROUP)[k]].shape for k in rb.BRANCH_KEYS}
        assert shapes == {"w1": (784, 32), "b1": (32,), "w2": (32, 10), "b2": (10,)}
        paths = mlp_paths(BRANCH_GROUP)
        assert np.abs(f.h5[paths["w1"]][()]).max() > 0 and not f.h5[paths["b1"]][()].any()
    with ModelFile.open(tmp_path / "plain.h5") as f:
        assert "branch" not in f.h5.attrs and "branch" not in f.h5


def test_files_without_a_branch_stay_branchless(tmp_path, mnist_dir, capsys):
    """A model without a branch trains as before and never gets one; an older file (no attribute at all) or
    branch="" opens branch-less."""
    for in_memory in (True, False):
        path = tmp_path / f"plain-{in_memory}.h5"
        deepnet.train(path, steps=3, layers=10, width=4, test_samples=0, in_memory=in_memory, progress=False)
        with DeepNet.open(path) as net:
            assert net.branch is None and net.extra_writers == []
            assert "branch" not in net.file.h5 and "branch" not in net.file.h5.attrs
    capsys.readouterr()
    path = branch_model(tmp_path / "old.h5")
    with h5py.File(path, "r+") as f:
        f.attrs["branch"] = ""
    with DeepNet.open(path) as net:
        assert net.branch is None
    with h5py.File(path, "r+") as f:
        del f.attrs["branch"]
        del f.attrs["branch_hidden"]
    with DeepNet.open(path) as net:
        assert net.branch is None


def test_branch_options_are_checked(tmp_path, mnist_dir):
    with pytest.raises(ConfigError, match="--branch mlp needs --hidden"):
        deepnet.init(tmp_path / "a.h5", layers=5, branch="mlp", progress=False)
    with pytest.raises(ConfigError, match="--branch must be mlp"):
        deepnet.init(tmp_path / "a.h5", layers=5, branch="cnn", hidden=4, progress=False)
    with pytest.raises(ConfigError, match="give it with --branch mlp"):
        deepnet.init(tmp_path / "a.h5", layers=5, hidden=4, progress=False)
    assert not (tmp_path / "a.h5").exists()
    deepnet.init(tmp_path / "plain.h5", layers=5, progress=False)
    with pytest.raises(ConfigError, match="has no branch"):
        deepnet.train(tmp_path / "plain.h5", steps=1, branch="mlp", hidden=8, test_samples=0, progress=False)
    deepnet.init(tmp_path / "br.h5", layers=5, branch="mlp", hidden=8, progress=False)
    with pytest.raises(ConfigError, match="hidden 8 but --hidden 9"):
        deepnet.train(tmp_path / "br.h5", steps=1, branch="mlp", hidden=9, test_samples=0, progress=False)
    with ModelFile.open(tmp_path / "br.h5") as f:
        assert f.step == 0


@pytest.mark.skipif(not have_mnist(), reason="no MNIST")
def test_cli_branch(tmp_path):
    # The subprocess runs the deepnet these tests imported, not whichever one is installed.
    env = {"DEEPNET_DATA": str(MNIST_DIR), "PATH": "", "PYTHONPATH": str(Path(deepnet.__file__).parents[1])}
    run = lambda *a: subprocess.run([sys.executable, "-m", "deepnet", *a], cwd=tmp_path, capture_output=True,  # noqa: E731
                                    text=True, env=env, timeout=300)
    proc = run("init", "m.h5", "--layers", "20", "--branch", "mlp", "--hidden", "16")
    assert proc.returncode == 0, proc.stderr
    assert "MLP branch of 16 hidden units" in proc.stdout
    proc = run("train", "--model", "m.h5", "--steps", "4", "--test-samples", "50", "--json")
    assert proc.returncode == 0, proc.stderr
    proc = run("info", "m.h5")
    assert proc.returncode == 0 and "mlp, hidden 16" in proc.stdout, proc.stdout
    proc = run("train", "--model", "m.h5", "--steps", "1", "--branch", "mlp", "--hidden", "17")
    assert proc.returncode == 2 and proc.stderr.startswith("deepnet: error:") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
