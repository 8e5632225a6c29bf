"""The dense model's heads (NumPy): into the core's width and out of it to the logits, and their SGD step::

    h_0    = tanh(x W_in + b_in)          the input head, (batch, input_dim) -> (batch, w)
    logits = h_L W_out + b_out            the output head, (batch, w) -> (batch, n_classes)

The heads are a dict of four float32 arrays named as in deepnet.formats.layout.HEAD_KEYS (what
ModelFile.read_heads returns and commit writes). Their gradients are taken at the pre-step weights; the
new values are computed beside them (``stepped_output``, ``stepped_input``), checked by the step, and
assigned only after the core's backward pass has succeeded, so a refused step leaves them as they were.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deepnet.nn.finite import NonFiniteError, stepped


@dataclass(frozen=True)
class OutputGradients:
    """The output head's gradients and the gradient it hands the core."""

    weight: np.ndarray     # dLoss/dW_out (w, n_classes)
    bias: np.ndarray       # dLoss/db_out (n_classes,)
    core: np.ndarray       # dLoss/dh_L as the core takes it: (w, batch), C-contiguous

    def finite(self) -> bool:
        """Whether all three are finite."""
        return bool(np.isfinite(self.core).all() and np.isfinite(self.weight).all() and np.isfinite(self.bias).all())


def input_head(heads: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """h_0 (batch, w) of the inputs x (batch, input_dim)."""
    return np.tanh(x @ heads["input_weight"] + heads["input_bias"])


def output_head(heads: dict[str, np.ndarray], h_last: np.ndarray) -> np.ndarray:
    """The logits (batch, n_classes) of the core's last state h_L (batch, w)."""
    return h_last @ heads["output_weight"] + heads["output_bias"]


def output_gradients(heads: dict[str, np.ndarray], h_last: np.ndarray, dlogits: np.ndarray) -> OutputGradients:
    """The output head's gradients from dLoss/dlogits, at its current (pre-step) weights."""
    return OutputGradients(h_last.T @ dlogits, dlogits.sum(axis=0),
                           np.ascontiguousarray((dlogits @ heads["output_weight"].T).T))


def stepped_output(heads: dict[str, np.ndarray], out: OutputGradients, lr: float) -> dict[str, np.ndarray]:
    """The output head after its SGD step, as new arrays (``heads`` is not changed)."""
    return {"output_weight": stepped(heads["output_weight"], lr * out.weight),
            "output_bias": stepped(heads["output_bias"], lr * out.bias)}


def stepped_input(heads: dict[str, np.ndarray], x: np.ndarray, h0: np.ndarray, g0: np.ndarray,
                  lr: float) -> dict[str, np.ndarray]:
    """The input head after its SGD step from ``g0``, the gradient the core's backward pass returned at
    h_0 (w, batch), as new arrays (``heads`` is not changed)."""
    grad_pre = g0.T * (1.0 - h0 * h0)                  # through tanh of the input head
    return {"input_weight": stepped(heads["input_weight"], lr * (x.T @ grad_pre)),
            "input_bias": stepped(heads["input_bias"], lr * grad_pre.sum(axis=0))}


def assign_stepped(heads: dict[str, np.ndarray], new: dict[str, np.ndarray], where: str = "") -> None:
    """Copy stepped head arrays into ``heads`` in place, once all of them are checked finite (else a
    NonFiniteError naming the first that is not, ``where`` added, and nothing changed)."""
    for key, value in new.items():
        if not np.isfinite(value).all():
            raise NonFiniteError(f"the updated {key.replace('_', ' ')}{where} is not finite")
    for key, value in new.items():
        heads[key][...] = value
