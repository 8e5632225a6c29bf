"""A deep residual classifier: input head (NumPy) -> core (compiled kernels) -> output head (NumPy).

``DeepNet`` holds an open model file, the heads in RAM and a ``CoreEngine`` over the core weights
(streamed from the file, or in RAM with ``in_memory``). ``train_step`` is one exact SGD step on given
arrays; ``evaluate`` runs the forward pass only. Nothing here knows about MNIST.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepnet.core import CoreEngine, InMemoryStore, file_store
from deepnet.errors import ConfigError
from deepnet.formats.hdf5 import ModelFile
from deepnet.kernels import kernels_for

DEFAULT_CHUNK_LAYERS = 100_000
DEFAULT_EVAL_BATCH = 1024


@dataclass(frozen=True)
class StepResult:
    """Figures of one training step, measured before the update (the loss the step descended)."""

    step: int
    loss: float
    batch_acc: float
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    samples: int
    seconds: float


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Mean loss, accuracy, and dLoss/dlogits of the batch-mean softmax cross-entropy."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    sum_exp = exp.sum(axis=1, keepdims=True)
    n = logits.shape[0]
    rows = np.arange(n)
    loss = float(np.mean(np.log(sum_exp[:, 0]) - shifted[rows, labels]))
    accuracy = float(np.mean(np.argmax(logits, axis=1) == labels))
    dlogits = exp / sum_exp
    dlogits[rows, labels] -= 1.0
    dlogits /= n
    return loss, accuracy, dlogits.astype(np.float32, copy=False)


class DeepNet:
    """An open model. Use as a context manager, or call ``close()``; ``save()`` writes it back."""

    def __init__(self, model_file: ModelFile, *, in_memory: bool = False,
                 chunk_layers: int = DEFAULT_CHUNK_LAYERS) -> None:
        if chunk_layers < 1:
            raise ConfigError(f"--chunk-layers must be >= 1, got {chunk_layers}")
        self.file = model_file
        self.in_memory = in_memory
        self.kernels = kernels_for(model_file.activation)
        self.heads = model_file.read_heads()
        store = InMemoryStore(model_file.read_core()) if in_memory else file_store(model_file)
        self.engine = CoreEngine(store, self.kernels, model_file.width, model_file.alpha, chunk_layers)
        self.step = model_file.step

    @classmethod
    def open(cls, path: str | Path, *, writable: bool = False, in_memory: bool = False,
             chunk_layers: int = DEFAULT_CHUNK_LAYERS, expect: dict | None = None) -> "DeepNet":
        """Open a model file for training (``writable``) or evaluation."""
        model_file = ModelFile.open(path, "r+" if writable else "r", expect=expect)
        try:
            return cls(model_file, in_memory=in_memory, chunk_layers=chunk_layers)
        except BaseException:
            model_file.close()
            raise

    # -- the model's pieces -------------------------------------------------------------------------

    @property
    def width(self) -> int:
        return self.file.width

    @property
    def layers(self) -> int:
        return self.file.layers

    @property
    def input_dim(self) -> int:
        return self.file.input_dim

    def _check_inputs(self, x: np.ndarray, y: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.input_dim or x.shape[0] < 1:
            raise ConfigError(f"x must have shape (batch >= 1, {self.input_dim}), got {x.shape}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if y is not None:
            y = np.asarray(y)
            if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
                raise ConfigError(f"y must be {x.shape[0]} integer labels, got shape {y.shape} dtype {y.dtype}")
            if y.min() < 0 or y.max() >= self.file.n_classes:
                raise ConfigError(f"labels must be in 0..{self.file.n_classes - 1}")
            y = y.astype(np.intp)
        return x, y

    def _input_head(self, x: np.ndarray) -> np.ndarray:
        return np.tanh(x @ self.heads["input_weight"] + self.heads["input_bias"])

    def _output_head(self, h_last: np.ndarray) -> np.ndarray:
        return h_last @ self.heads["output_weight"] + self.heads["output_bias"]

    # -- training and evaluation --------------------------------------------------------------------

    def train_step(self, x: np.ndarray, y: np.ndarray, *, layer_lr: float, head_lr: float) -> StepResult:
        """One exact SGD step on the batch (x: (batch, input_dim) float32, y: integer labels)."""
        x, y = self._check_inputs(x, y)
        started = time.perf_counter()
        h0 = self._input_head(x)                                   # (batch, w)
        state = np.ascontiguousarray(h0.T)                         # (w, batch): batch innermost
        self.engine.forward(state)
        h_last = state.T
        logits = self._output_head(h_last)
        loss, accuracy, dlogits = softmax_cross_entropy(logits, y)

        heads = self.heads
        grad_out_w = h_last.T @ dlogits
        grad_out_b = dlogits.sum(axis=0)
        g = np.ascontiguousarray((dlogits @ heads["output_weight"].T).T)   # old output weights
        heads["output_weight"] -= head_lr * grad_out_w
        heads["output_bias"] -= head_lr * grad_out_b

        self.engine.backward(g, layer_lr, self.step + 1)
        grad_pre = g.T * (1.0 - h0 * h0)                           # through tanh of the input head
        heads["input_weight"] -= head_lr * (x.T @ grad_pre)
        heads["input_bias"] -= head_lr * grad_pre.sum(axis=0)
        self.step += 1
        return StepResult(self.step, loss, accuracy, time.perf_counter() - started)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Forward only: logits (batch, n_classes) of x."""
        x, _ = self._check_inputs(x, None)
        state = np.ascontiguousarray(self._input_head(x).T)
        self.engine.forward(state, for_backward=False)
        return self._output_head(state.T)

    def evaluate(self, x: np.ndarray, y: np.ndarray, *, batch: int = DEFAULT_EVAL_BATCH,
                 progress=None) -> EvalResult:
        """Mean loss and accuracy over (x, y), in batches of ``batch``; ``progress`` is called with each batch size."""
        x, y = self._check_inputs(x, y)
        if batch < 1:
            raise ConfigError(f"--batch must be >= 1, got {batch}")
        started = time.perf_counter()
        total_loss, correct = 0.0, 0.0
        for lo in range(0, x.shape[0], batch):
            logits = self.logits(x[lo:lo + batch])
            loss, accuracy, _ = softmax_cross_entropy(logits, y[lo:lo + batch])
            n = logits.shape[0]
            total_loss += loss * n
            correct += accuracy * n
            if progress is not None:
                progress(n)
        n = x.shape[0]
        return EvalResult(total_loss / n, correct / n, n, time.perf_counter() - started)

    # -- persistence --------------------------------------------------------------------------------

    def save(self) -> None:
        """Write heads, step and (in memory) the core back to the file, then flush."""
        if self.in_memory:
            self.file.write_core(self.engine.store.weights, self.step)
        self.file.write_heads(self.heads)
        self.file.step = self.step
        self.file.flush()

    def close(self) -> None:
        self.engine.close()
        self.file.close()

    def __enter__(self) -> "DeepNet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
