"""The activations compiled into the package when it is built.

Each derivative is written in terms of ``a = act(z)`` where that is cheaper than recomputing from ``z``
(softsign: 1/(1+|z|)^2 == (1-|a|)^2, so no division in the backward pass).
"""

from __future__ import annotations

import numpy as np

from deepnet.activations import Activation


def _softsign(z: np.ndarray) -> np.ndarray:
    return z / (1.0 + np.abs(z))


def _softsign_grad(z: np.ndarray, a: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.abs(z)) ** 2


TANH = Activation(
    name="tanh",
    forward_c="dn_tanhf(z)",  # a vectorisable rational approximation, checked against float64 in tests
    derivative_c="1.0f - a * a",
    forward_np=np.tanh,
    derivative_np=lambda z, a: 1.0 - np.tanh(z) ** 2,
    description="hyperbolic tangent",
)

SOFTSIGN = Activation(
    name="softsign",
    forward_c="z / (1.0f + fabsf(z))",
    derivative_c="(1.0f - fabsf(a)) * (1.0f - fabsf(a))",
    forward_np=_softsign,
    derivative_np=_softsign_grad,
    description="z / (1 + |z|), the original experiment's default",
)

RELU = Activation(
    name="relu",
    forward_c="(z > 0.0f ? z : 0.0f)",
    derivative_c="(z > 0.0f ? 1.0f : 0.0f)",
    forward_np=lambda z: np.where(z > 0, z, 0.0),
    derivative_np=lambda z, a: np.where(z > 0, 1.0, 0.0),
    description="max(z, 0)",
)

BUILTINS: tuple[Activation, ...] = (TANH, SOFTSIGN, RELU)
