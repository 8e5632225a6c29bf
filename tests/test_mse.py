"""The mean-squared-error loss (a model whose data record says loss "mse": regression on target vectors, a
teacher's outputs): the loss and its gradient against float64 and finite differences, the batch check of
target vectors, and DeepNet's exact SGD step on them against the independent float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

from deepnet import DeepNet
from deepnet.errors import ConfigError
from deepnet.formats import shards
from deepnet.formats.data_record import LOSSES, DataRecord, read_data_record, write_data_record
from deepnet.formats.hdf5 import ModelFile
from deepnet.nn.batches import check_batch
from deepnet.nn.losses import loss_and_gradient, mean_squared_error, softmax_cross_entropy
from reference import Model64, assert_close, assert_step_is_the_gradient, assert_update_close, mse, train_step_mse

# ---------------------------------------------------------------------------------------------------
# the loss


@pytest.mark.parametrize("n", [1, 7, 256])
def test_matches_float64_reference(n):
    rng = np.random.default_rng(n)
    outputs = rng.normal(0, 3, (n, 10)).astype(np.float32)
    targets = rng.normal(0, 1, (n, 10)).astype(np.float32)
    loss, agreement, grad = mean_squared_error(outputs, targets)
    want_loss, want_grad = mse(outputs, targets)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert loss == float(np.float32(loss))            # averaged in float32, as the dense model's xent
    assert agreement == np.mean(np.argmax(outputs, axis=1) == np.argmax(targets, axis=1))
    assert grad.dtype == np.float32 and grad.shape == outputs.shape
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-9)


def test_mean_over_every_element():
    """The 'mean' reduction of torch.nn.MSELoss: over batch x outputs, not summed over the outputs."""
    outputs = np.array([[1, 2, 3], [0, 0, 0]], np.float32)
    targets = np.array([[1, 0, 3], [0, 0, 1]], np.float32)
    loss, _, grad = mean_squared_error(outputs, targets)
    assert loss == pytest.approx((4 + 1) / 6)
    np.testing.assert_allclose(grad, [[0, 4 / 6, 0], [0, 0, -2 / 6]], rtol=1e-6)


def test_gradient_matches_finite_differences():
    rng = np.random.default_rng(3)
    outputs = rng.normal(0, 2, (5, 4))                 # float64: the loss is averaged in float64 here
    targets = rng.normal(0, 1, (5, 4))
    _, _, grad = mean_squared_error(outputs, targets)
    eps = 1e-6
    fd = np.zeros_like(outputs)
    for idx in np.ndindex(outputs.shape):
        up, down = outputs.copy(), outputs.copy()
        up[idx] += eps
        down[idx] -= eps
        fd[idx] = (mean_squared_error(up, targets)[0] - mean_squared_error(down, targets)[0]) / (2 * eps)
    assert np.max(np.abs(fd)) > 1e-2
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-7)


def test_agreement_is_the_argmax_agreement():
    outputs = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4], [1.0, 0.0, 0.0]], np.float32)
    targets = np.array([[0.5, 0.2, 0.3], [0.1, 0.1, 0.8], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0]], np.float32)
    assert mean_squared_error(outputs, targets)[1] == 0.5


def test_inputs_are_not_modified():
    outputs = np.arange(12, dtype=np.float32).reshape(3, 4)
    targets = np.ones((3, 4), np.float32)
    before = outputs.copy(), targets.copy()
    mean_squared_error(outputs, targets)
    assert np.array_equal(outputs, before[0]) and np.array_equal(targets, before[1])


def test_dispatcher():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 5, (9, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 9)
    targets = rng.normal(0, 1, (9, 10)).astype(np.float32)
    assert LOSSES == ("xent", "mse")
    for (loss, acc, grad), (want_loss, want_acc, want_grad) in [
            (loss_and_gradient("xent", logits, labels), softmax_cross_entropy(logits, labels)),
            (loss_and_gradient("mse", logits, targets), mean_squared_error(logits, targets))]:
        assert loss == want_loss and acc == want_acc and np.array_equal(grad, want_grad)   # bit for bit
    with pytest.raises(ConfigError, match="unknown loss 'hinge'"):
        loss_and_gradient("hinge", logits, labels)


# ---------------------------------------------------------------------------------------------------
# the batch check


def test_check_batch_targets():
    x = np.zeros((3, 4), np.float64)
    y = np.asfortranarray(np.arange(15, dtype=np.float64).reshape(3, 5))
    cx, cy = check_batch(x, y, input_dim=4, n_classes=5, targets=True)
    assert cy.dtype == np.float32 and cy.flags.c_contiguous and np.array_equal(cy, y)
    assert cx.dtype == np.float32 and cx.flags.c_contiguous
    assert check_batch(x, None, input_dim=4, n_classes=5, targets=True)[1] is None
    # the default (labels) is as it was
    _, labels = check_batch(x, np.array([0, 4, 2], np.int32), input_dim=4, n_classes=5)
    assert labels.dtype == np.intp and labels.tolist() == [0, 4, 2]


@pytest.mark.parametrize("y, match", [
    (np.array([0, 1, 2]), "float target vectors"),                        # labels given to an mse model
    (np.zeros((3, 5), np.int64), "float target vectors"),                 # integer targets
    (np.zeros((3, 5), bool), "float target vectors"),
    (np.zeros((3, 6), np.float32), r"got shape \(3, 6\)"),                 # too many outputs
    (np.zeros((2, 5), np.float32), r"got shape \(2, 5\)"),                 # too few rows
    (np.zeros((3, 5, 1), np.float32), r"got shape \(3, 5, 1\)"),
    (np.zeros(15, np.float32), r"got shape \(15,\)"),
    (np.full((3, 5), np.nan, np.float32), "finite"),
    (np.where(np.eye(3, 5) > 0, np.inf, 0.0), "finite"),
    (np.full((3, 5), 1e39), "finite"),                                    # finite float64, inf in float32
])
def test_check_batch_refuses_bad_targets(y, match):
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(ConfigError, match=match) as info:
        check_batch(x, y, input_dim=4, n_classes=5, targets=True)
    assert "\n" not in str(info.value)


def test_check_batch_default_refuses_targets():
    with pytest.raises(ConfigError, match="integer labels") as info:
        check_batch(np.zeros((3, 4)), np.zeros((3, 5), np.float32), input_dim=4, n_classes=5)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------------
# DeepNet on an mse model


WIDTH, LAYERS, INPUT_DIM, OUTPUTS = 4, 20, 12, 5


def make_mse_model(path, *, seed: int = 1, loss: str = "mse"):
    """A small model whose record says ``loss``, its weights large enough that every term of a step matters."""
    ModelFile.create(path, layers=LAYERS, width=WIDTH, activation="relu", input_dim=INPUT_DIM, n_classes=OUTPUTS,
                     init_scale=0.5, seed=seed, progress=False,
                     extra=lambda f: write_data_record(f, DataRecord(loss=loss))).close()
    return path


def regression_problem(n: int = 64):
    """Fixed inputs and the targets of a fixed 'teacher' (a random tanh layer)."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (n, INPUT_DIM)).astype(np.float32)
    z = x @ rng.normal(0, 1, (INPUT_DIM, OUTPUTS))
    return x, np.tanh(z - z.mean(axis=0)).astype(np.float32)


