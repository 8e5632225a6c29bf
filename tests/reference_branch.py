"""An independent float64 reference of one exact SGD step of the dense model WITH the residual MLP branch.

In the style of tests/reference.py (and built on its core forward/backward, which the finite-difference
tests check): written from the branch's definition, not from deepnet's code::

    logits = (h_L W_out + b_out) + (relu(x W1 + b1) W2 + b2)

one loss, one dlogits; the core and heads are stepped as in reference.train_step, the branch by SGD at
head_lr with its gradients taken at its pre-step weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reference import Model64, core_backward, core_forward, softmax_xent

BRANCH_KEYS = ("w1", "b1", "w2", "b2")


def branch_logits(branch: dict, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    w1, b1, w2, b2 = (np.asarray(branch[k], dtype=np.float64) for k in BRANCH_KEYS)
    return np.maximum(x @ w1 + b1, 0.0) @ w2 + b2


def logits(m: Model64, branch: dict, x: np.ndarray) -> np.ndarray:
    return m.logits(x) + branch_logits(branch, x)


def loss(m: Model64, branch: dict, x: np.ndarray, y: np.ndarray) -> float:
    return softmax_xent(logits(m, branch, x), y)[0]


@dataclass
class BranchStep64:
    model: Model64
    branch: dict
    loss: float
    accuracy: float
    branch_grads: dict


def train_step(m: Model64, branch: dict, x: np.ndarray, y: np.ndarray, layer_lr: float,
               head_lr: float) -> BranchStep64:
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    w1, b1, w2, b2 = (np.asarray(branch[k], dtype=np.float64) for k in BRANCH_KEYS)
    # forward: both paths from the same x, logits summed
    h0 = np.tanh(x @ m.input_weight + m.input_bias)
    hL, trace = core_forward(h0, m.core, m.alpha, m.activation)
    pre = x @ w1 + b1
    hid = np.maximum(pre, 0.0)
    z = hL @ m.output_weight + m.output_bias + hid @ w2 + b2
    loss_value, dlogits = softmax_xent(z, y)
    accuracy = float(np.mean(np.argmax(z, axis=1) == y))
    # core and heads, exactly as without the branch
    grad_out_w = hL.T @ dlogits
    grad_out_b = dlogits.sum(axis=0)
    g0, core, _ = core_backward(dlogits @ m.output_weight.T, m.core, trace, m.alpha, m.activation, layer_lr)
    dpre = g0 * (1.0 - h0 ** 2)
    new = Model64(m.input_weight - head_lr * (x.T @ dpre), m.input_bias - head_lr * dpre.sum(axis=0), core,
                  m.output_weight - head_lr * grad_out_w, m.output_bias - head_lr * grad_out_b, m.alpha, m.activation)
    # the branch, from the same dlogits, at its old weights
    dhid = (dlogits @ w2.T) * (pre > 0)
    grads = {"w1": x.T @ dhid, "b1": dhid.sum(axis=0), "w2": hid.T @ dlogits, "b2": dlogits.sum(axis=0)}
    params = {"w1": w1, "b1": b1, "w2": w2, "b2": b2}
    new_branch = {k: params[k] - head_lr * grads[k] for k in BRANCH_KEYS}
    return BranchStep64(new, new_branch, loss_value, accuracy, grads)
