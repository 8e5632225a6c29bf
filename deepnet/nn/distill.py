"""The distilled input model of a Mach section: a prediction of the state the sections below it hand up,
made from the raw input alone, and its regression step::

    s(x) = tanh(x V + c) + relu(x W1 + b1) W2 + b2        (batch, input_dim) -> (batch, w)

Why this form: the sections below a section start as the input head followed by a near-identity core
(each layer adds alpha * act(h W + b) with alpha = 1/sqrt(L) and tiny weights), so their output starts
as h_0 = tanh(x W_in + b_in) and drifts as the core learns. The tanh part is a copy of the model's input
head when the section is created, so the prediction is right from the first step; the ReLU MLP (the one
MLP implementation, deepnet.nn.mlp.MLPParams) starts at zero output (W2 = 0) and learns what the core
below adds to h_0. A linear map could not follow tanh's saturation, and the MLP alone would start far
from the target.

Loss: half the squared error summed over the w units, averaged over the batch; plain SGD, every
gradient taken at the pre-step weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from deepnet.errors import ConfigError
from deepnet.nn.finite import NonFiniteError, all_finite, assign, stepped
from deepnet.nn.mlp import MLPParams, MLPPass

#: The parameters' names, as the model file stores them (deepnet.formats.mach_state).
KEYS = ("input_weight", "input_bias", "w1", "b1", "w2", "b2")


@dataclass
class DistillPass:
    """One forward pass of the distilled model, keeping what its gradients need."""

    x: np.ndarray          # (batch, input_dim)
    tanh: np.ndarray       # tanh(x V + c), (batch, w)
    mlp: MLPPass           # the ReLU correction's pass (its "logits" are the correction)
    out: np.ndarray        # s(x), (batch, w)


class DistilledInput:
    """The parameters (float32, named as ``KEYS``) and the arithmetic of one section's distilled input."""

    def __init__(self, params: dict[str, np.ndarray]) -> None:
        self.input_weight = np.ascontiguousarray(params["input_weight"], dtype=np.float32)
        self.input_bias = np.ascontiguousarray(params["input_bias"], dtype=np.float32)
        self.mlp = MLPParams(params["w1"], params["b1"], params["w2"], params["b2"])
        self.mlp.WHAT = "distilled input model"
        if self.input_weight.shape != (self.mlp.input_dim, self.mlp.n_classes) or \
                self.input_bias.shape != (self.mlp.n_classes,):
            raise ConfigError(
                f"distilled input model: input_weight {self.input_weight.shape} and input_bias "
                f"{self.input_bias.shape} do not fit its MLP ({self.mlp.input_dim} -> {self.mlp.n_classes})")

    @classmethod
    def new(cls, input_head: dict[str, np.ndarray], hidden: int, rng: np.random.Generator) -> "DistilledInput":
        """A distilled model that predicts h_0 of ``input_head`` exactly (tanh part a copy of it, the MLP's
        W1 He-uniform from ``rng`` and its W2 zero)."""
        input_dim, width = input_head["input_weight"].shape
        limit = np.sqrt(6.0 / input_dim)
        return cls({"input_weight": input_head["input_weight"].copy(), "input_bias": input_head["input_bias"].copy(),
                    "w1": rng.uniform(-limit, limit, size=(input_dim, hidden)).astype(np.float32),
                    "b1": np.zeros(hidden, np.float32), "w2": np.zeros((hidden, width), np.float32),
                    "b2": np.zeros(width, np.float32)})

    @property
    def width(self) -> int:
        return self.input_bias.shape[0]

    @property
    def hidden(self) -> int:
        return self.mlp.hidden

    def params(self) -> dict[str, np.ndarray]:
        """The parameters by name (the arrays themselves)."""
        return {"input_weight": self.input_weight, "input_bias": self.input_bias, **self.mlp.params()}

    def forward(self, x: np.ndarray) -> DistillPass:
        """s(x) for x (batch, input_dim), keeping what the gradients need."""
        t = np.tanh(x @ self.input_weight + self.input_bias)
        mlp = self.mlp.forward(x)
        return DistillPass(x, t, mlp, t + mlp.logits)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """s(x) (batch, w): the synthetic input of a batch."""
        return self.forward(x).out

    def step(self, x: np.ndarray, target: np.ndarray, lr: float) -> float:
        """One SGD step of the regression of s(x) on ``target`` (batch, w); returns the loss before it
        (half the squared error summed over units, mean over the batch). Refuses non-finite new values
        (NonFiniteError) and leaves the parameters as they were then."""
        fwd = self.forward(x)
        diff = fwd.out - target
        batch = x.shape[0]
        loss = 0.5 * float(np.einsum("ij,ij->", diff, diff, dtype=np.float64)) / batch
        d = diff / np.float32(batch)
        grad_pre = d * (1.0 - fwd.tanh * fwd.tanh)
        grads = {"input_weight": x.T @ grad_pre, "input_bias": grad_pre.sum(axis=0),
                 **self.mlp.gradients(fwd.mlp, d)}
        lr32 = np.float32(lr)
        new = {key: stepped(param, lr32 * grads[key]) for key, param in self.params().items()}
        if not np.isfinite(loss) or not all_finite(new.values()):
            raise NonFiniteError("the distilled input model's update is not finite")
        assign(self.params(), new)
        return loss
