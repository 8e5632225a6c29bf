"""Evaluation's forward (nothing saved: narrow widths take two batch blocks per pass) gives exactly the
training forward's states, for every build, width class and batch shape, whole or split into parts."""

import numpy as np
import pytest

from helpers import kernel_builds
from deepnet.kernels.loader import LayerKernels


@pytest.mark.parametrize("module", kernel_builds(), ids=lambda m: m.__name__)
@pytest.mark.parametrize("activation", ["softsign", "tanh", "relu"])
@pytest.mark.parametrize("width", [1, 2, 4, 5, 8])
@pytest.mark.parametrize("batch", [8, 16, 37, 64, 100])
def test_eval_forward_equals_training_forward(module, activation, width, batch):
    rng = np.random.default_rng(width * 1000 + batch)
    layers, save_every = 500, 64
    kernels = LayerKernels(activation, module, module.activation_index(activation))
    params = (rng.uniform(-0.5, 0.5, (layers, width * width + width)) / np.sqrt(width)).astype(np.float32)
    h0 = rng.standard_normal((width, batch)).astype(np.float32)

    trained = h0.copy()
    kernels.forward(params, trained, 0.1, np.zeros((-(-layers // save_every), width * batch), np.float32), save_every)
    evaluated = h0.copy()
    kernels.forward(params, evaluated, 0.1)
    assert np.array_equal(trained, evaluated)
    assert not np.array_equal(trained, h0)

    halves = h0.copy()  # two threads' parts of one call, run one after the other
    for part in range(2):
        kernels.forward(params, halves, 0.1, None, 0, None, part, 2)
    assert np.array_equal(trained, halves)
