"""``deepnet activations check NAME``: is an activation's compiled derivative the derivative of its forward?

Everything is evaluated through the activation's real compiled kernel (compiled first if needed), with
a width-2 layer wired so that the outputs are exactly act(z) and act'(z) (unit 1 gets z = h_0 through
W[0][1] = 1, alpha = 1; back-propagating g = (0, 1) returns act'(z) at unit 0). Three comparisons over a
grid of z:

1. the C derivative against central finite differences of the C forward, in float64 from the float32
   values at z +- h. The difference quotient is the mean of the true derivative over [z - h, z + h], so a
   point passes if it matches Simpson's rule over the C derivative at z - h, z, z + h, or (at a kink,
   where Simpson does not apply) lies within the C derivative's range over that interval; the
   finite difference's own rounding error is allowed for;
2. the C forward against the NumPy forward;
3. the C derivative against the NumPy derivative.

Errors are absolute where the reference is below 1 in magnitude and relative above. The worst error of
each comparison is reported; any over its tolerance makes the check fail.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from deepnet import activations
from deepnet.errors import ActivationError
from deepnet.kernels.loader import kernels_for

FD_TOLERANCE = 1e-3  # the derivative against finite differences (after their rounding allowance)
NUMPY_TOLERANCE = 1e-4  # C against NumPy, forward and derivative


class ActivationCheckError(ActivationError):
    """An activation's compiled derivative or forward is wrong (``deepnet activations check``)."""


@dataclass
class Comparison:
    what: str
    worst_error: float
    at_z: float
    tolerance: float
    points: int

    @property
    def ok(self) -> bool:
        return bool(self.worst_error <= self.tolerance)


