"""The activations compiled into the package when it is built.

Each derivative is written in terms of ``a = act(z)`` where that is cheaper than recomputing from ``z``
(softsign: 1/(1+|z|)^2 == (1-|a|)^2, so no division in the backward pass). Every expression vectorises:
plain arithmetic, comparisons, ``fabsf``, and the kernel prelude's helpers ``dn_tanhf``, ``dn_expf``,
``dn_sinf``, ``dn_cosf`` (rational or polynomial approximations, no libm call). The NumPy versions are
the exact float64 functions the kernels are checked against; they are written in forms that neither
overflow to NaN nor lose the tails (sigmoids as 1 / (1 + exp(-x)), not via 1 + tanh).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from deepnet.activations.definition import BUILTIN_ORIGIN, Activation


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

IDENTITY = Activation(
    name="identity",
    forward_c="z",
    derivative_c="1.0f",
    forward_np=lambda z: np.array(z, dtype=np.float64),
    derivative_np=lambda z, a: np.ones_like(z, dtype=np.float64),
    description="z (a linear residual net: a baseline)",
)

LEAKY_RELU_SLOPE = 0.01

LEAKY_RELU = Activation(
    name="leaky_relu",
    forward_c="(z > 0.0f ? z : 0.01f * z)",
    derivative_c="(z > 0.0f ? 1.0f : 0.01f)",
    forward_np=lambda z: np.where(z > 0, z, LEAKY_RELU_SLOPE * z),
    derivative_np=lambda z, a: np.where(z > 0, 1.0, LEAKY_RELU_SLOPE),
    description="z if z > 0 else 0.01 z",
)

HARDTANH = Activation(
    name="hardtanh",
    forward_c="(z > 1.0f ? 1.0f : (z < -1.0f ? -1.0f : z))",
    derivative_c="(z > -1.0f && z < 1.0f ? 1.0f : 0.0f)",
    forward_np=lambda z: np.clip(z, -1.0, 1.0),
    derivative_np=lambda z, a: np.where(np.abs(z) < 1, 1.0, 0.0),
    description="z clipped to [-1, 1]",
)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def _silu_grad(z: np.ndarray, a: np.ndarray) -> np.ndarray:
    # s (1 + z (1 - s)), with 1 - s = sigmoid(-z): no cancellation, no inf * 0
    return _sigmoid(z) * (1.0 + z * _sigmoid(-z))


def _sigmoid_c(x: str, sign_of: str) -> tuple[str, str, str]:
    """C for sigmoid(x) = S / D and 1 - sigmoid(x) = R / D, as (S, R, D), from one e = exp(-|x|);
    ``sign_of`` is an expression with the sign of x (cheaper to test).

    e never overflows, and neither tail cancels: sigmoid(x) = 1/(1+e) for x > 0, e/(1+e) otherwise. The
    sign only selects constants (S = [x > 0] + [x <= 0] e): with dn_expf inside a ?: the compiler neither
    evaluates it once nor vectorises the loop (3x slower).
    """
    e = f"dn_expf(-fabsf({x}))"
    pos, neg = f"({sign_of} > 0.0f ? 1.0f : 0.0f)", f"({sign_of} > 0.0f ? 0.0f : 1.0f)"
    return f"({pos} + {neg} * {e})", f"({neg} + {pos} * {e})", f"(1.0f + {e})"


_S, _R, _D = _sigmoid_c("z", "z")

SILU = Activation(
    name="silu",
    forward_c=f"z * {_S} / {_D}",
    derivative_c=f"{_S} / {_D} * (1.0f + z * {_R} / {_D})",  # s (1 + z (1 - s))
    forward_np=lambda z: z * _sigmoid(z),
    derivative_np=_silu_grad,
    description="z sigmoid(z) (swish)",
)

# gelu, tanh approximation: 0.5 z (1 + tanh(u)), u = sqrt(2/pi) (z + 0.044715 z^3), which is z sigmoid(2u).
_GELU_K2 = 2.0 * np.sqrt(2.0 / np.pi)
_GELU_C = 0.044715


def _gelu_2u(z: np.ndarray) -> np.ndarray:
    return _GELU_K2 * (z + _GELU_C * z ** 3)


def _gelu_grad(z: np.ndarray, a: np.ndarray) -> np.ndarray:
    # s (1 + z (1 - s) 2u'), s = sigmoid(2u), 1 - s = sigmoid(-2u), 2u' = 2k (1 + 3c z^2); huge |z|: s (1 - s) = 0
    u2 = _gelu_2u(z)
    with np.errstate(over="ignore", invalid="ignore"):
        tail = _sigmoid(-u2) * z * (_GELU_K2 * (1.0 + 3.0 * _GELU_C * z * z))
    return _sigmoid(u2) * (1.0 + np.where(_sigmoid(-u2) == 0.0, 0.0, tail))


# 2u = 2k z (1 + c z^2) has the sign of z
_GS, _GR, _GD = _sigmoid_c("1.5957691f * (z + 0.044715f * z * z * z)", "z")
# The derivative's polynomial factor takes z clamped to [-20, 20]: beyond, 1 - sigmoid(2u) is exactly 0 in
# float32, and the clamp keeps 0 * inf (a NaN) out.
_ZC = "(z > 20.0f ? 20.0f : (z < -20.0f ? -20.0f : z))"

GELU = Activation(
    name="gelu",
    forward_c=f"z * {_GS} / {_GD}",
    # s (1 + (1 - s) 2k z (1 + 3c z^2))
    derivative_c=f"{_GS} / {_GD} * (1.0f + {_GR} / {_GD} * 1.5957691f * {_ZC} * (1.0f + 0.134145f * {_ZC} * {_ZC}))",
    forward_np=lambda z: z * _sigmoid(_gelu_2u(z)),
    derivative_np=_gelu_grad,
    description="0.5 z (1 + tanh(sqrt(2/pi) (z + 0.044715 z^3))), gelu's tanh approximation",
)

SIN = Activation(
    name="sin",
    forward_c="dn_sinf(z)",  # a polynomial after range reduction: ~1e-7 absolute for |z| < 1e4
    derivative_c="dn_cosf(z)",
    forward_np=np.sin,
    derivative_np=lambda z, a: np.cos(z),
    description="sin(z) (accurate for |z| < 1e4)",
)

BUILTINS: tuple[Activation, ...] = tuple(
    replace(a, origin=BUILTIN_ORIGIN) for a in (TANH, SOFTSIGN, RELU, IDENTITY, LEAKY_RELU, HARDTANH, SILU, GELU, SIN)
)
