"""Example deepnet activation plugin (see this package's pyproject.toml for the entry points).

An ``Activation`` is a name, the forward as a float32 C expression of ``z``, the derivative as a C
expression of ``z`` and ``a`` (= the forward's value at ``z``), the same two in NumPy (float64: the
reference deepnet checks the compiled kernel against), and a one-line description. deepnet pastes the C
expressions into its kernel template and compiles that on first use; nothing here needs a compiler.
"""

from __future__ import annotations

import numpy as np

from deepnet.activations import Activation

__version__ = "0.1.0"


def _isru(z):
    return z / np.sqrt(1.0 + z * z)


# Clamping z to +-1e6 keeps z*z finite (1e6 / sqrt(1 + 1e12) is already 1.0f); a is then never +-1
# exactly except where the slope is below float32's resolution anyway.
_ZC = "(z > 1e6f ? 1e6f : (z < -1e6f ? -1e6f : z))"

ISRU = Activation(
    name="isru",
    forward_c=f"{_ZC} / sqrtf(1.0f + {_ZC} * {_ZC})",
    # d/dz z / sqrt(1 + z^2) = (1 + z^2)^(-3/2) = (1 - a^2)^(3/2): no division in the backward pass
    derivative_c="(1.0f - a * a) * sqrtf(1.0f - a * a)",
    forward_np=_isru,
    derivative_np=lambda z, a: (1.0 + z * z) ** -1.5,
    description="inverse square root unit z / sqrt(1 + z^2) (example plugin)",
)


def _sigmoid(z):
    e = np.exp(-np.abs(z))
    return np.where(z > 0, 1.0, e) / (1.0 + e)


SOFTPLUS = Activation(
    name="softplus",
    # max(z, 0) + log(1 + e^-|z|): no overflow; log1pf is libm's (fine, but not vectorised)
    forward_c="(z > 0.0f ? z : 0.0f) + log1pf(dn_expf(-fabsf(z)))",
    derivative_c="(z > 0.0f ? 1.0f : dn_expf(-fabsf(z))) / (1.0f + dn_expf(-fabsf(z)))",
    forward_np=lambda z: np.logaddexp(0.0, z),
    derivative_np=lambda z, a: _sigmoid(z),
    description="log(1 + e^z) (example plugin; calls libm's log1pf, so it does not vectorise)",
)


def _softsign(z):
    return z / (1.0 + np.abs(z))


def benchmark_copies() -> list[Activation]:
    """Activations for benchmarks: softsign under another name, to time a plugin against the built-in."""
    return [
        Activation(
            name="softsign_plugin",
            forward_c="z / (1.0f + fabsf(z))",
            derivative_c="(1.0f - fabsf(a)) * (1.0f - fabsf(a))",
            forward_np=_softsign,
            derivative_np=lambda z, a: 1.0 / (1.0 + np.abs(z)) ** 2,
            description="softsign compiled as a plugin (example plugin; for benchmarks)",
        )
    ]
