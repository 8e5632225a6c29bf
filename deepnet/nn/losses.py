"""The loss both classifiers train on: the batch-mean softmax cross-entropy of the logits."""

from __future__ import annotations

import numpy as np


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