def test_the_reference_step_is_the_finite_difference_gradient():
    """The float64 mse step (tests/reference.py) applies the true gradient of the mse loss."""
    rng = np.random.default_rng(4)
    u = lambda *shape: rng.uniform(-0.5, 0.5, shape)  # noqa: E731
    m = Model64(u(5, 3), u(3), u(4, 12), u(3, 4), u(4), 0.7, "tanh")
    x, targets = rng.uniform(0, 1, (6, 5)), rng.normal(0, 1, (6, 4))
    res = train_step_mse(m, x, targets, layer_lr=0.3, head_lr=0.2)
    loss = lambda: mse(m.logits(x), targets)[0]  # noqa: E731
    assert res.loss == pytest.approx(loss(), rel=1e-12)
    assert_step_is_the_gradient(m, res, loss, layer_lr=0.3, head_lr=0.2)


@pytest.mark.parametrize("in_memory", [True, False], ids=["in_memory", "streamed"])
def test_train_step_matches_reference(tmp_path, in_memory):
    path = make_mse_model(tmp_path / "m.h5")
    x, targets = regression_problem(6)
    layer_lr, head_lr = 0.5, 0.3
    with DeepNet.open(path, writable=True, in_memory=in_memory, chunk_layers=7) as net:
        assert net.loss_kind == "mse"
        for step in (1, 2):
            net.save()
            heads, core = net.file.read_heads(), net.file.read_core()
            ref = train_step_mse(Model64.from_arrays(heads, core, net.file.alpha, "relu"), x, targets,
                                 layer_lr, head_lr)
            result = net.train_step(x, targets.astype(np.float64), layer_lr=layer_lr, head_lr=head_lr)
            net.save()
            new_heads, new_core = net.file.read_heads(), net.file.read_core()
            assert result.step == step
            assert result.loss == pytest.approx(ref.loss, rel=1e-5)
            assert result.batch_acc == ref.accuracy
            assert_close(new_core, ref.model.core, what=f"step {step} core")
            assert_update_close(new_core, core, ref.model.core, what=f"step {step} core update")
            for key, value in ref.model.heads().items():
                assert_close(new_heads[key], value, what=f"step {step} {key}")
                assert_update_close(new_heads[key], heads[key], value, what=f"step {step} {key} update")
    with DeepNet.open(path) as net:                  # the record survives the in-memory rewrite
        assert net.loss_kind == "mse" and net.step == 2


