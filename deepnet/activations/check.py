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

Each point has an allowance: the comparison's tolerance, absolute where the reference is below 1 in
magnitude and relative above (plus, for the finite differences, their rounding allowance). A point's
ratio is its absolute error over its allowance; each comparison reports its worst ratio, with that
point's z, absolute error and allowance, so a passing check shows its margin (a ratio of 0.3) and a
failing one by how much it fails (above 1). A comparison exact at every point has no worst z.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

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
    """One comparison over the grid, summed up by its worst point: the one whose error is the largest
    fraction of its allowance (``at_z`` is None if every point is exact)."""

    what: str
    worst_ratio: float  # the worst point's absolute error over its allowance: above 1 fails
    at_z: float | None
    abs_error: float  # at that point
    allowance: float  # at that point, absolute
    tolerance: float  # the comparison's tolerance (absolute below |reference| = 1, relative above)
    points: int

    @property
    def ok(self) -> bool:
        return bool(self.worst_ratio <= 1.0)


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


def _allowed(tolerance: float, ref: np.ndarray) -> np.ndarray:
    """The absolute error allowed against ``ref``: ``tolerance`` below |ref| = 1, relative above."""
    return tolerance * np.maximum(1.0, np.abs(ref))


def _worst(what: str, err: np.ndarray, allowance: np.ndarray, z: np.ndarray, tolerance: float) -> Comparison:
    """The point whose absolute error ``err`` is the largest fraction of its ``allowance``."""
    with np.errstate(all="ignore"):
        ratio = err / allowance
    ratio = np.where(np.isnan(ratio) | np.isnan(err), np.inf, ratio)
    i = int(np.argmax(ratio))
    worst = float(ratio[i])
    at_z = None if worst == 0.0 else float(z[i])
    return Comparison(what, worst, at_z, float(err[i]), float(allowance[i]), tolerance, int(z.size))


def check_kernels(activation: activations.Activation, kernels: Any,
                  evaluate: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]] | None = None) -> list[Comparison]:
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
        fd_err = np.minimum(np.abs(fd - simpson), outside)
        fd_err = np.where(np.isfinite(fd) & np.isfinite(simpson), fd_err, np.inf)
        # a few float32 ulps of each forward value, divided by the step, plus the derivative's own rounding
        rounding = 8.0 * 2.0 ** -24 * (np.abs(ap) + np.abs(am)) / step + 8.0 * 2.0 ** -24 * np.abs(simpson)
        fd_allowed = rounding + _allowed(FD_TOLERANCE, fd)

        a_ref = np.asarray(activation.forward_np(z64), dtype=np.float64)
        d_ref = np.asarray(activation.derivative_np(z64, a_ref), dtype=np.float64)
    return [
        _worst("C derivative vs finite differences of C forward", fd_err, fd_allowed, z, FD_TOLERANCE),
        _worst("C forward vs NumPy forward", np.abs(a - a_ref), _allowed(NUMPY_TOLERANCE, a_ref), z, NUMPY_TOLERANCE),
        _worst("C derivative vs NumPy derivative", np.abs(d - d_ref), _allowed(NUMPY_TOLERANCE, d_ref), z,
               NUMPY_TOLERANCE),
    ]


def check_activation(name: str) -> dict[str, Any]:
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


def describe(comparison: Mapping[str, Any]) -> str:
    """One comparison's worst point in words: "worst 0.31 of the allowance (abs err 2.1e-07 at z = 0.83)"."""
    ratio = comparison["worst_ratio"]
    if comparison["at_z"] is None:
        return "exact at every point"
    amount = f"{ratio:.2g} of the allowance" if ratio <= 1 else f"{ratio:.3g} times the allowance"
    return (f"worst {amount} (abs err {comparison['abs_error']:.2g} at z = {comparison['at_z']:.6g}, "
            f"allowed {comparison['allowance']:.2g})")


def format_report(result: Mapping[str, Any]) -> str:
    """The result of ``check_activation`` as a small table: each comparison's worst point, its error as a
    fraction of what is allowed there (above 1 fails), its absolute error and allowance."""
    comparisons = result["comparisons"]
    lines = [
        f"activation {result['name']!r} ({result['origin']}), kernel {result['module']}, "
        f"{comparisons[0]['points']:,} points in [-1000, 1000]",
        f"  forward    {result['forward_c']}",
        f"  derivative {result['derivative_c']}",
        f"  {'comparison':<48} {'worst/allowed':>13} {'at z':>12} {'abs error':>9} {'allowed':>9}  result",
    ]
    for c in comparisons:
        if c["at_z"] is None:
            where = f"{'0':>13} {'(exact at every point)':>32}"
        else:
            where = f"{c['worst_ratio']:>13.2g} {c['at_z']:>12.6g} {c['abs_error']:>9.2g} {c['allowance']:>9.2g}"
        lines.append(f"  {c['what']:<48} {where}  {'ok' if c['ok'] else 'WRONG'}")
    lines.append(f"  allowed: {FD_TOLERANCE:g} (finite differences, plus their rounding) or {NUMPY_TOLERANCE:g} "
                 f"(NumPy), absolute below |reference| = 1, relative above; worst/allowed above 1 fails")
    return "\n".join(lines)


def failure_message(result: Mapping[str, Any]) -> str:
    """One line: which comparisons fail, and by how much at their worst point."""
    bad = [c for c in result["comparisons"] if not c["ok"]]
    return f"activation {result['name']!r} fails its check: " + "; ".join(f"{c['what']}: {describe(c)}" for c in bad)
