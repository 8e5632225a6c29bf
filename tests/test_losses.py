"""The one softmax cross-entropy (deepnet.nn.losses) both models train on: its figures against the float64
reference, and what its ``loss_dtype`` changes (the loss's averaging only, never the gradient)."""

from __future__ import annotations

import numpy as np
import pytest

from deepnet.nn.losses import softmax_cross_entropy
from reference import softmax_xent


@pytest.mark.parametrize("n", [1, 7, 256])
def test_matches_float64_reference(n):
    rng = np.random.default_rng(n)
    logits = rng.normal(0, 5, (n, 10)).astype(np.float32)
    labels = rng.integers(0, 10, n)
    loss, accuracy, dlogits = softmax_cross_entropy(logits, labels)
    want_loss, want_grad = softmax_xent(logits, labels)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert accuracy == np.mean(np.argmax(logits, axis=1) == labels)
    assert dlogits.dtype == np.float32
    np.testing.assert_allclose(dlogits, want_grad, rtol=1e-5, atol=1e-7)


def test_loss_dtype_changes_only_the_loss_average():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 20, (300, 10)).astype(np.float32)
    labels = rng.integers(0, 10, 300)
    loss32, acc32, grad32 = softmax_cross_entropy(logits, labels)
    loss64, acc64, grad64 = softmax_cross_entropy(logits, labels, loss_dtype=np.float64)
    assert np.array_equal(grad32, grad64) and acc32 == acc64
    assert loss32 == float(np.float32(loss32))        # the dense model's: averaged in float32
    assert loss64 == pytest.approx(loss32, rel=1e-5)  # the MLP baseline's: in float64


def test_logits_are_not_modified():
    logits = np.arange(20, dtype=np.float32).reshape(2, 10)
    before = logits.copy()
    softmax_cross_entropy(logits, np.array([1, 2]))
    assert np.array_equal(logits, before)
