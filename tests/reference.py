"""An independent float64 NumPy reference of deepnet's model and of one exact SGD step.

Written from DESIGN.md ("The model"), not from deepnet's code: nothing here calls deepnet's heads,
loss or kernels. Only the activation's NumPy forward/derivative come from the registry (and the tests
check those against finite differences too). Everything is computed in float64 from whatever the
caller passes, so a float32 model can be compared with it at float32 tolerance.

Layouts follow the model file: a core row is ``[W (in, out) row-major | b]``; heads are
``input_weight (input_dim, w)``, ``input_bias (w,)``, ``output_weight (w, n_classes)``, ``output_bias``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from deepnet import activations


def _act(name):
    a = activations.get(name)
    return a.forward_np, a.derivative_np


def split_row(row: np.ndarray, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A core row -> (W (w, w) float64, b (w,) float64)."""
    row = np.asarray(row, dtype=np.float64)
    return row[: w * w].reshape(w, w), row[w * w:]


def core_forward(h: np.ndarray, core: np.ndarray, alpha: float, activation: str) -> tuple[np.ndarray, list]:
    """h (batch, w) through every core row; returns h_L and the list of (h_i, z_i) of each layer."""
    act, _ = _act(activation)
    h = np.asarray(h, dtype=np.float64)
    w = h.shape[1]
    trace = []
    for row in np.asarray(core, dtype=np.float64):
        W, b = split_row(row, w)
        z = h @ W + b
        trace.append((h, z))
        h = h + alpha * act(z)
    return h, trace


def core_backward(g: np.ndarray, core: np.ndarray, trace: list, alpha: float, activation: str,
                  lr: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Back-propagate g = dLoss/dh_L layer by layer in reverse, SGD-updating each layer after its
    gradient has flowed on with the OLD weights.

    Returns (g at h_0, the updated core (float64), the per-layer gradient (L, w*w + w) float64).
    """
    act, dact = _act(activation)
    g = np.array(g, dtype=np.float64)
    w = g.shape[1]
    core = np.array(core, dtype=np.float64)
    grads = np.zeros_like(core)
    for i in range(core.shape[0] - 1, -1, -1):
        h, z = trace[i]
        W, b = split_row(core[i], w)
        dz = g * alpha * dact(z, act(z))                 # (batch, w)
        grad_W = h.T @ dz                                 # summed over the batch
        grad_b = dz.sum(axis=0)
        g = g + dz @ W.T                                  # the layer's OLD weights
        grads[i, : w * w] = grad_W.reshape(-1)
        grads[i, w * w:] = grad_b
        core[i] -= lr * grads[i]                          # only now update the layer
    return g, core, grads


def softmax_xent(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean softmax cross-entropy over the batch and its gradient w.r.t. the logits."""
    logits = np.asarray(logits, dtype=np.float64)
    n = logits.shape[0]
    m = logits.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(logits - m).sum(axis=1))
    loss = float(np.mean(lse - logits[np.arange(n), labels]))
    p = np.exp(logits - lse[:, None])
    p[np.arange(n), labels] -= 1.0
    return loss, p / n