def test_loss_decreases(tmp_path):
    path = make_mse_model(tmp_path / "m.h5")
    x, targets = regression_problem()
    with DeepNet.open(path, writable=True, in_memory=True) as net:
        losses = [net.train_step(x, targets, layer_lr=0.3, head_lr=0.3).loss for _ in range(50)]
        final = net.evaluate(x, targets).loss
    assert all(np.isfinite(losses))
    assert final < 0.5 * losses[0], (losses[0], final)
    assert sum(b < a for a, b in zip(losses, losses[1:])) >= 45, losses


def test_evaluate_and_logits_match_reference(tmp_path):
    path = make_mse_model(tmp_path / "m.h5")
    x, targets = regression_problem(37)
    with DeepNet.open(path) as net:
        m = Model64.from_arrays(net.file.read_heads(), net.file.read_core(), net.file.alpha, "relu")
        outputs = m.logits(x)
        assert_close(net.logits(x), outputs, what="outputs")
        result = net.evaluate(x, targets, batch=8)   # 5 batches, the last one partial
    assert result.samples == 37
    assert result.loss == pytest.approx(mse(outputs, targets)[0], rel=1e-5)
    agreement = np.mean(np.argmax(outputs, axis=1) == np.argmax(targets, axis=1))
    assert 0 < agreement < 1                         # the check is not vacuous
    assert result.accuracy == pytest.approx(agreement, abs=1e-12)


def test_labels_are_refused_by_an_mse_model_and_targets_by_an_xent_one(tmp_path):
    x, targets = regression_problem(4)
    with DeepNet.open(make_mse_model(tmp_path / "mse.h5"), writable=True) as net:
        for call in (lambda: net.train_step(x, np.array([0, 1, 2, 3]), layer_lr=0.1, head_lr=0.1),
                     lambda: net.evaluate(x, np.array([0, 1, 2, 3]))):
            with pytest.raises(ConfigError, match="float target vectors") as info:
                call()
            assert "\n" not in str(info.value)
        assert net.step == 0
    with DeepNet.open(make_mse_model(tmp_path / "xent.h5", loss="xent"), writable=True) as net:
        assert net.loss_kind == "xent"
        with pytest.raises(ConfigError, match="integer labels"):
            net.train_step(x, targets, layer_lr=0.1, head_lr=0.1)
        assert net.step == 0


def test_a_file_without_a_record_is_xent_and_a_sharded_root_keeps_mse(tmp_path):
    ModelFile.create(tmp_path / "plain.h5", layers=3, width=3, activation="relu", input_dim=4, n_classes=3,
                     progress=False).close()
    with DeepNet.open(tmp_path / "plain.h5") as net:
        assert net.loss_kind == "xent"
    shards.shard_model(make_mse_model(tmp_path / "m.h5"), 2, tmp_path / "m.sharded.h5")
    with shards.open_root(tmp_path / "m.sharded.h5") as root:
        assert read_data_record(root.file.h5, root.path).loss == "mse"
    with DeepNet.open(tmp_path / "m.sharded.h5") as net:
        assert net.loss_kind == "mse"
