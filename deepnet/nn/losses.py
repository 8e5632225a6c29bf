"""The losses the models train on: the batch-mean softmax cross-entropy of the logits on integer labels
("xent"), and the mean squared error of the outputs against target vectors ("mse", regression on a
teacher's outputs). A model's file records which (deepnet.formats.data_record); ``loss_and_gradient``
computes the one it names."""

from __future__ import annotations

import numpy as np

from deepnet.errors import ConfigError
from deepnet.formats.data_record import LOSSES


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray, *,
                          loss_dtype: type[np.floating] | None = None) -> tuple[float, float, np.ndarray]:
    """Mean loss, accuracy, and dLoss/dlogits (float32) of the batch-mean softmax cross-entropy.

    ``labels`` are integer class indices, one per row of ``logits``. ``loss_dtype`` is the dtype the
    per-sample losses are averaged in (None: the logits' own). It is an argument because the two
    models have always differed here: the dense model averages in float32, the MLP baseline in float64,
    and each keeps its results bit for bit. The gradient does not depend on it.
    """
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    sum_exp = exp.sum(axis=1, keepdims=True)
    n = logits.shape[0]
    rows = np.arange(n)
    loss = float(np.mean(np.log(sum_exp[:, 0]) - shifted[rows, labels], dtype=loss_dtype))
    accuracy = float(np.mean(np.argmax(logits, axis=1) == labels))
    exp /= sum_exp
    exp[rows, labels] -= 1.0
    exp /= n
    return loss, accuracy, exp.astype(np.float32, copy=False)


def mean_squared_error(outputs: np.ndarray, targets: np.ndarray, *,
                       loss_dtype: type[np.floating] | None = None) -> tuple[float, float, np.ndarray]:
    """Mean loss, agreement, and dLoss/doutputs (float32) of the mean squared error.

    The loss is the mean over all batch x outputs elements of (outputs - targets)^2 (PyTorch
    ``nn.MSELoss``'s default "mean" reduction), so the gradient is 2 (outputs - targets) / (batch *
    outputs). ``targets`` has the shape of ``outputs``. The agreement, reported where the cross-entropy
    reports its accuracy, is the fraction of rows whose argmax is the targets' argmax. ``loss_dtype`` is
    as for :func:`softmax_cross_entropy` (None: the differences' own dtype, float32 for the dense model,
    which so averages in float32 as it does the cross-entropy). The gradient does not depend on it.
    """
    diff = outputs - targets
    loss = float(np.mean(np.square(diff), dtype=loss_dtype))
    agreement = float(np.mean(np.argmax(outputs, axis=1) == np.argmax(targets, axis=1)))
    grad = diff * (2.0 / diff.size)
    return loss, agreement, grad.astype(np.float32, copy=False)


def loss_and_gradient(kind: str, outputs: np.ndarray, y: np.ndarray, *,
                      loss_dtype: type[np.floating] | None = None) -> tuple[float, float, np.ndarray]:
    """(loss, accuracy or agreement, dLoss/doutputs float32) of the loss ``kind`` names: "xent"
    (:func:`softmax_cross_entropy`, ``y`` integer labels) or "mse" (:func:`mean_squared_error`, ``y``
    target vectors). ``loss_dtype`` as for either."""
    if kind == "xent":
        return softmax_cross_entropy(outputs, y, loss_dtype=loss_dtype)
    if kind == "mse":
        return mean_squared_error(outputs, y, loss_dtype=loss_dtype)
    raise ConfigError(f"unknown loss {kind!r}: expected one of {', '.join(LOSSES)}")