def mse(outputs: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean squared error over every element (batch x outputs) and its gradient w.r.t. the outputs."""
    outputs = np.asarray(outputs, dtype=np.float64)
    diff = outputs - np.asarray(targets, dtype=np.float64)
    return float(np.mean(diff ** 2)), 2.0 * diff / diff.size


@dataclass
class Model64:
    """The parameters of one model, float64."""

    input_weight: np.ndarray
    input_bias: np.ndarray
    core: np.ndarray
    output_weight: np.ndarray
    output_bias: np.ndarray
    alpha: float
    activation: str

    @classmethod
    def from_arrays(cls, heads: dict, core: np.ndarray, alpha: float, activation: str) -> "Model64":
        f = lambda a: np.array(a, dtype=np.float64)  # noqa: E731
        return cls(f(heads["input_weight"]), f(heads["input_bias"]), f(core), f(heads["output_weight"]),
                   f(heads["output_bias"]), float(alpha), activation)

    @property
    def width(self) -> int:
        return self.input_weight.shape[1]

    def heads(self) -> dict:
        return {"input_weight": self.input_weight, "input_bias": self.input_bias,
                "output_weight": self.output_weight, "output_bias": self.output_bias}

    def logits(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        h0 = np.tanh(x @ self.input_weight + self.input_bias)
        hL, _ = core_forward(h0, self.core, self.alpha, self.activation)
        return hL @ self.output_weight + self.output_bias

    def loss(self, x: np.ndarray, y: np.ndarray) -> float:
        return softmax_xent(self.logits(x), y)[0]


@dataclass
class StepResult64:
    model: Model64            # the parameters after the step
    loss: float               # the loss before the update
    accuracy: float
    grads: dict               # gradient of every parameter at the pre-step weights


def train_step(m: Model64, x: np.ndarray, y: np.ndarray, layer_lr: float, head_lr: float) -> StepResult64:
    """One exact SGD step, following DESIGN.md: forward through all layers, then backward layer by
    layer in reverse with in-place updates; the heads' gradients use the pre-step weights."""
    y = np.asarray(y)

    def xent(logits: np.ndarray) -> tuple[float, np.ndarray, float]:
        loss, dlogits = softmax_xent(logits, y)
        return loss, dlogits, float(np.mean(np.argmax(logits, axis=1) == y))

    return _step(m, x, xent, layer_lr, head_lr)


def train_step_mse(m: Model64, x: np.ndarray, targets: np.ndarray, layer_lr: float,
                   head_lr: float) -> StepResult64:
    """``train_step`` with the mean squared error on target vectors instead of the cross-entropy; the
    accuracy is the fraction of rows whose argmax is the targets'."""
    targets = np.asarray(targets, dtype=np.float64)

    def squared(outputs: np.ndarray) -> tuple[float, np.ndarray, float]:
        loss, dout = mse(outputs, targets)
        return loss, dout, float(np.mean(np.argmax(outputs, axis=1) == np.argmax(targets, axis=1)))

    return _step(m, x, squared, layer_lr, head_lr)


def _step(m: Model64, x: np.ndarray, loss_of: Callable, layer_lr: float, head_lr: float) -> StepResult64:
    """The step of a loss ``loss_of(outputs) -> (loss, dLoss/doutputs, accuracy)``."""
    x = np.asarray(x, dtype=np.float64)
    h0 = np.tanh(x @ m.input_weight + m.input_bias)
    hL, trace = core_forward(h0, m.core, m.alpha, m.activation)
    loss, dout, accuracy = loss_of(hL @ m.output_weight + m.output_bias)

    grad_out_w = hL.T @ dout
    grad_out_b = dout.sum(axis=0)
    g = dout @ m.output_weight.T                          # pre-step output weights
    g0, core, core_grads = core_backward(g, m.core, trace, m.alpha, m.activation, layer_lr)
    dpre = g0 * (1.0 - h0 ** 2)
    grad_in_w = x.T @ dpre
    grad_in_b = dpre.sum(axis=0)

    new = Model64(m.input_weight - head_lr * grad_in_w, m.input_bias - head_lr * grad_in_b, core,
                  m.output_weight - head_lr * grad_out_w, m.output_bias - head_lr * grad_out_b,
                  m.alpha, m.activation)
    grads = {"input_weight": grad_in_w, "input_bias": grad_in_b, "core": core_grads,
             "output_weight": grad_out_w, "output_bias": grad_out_b}
    return StepResult64(new, loss, accuracy, grads)


PARAMETERS = ("input_weight", "input_bias", "core", "output_weight", "output_bias")


def finite_difference_grads(m: Model64, loss: Callable[[], float], eps: float = 1e-6) -> dict[str, np.ndarray]:
    """Central finite differences of ``loss()`` with respect to every parameter of ``m`` (each entry moved
    in place and restored)."""
    grads = {}
    for key in PARAMETERS:
        param = getattr(m, key)
        fd = np.zeros_like(param)
        for idx in np.ndindex(param.shape):
            old = param[idx]
            param[idx] = old + eps
            up = loss()
            param[idx] = old - eps
            down = loss()
            param[idx] = old
            fd[idx] = (up - down) / (2 * eps)
        assert np.max(np.abs(fd)) > 1e-4, f"{key}: gradient is ~0, a check against it would be vacuous"
        grads[key] = fd
    return grads


def assert_step_is_the_gradient(m: Model64, res: StepResult64, loss: Callable[[], float], layer_lr: float,
                                head_lr: float) -> None:
    """``res`` (a step of ``m``) took the true gradient of ``loss()`` with the right learning rates."""
    for key, fd in finite_difference_grads(m, loss).items():
        np.testing.assert_allclose(res.grads[key], fd, rtol=1e-5, atol=1e-7 * np.max(np.abs(fd)), err_msg=key)
        lr = layer_lr if key == "core" else head_lr
        np.testing.assert_allclose(getattr(res.model, key), getattr(m, key) - lr * fd, rtol=0, atol=1e-8,
                                   err_msg=key)


# -- the kernels' view: (width, batch) states, one chunk of rows -------------------------------------


def kernel_forward(params: np.ndarray, h_wb: np.ndarray, alpha: float, activation: str,
                   save_every: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """What ``deepnet._kernels.forward`` should compute: h (width, batch) -> (h_out (w, B), saves)."""
    h_out, trace = core_forward(np.asarray(h_wb, dtype=np.float64).T, params, alpha, activation)
    saves = None
    if save_every:
        saves = np.stack([trace[k][0].T.reshape(-1) for k in range(0, len(trace), save_every)])
    return h_out.T, saves


def kernel_backward(params: np.ndarray, h_in_wb: np.ndarray, g_wb: np.ndarray, alpha: float,
                    activation: str, lr: float) -> tuple[np.ndarray, np.ndarray]:
    """What ``deepnet._kernels.backward`` should compute from the chunk's input state h_in and the
    gradient g at its output: (g at the chunk's input (w, B), updated params)."""
    _, trace = core_forward(np.asarray(h_in_wb, dtype=np.float64).T, params, alpha, activation)
    g_in, core, _ = core_backward(np.asarray(g_wb, dtype=np.float64).T, params, trace, alpha, activation, lr)
    return g_in.T, core


# -- comparisons -----------------------------------------------------------------------------------

#: float32 has a 2**-24 ~ 6e-8 unit roundoff; a few dozen layers of float32 arithmetic (each a sum of
#: w products plus the residual add) accumulate relative errors of a few 1e-7 to 1e-6. 1e-5 of the
#: magnitude leaves room without hiding a real mistake (a wrong term changes results at the 1e-2 level).
RTOL = 1e-5


def assert_close(actual, expected, *, rtol: float = RTOL, scale: float | None = None, what: str = "") -> None:
    """|actual - expected| <= rtol * scale elementwise, with scale = max|expected| unless given.

    Relative to the magnitude of the whole array, not per element: float32 arithmetic makes absolute
    errors proportional to the size of the numbers it combines, so an element that is a small
    difference of large terms carries the large terms' error.
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values"
    if scale is None:
        scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    tol = rtol * max(scale, 1e-30)
    err = np.abs(actual - expected)
    worst = float(err.max()) if err.size else 0.0
    assert worst <= tol, (
        f"{what}: max |diff| {worst:.3g} > {tol:.3g} (rtol {rtol:g} x scale {scale:.3g}) at index "
        f"{np.unravel_index(int(err.argmax()), err.shape)}"
    )


def assert_update_close(after, before, expected_after, *, rtol: float = 1e-4, what: str = "") -> None:
    """The update (after - before) matches the reference update to ``rtol`` of its largest element.

    This is the sharper check: the weights themselves can agree to 1e-5 while the (much smaller) update
    is wrong, so the update is compared on its own scale. ``after``/``before`` are float32, so the update
    itself is known only to float32 roundoff of the weights: the tolerance includes that too.
    """
    before = np.asarray(before, dtype=np.float64)
    upd = np.asarray(after, dtype=np.float64) - before
    ref = np.asarray(expected_after, dtype=np.float64) - before
    scale = float(np.max(np.abs(ref)))
    assert scale > 0, f"{what}: the reference update is zero, the check would be vacuous"
    roundoff = 4 * np.finfo(np.float32).eps * float(np.max(np.abs(before)))
    err = float(np.max(np.abs(upd - ref)))
    assert err <= rtol * scale + roundoff, (
        f"{what}: update differs by {err:.3g} > {rtol:g} x {scale:.3g} + roundoff {roundoff:.3g}"
    )