def kernel_act_and_grad(kernels, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """act(z) and act'(z) as the compiled kernels compute them (float32 in, float32 out)."""
    z = np.ascontiguousarray(z, dtype=np.float32)
    batch = z.shape[0]
    params = np.zeros((1, 6), np.float32)
    params[0, 1] = 1.0  # W[0][1]: z_1 = h_0
    params[0, 5] = -0.0  # b_1 = -0, so that a zero h_0 keeps its sign
    h = np.zeros((2, batch), np.float32)
    h[0] = z
    h[1] = -0.0  # -0 + a == a for every a
    saves = np.zeros((1, 2 * batch), np.float32)
    kernels.forward(params, h, 1.0, saves, 1)
    g = np.zeros((2, batch), np.float32)
    g[1] = 1.0
    kernels.backward(params.copy(), saves, 1, g, 1.0, 0.0)
    return h[1].copy(), g[0].copy()


def grid() -> np.ndarray:
    """The float32 points z the check runs over: dense near 0, then out to +-1000."""
    z = np.concatenate([
        np.linspace(-12.0, 12.0, 4801),
        np.geomspace(1e-6, 1e3, 181),
        -np.geomspace(1e-6, 1e3, 181),
        [0.0],
    ])
    return np.unique(z.astype(np.float32))


def _scaled(err: np.ndarray, ref: np.ndarray) -> np.ndarray:
    return err / np.maximum(1.0, np.abs(ref))


def _worst(what: str, err: np.ndarray, z: np.ndarray, tolerance: float) -> Comparison:
    err = np.where(np.isnan(err), np.inf, err)
    i = int(np.argmax(err))
    return Comparison(what, float(err[i]), float(z[i]), tolerance, int(z.size))


def check_kernels(activation, kernels, evaluate=None) -> list[Comparison]:
    """The three comparisons for ``activation`` evaluated through ``kernels`` (a LayerKernels), or
    through ``evaluate(z) -> (act(z), act'(z))`` float32 arrays if given."""
    evaluate = evaluate or (lambda zs: kernel_act_and_grad(kernels, zs))
    z = grid()
    z64 = z.astype(np.float64)
    h = np.float32(2.0 ** -8) * np.maximum(np.float32(1.0), np.abs(z) / np.float32(8.0))
    zm, zp = (z - h).astype(np.float32), (z + h).astype(np.float32)
    n = z.size
    a_all, d_all = evaluate(np.concatenate([z, zm, zp]))
    a, am, ap = a_all[:n].astype(np.float64), a_all[n:2 * n].astype(np.float64), a_all[2 * n:].astype(np.float64)
    d, dm, dp = d_all[:n].astype(np.float64), d_all[n:2 * n].astype(np.float64), d_all[2 * n:].astype(np.float64)

    with np.errstate(all="ignore"):
        step = zp.astype(np.float64) - zm.astype(np.float64)
        fd = (ap - am) / step
        simpson = (dm + 4.0 * d + dp) / 6.0
        lo, hi = np.minimum(np.minimum(dm, d), dp), np.maximum(np.maximum(dm, d), dp)
        outside = np.maximum(0.0, np.maximum(lo - fd, fd - hi))
        raw = np.minimum(np.abs(fd - simpson), outside)
        # a few float32 ulps of each forward value, divided by the step, plus the derivative's own rounding
        rounding = 8.0 * 2.0 ** -24 * (np.abs(ap) + np.abs(am)) / step + 8.0 * 2.0 ** -24 * np.abs(simpson)
        fd_err = _scaled(np.maximum(0.0, raw - rounding), fd)
        fd_err = np.where(np.isfinite(fd) & np.isfinite(simpson), fd_err, np.inf)

        a_ref = np.asarray(activation.forward_np(z64), dtype=np.float64)
        d_ref = np.asarray(activation.derivative_np(z64, a_ref), dtype=np.float64)
        fwd_err = _scaled(np.abs(a - a_ref), a_ref)
        der_err = _scaled(np.abs(d - d_ref), d_ref)
    return [
        _worst("C derivative vs finite differences of C forward", fd_err, z, FD_TOLERANCE),
        _worst("C forward vs NumPy forward", fwd_err, z, NUMPY_TOLERANCE),
        _worst("C derivative vs NumPy derivative", der_err, z, NUMPY_TOLERANCE),
    ]


def check_activation(name: str) -> dict:
    """Check the registered activation ``name`` through its compiled kernel (compiling it if needed).

    Returns a dict (name, origin, kernel module, ok, comparisons); does not raise on a failed check.
    """
    activation = activations.get(name)
    kernels = kernels_for(name)
    comparisons = check_kernels(activation, kernels)
    return {
        "name": name,
        "origin": activation.origin,
        "module": kernels.module.__name__,
        "forward_c": activation.forward_c,
        "derivative_c": activation.derivative_c,
        "ok": all(c.ok for c in comparisons),
        "comparisons": [dict(asdict(c), ok=c.ok) for c in comparisons],
    }


def format_report(result: dict) -> str:
    """The result of ``check_activation`` as a small table."""
    comparisons = result["comparisons"]
    lines = [
        f"activation {result['name']!r} ({result['origin']}), kernel {result['module']}, "
        f"{comparisons[0]['points']:,} points in [-1000, 1000]",
        f"  forward    {result['forward_c']}",
        f"  derivative {result['derivative_c']}",
        f"  {'comparison':<50} {'worst error':>11} {'at z':>12} {'tolerance':>9}  result",
    ]
    for c in comparisons:
        lines.append(f"  {c['what']:<50} {c['worst_error']:>11.3g} {c['at_z']:>12.6g} {c['tolerance']:>9.0e}  "
                     f"{'ok' if c['ok'] else 'WRONG'}")
    return "\n".join(lines)


def failure_message(result: dict) -> str:
    bad = [c for c in result["comparisons"] if not c["ok"]]
    parts = [f"{c['what']}: worst error {c['worst_error']:.3g} at z = {c['at_z']:.6g} (tolerance {c['tolerance']:g})"
             for c in bad]
    return f"activation {result['name']!r} fails its check: " + "; ".join(parts)
