"""Every built-in activation, as the compiled kernels evaluate it, against float64 over the full range.

The kernels may approximate (tanh is a rational function there, not libm's tanhf), so this checks the
forward and the derivative the kernels actually use, through a width-2 layer wired so that the
outputs are act(z) and act'(z) exactly: unit 1 gets z = h_0 (W[0][1] = 1, everything else 0, alpha = 1),
so h_1 becomes 0 + act(z), and back-propagating g = (0, 1) returns act'(z) at unit 0.
"""

import numpy as np
import pytest

from deepnet.activations import BUILTINS, get
from deepnet.activations.check import kernel_act_and_grad as probe
from helpers import kernel_builds
from deepnet.kernels.loader import LayerKernels, kernels_for

# Points across the whole float32 range that matters: tiny, around 1, large, and the signed zeros.
Z = np.concatenate([
    np.linspace(-20, 20, 40001),
    np.geomspace(1e-30, 1e30, 2001),
    -np.geomspace(1e-30, 1e30, 2001),
    [0.0, -0.0, 8.9999, 9.0, 9.0001, -9.0001, 88.0, -88.0, 1e38, -1e38],
]).astype(np.float32)


def kernel_act_and_grad(name: str, z: np.ndarray, module=None) -> tuple[np.ndarray, np.ndarray]:
    kernels = kernels_for(name) if module is None else LayerKernels(name, module, module.activation_index(name))
    return probe(kernels, z)


# Relative forward tolerance where a kernel approximates more loosely than a few ulps (gelu's erf is a
# polynomial fit), and the |z| beyond which an activation's argument reduction is not claimed (sin).
FORWARD_RELATIVE = {"gelu": 2e-5}
DOMAIN = {"sin": 1e4}


@pytest.mark.parametrize("module", kernel_builds(), ids=lambda m: m.__name__)
@pytest.mark.parametrize("name", [a.name for a in BUILTINS])
def test_kernel_activation_matches_float64(name, module):
    act = get(name)
    z = Z[np.abs(Z) <= DOMAIN.get(name, np.inf)]
    a, d = kernel_act_and_grad(name, z, module)
    z64 = z.astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        a_ref = act.forward_np(z64)
        d_ref = act.derivative_np(z64, a_ref)
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(d))
    # Forward: within a few float32 ulps of the exact value (relative), or 1e-7 absolute near zero.
    err_a = np.abs(a - a_ref)
    rel = FORWARD_RELATIVE.get(name, 4e-7)
    assert np.all(err_a <= np.maximum(rel * np.abs(a_ref), 1e-37)), (name, z[np.argmax(err_a)], err_a.max())
    # Derivative: 1e-6 relative, or 6e-7 absolute where it is small: tanh' = 1 - a*a in float32 turns
    # the few-ulp error of a near |a| = 1 into ~2|a| times that, absolute (libm's tanhf would give 1.2e-7).
    err_d = np.abs(d - d_ref)
    assert np.all(err_d <= np.maximum(1e-6 * np.abs(d_ref), 6e-7)), (name, z[np.argmax(err_d)], err_d.max())


@pytest.mark.parametrize("name", [a.name for a in BUILTINS])
def test_signed_zero_and_saturation(name):
    a, _ = kernel_act_and_grad(name, np.array([0.0, -0.0, 1e30, -1e30, 9.5, -9.5], np.float32))
    assert a[0] == 0.0 and a[1] == 0.0
    if name in ("tanh", "softsign"):
        assert np.signbit(a[1]), "act(-0) must be -0 for an odd activation"
        assert a[2] == 1.0 and a[3] == -1.0
    if name == "tanh":
        assert a[4] == np.float32(np.tanh(9.5)) and a[5] == -a[4]


def test_nan_propagates_through_tanh():
    a, _ = kernel_act_and_grad("tanh", np.array([np.nan], np.float32))
    assert np.isnan(a[0])
