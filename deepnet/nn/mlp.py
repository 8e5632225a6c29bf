"""A 784-hidden-10 ReLU MLP classifier in NumPy: parameters, forward/backward, SGD step, its HDF5 file.

Model file: :mod:`deepnet.formats.mlp_file` (kind "mlp", written whole and atomically).

Initialisation: ``w1`` He-uniform (limit sqrt(6 / input_dim): a ReLU follows), ``w2`` Xavier-uniform
(limit sqrt(6 / (hidden + n_classes)): a linear softmax layer follows), biases zero; drawn from
``np.random.default_rng([seed, 0])``. Minibatches are drawn uniformly with replacement from the first
"""


from __future__ import annotations

import ctypes
import datetime as _dt
import math
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from deepnet.errors import ConfigError
from deepnet.flags import int_at_least, positive
from deepnet.formats.layout import FORMAT_VERSION, LOG_DTYPE
from deepnet.formats.layout import KIND_MLP as KIND
from deepnet.formats.mlp_file import INIT, read_mlp_file, write_mlp_file

# Re-exported for cli.py, training/mlp.py and tools/plot.py until they import them from deepnet.formats
# (mlp_file.model_kind / require_kind / not_a_model, values.decode).
from deepnet.formats.mlp_file import model_kind, not_a_model, require_kind  # noqa: F401
from deepnet.formats.values import decode as _decode  # noqa: F401

_not_a_model = not_a_model
_PARAMS = ("w1", "b1", "w2", "b2")


# ----------------------------------------------------------------------------------------------
# the model


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _log_dtype() -> np.dtype:
    return LOG_DTYPE


def _softmax_xent(logits: np.ndarray, labels: np.ndarray) -> tuple[float, float, np.ndarray]:
    """Mean loss, accuracy and dLoss/dlogits (float32) of the batch-mean softmax cross-entropy."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    sum_exp = exp.sum(axis=1, keepdims=True)
    rows = np.arange(logits.shape[0])
    loss = float(np.mean(np.log(sum_exp[:, 0]) - shifted[rows, labels], dtype=np.float64))
    accuracy = float(np.mean(np.argmax(logits, axis=1) == labels))
    exp /= sum_exp
    exp[rows, labels] -= 1.0
    exp /= np.float32(logits.shape[0])
    return loss, accuracy, exp


class MLP:
    """A 784-hidden-10 ReLU classifier: parameters in RAM, training state, and its log.

    ``MLP.new(hidden, seed)`` initialises one; ``MLP.load(path)`` reads and validates a file;
    ``save(path)`` writes it atomically. ``train_step`` is one SGD step, ``evaluate`` the forward pass.
    """

    def __init__(self, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray, *, step: int = 0,
                 seed: int = 0, rng_state: dict | None = None, log: np.ndarray | None = None,
                 created: str | None = None) -> None:
        self.w1 = np.ascontiguousarray(w1, dtype=np.float32)
        self.b1 = np.ascontiguousarray(b1, dtype=np.float32)
        self.w2 = np.ascontiguousarray(w2, dtype=np.float32)
        self.b2 = np.ascontiguousarray(b2, dtype=np.float32)
        input_dim, hidden = self.w1.shape
        if self.b1.shape != (hidden,) or self.w2.ndim != 2 or self.w2.shape[0] != hidden \
                or self.b2.shape != (self.w2.shape[1],):
            raise ConfigError(f"MLP parameter shapes do not fit: w1 {self.w1.shape}, b1 {self.b1.shape}, "
                              f"w2 {self.w2.shape}, b2 {self.b2.shape}")
        self.step = int(step)
        self.seed = int(seed)
        self.rng_state = rng_state
        self.created = created or _now()
        self._log = [np.asarray(log, dtype=_log_dtype())] if log is not None and len(log) else []
        self._pending: list[tuple[int, float, float, float]] = []

    @classmethod
    def new(cls, hidden: int, *, seed: int = 0, input_dim: int = 784, n_classes: int = 10) -> "MLP":
        """Freshly initialised: w1 He-uniform, w2 Xavier-uniform, zero biases (module docstring)."""
        for name, value, minimum in (("hidden", hidden, 1), ("input-dim", input_dim, 1),
                                     ("n-classes", n_classes, 2), ("seed", seed, 0)):
            int_at_least(name, value, minimum)
        rng = np.random.default_rng([seed, 0])
        lim1 = math.sqrt(6.0 / input_dim)
        lim2 = math.sqrt(6.0 / (hidden + n_classes))
        w1 = rng.uniform(-lim1, lim1, size=(input_dim, hidden)).astype(np.float32)
        w2 = rng.uniform(-lim2, lim2, size=(hidden, n_classes)).astype(np.float32)
        return cls(w1, np.zeros(hidden, np.float32), w2, np.zeros(n_classes, np.float32), seed=seed)

    # -- shape ----------------------------------------------------------------------------------

    @property
    def hidden(self) -> int:
        return self.w1.shape[1]

    @property
    def input_dim(self) -> int:
        return self.w1.shape[0]

    @property
    def n_classes(self) -> int:
        return self.w2.shape[1]

    def params(self) -> dict[str, np.ndarray]:
        return {"w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2}

    # -- training -------------------------------------------------------------------------------

    def _check(self, x: np.ndarray, y: np.ndarray | None):
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.input_dim or x.shape[0] < 1:
            raise ConfigError(f"x must have shape (batch >= 1, {self.input_dim}), got {x.shape}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if y is not None:
            y = np.asarray(y)
            if y.shape != (x.shape[0],) or not np.issubdtype(y.dtype, np.integer):
                raise ConfigError(f"y must be {x.shape[0]} integer labels, got shape {y.shape} dtype {y.dtype}")
            if y.min() < 0 or y.max() >= self.n_classes:
                raise ConfigError(f"labels must be in 0..{self.n_classes - 1}")
            y = y.astype(np.intp, copy=False)
        return x, y

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> tuple[float, float, float]:
        """One SGD step on the batch; returns (loss, batch accuracy, seconds), measured before the update.

        The step is appended to the in-RAM log (written by ``save``).
        """
        x, y = self._check(x, y)
        started = time.perf_counter()
        lr32 = np.float32(lr)
        h = x @ self.w1
        h += self.b1
        np.maximum(h, 0.0, out=h)                       # ReLU in place; h > 0 is its derivative mask
        logits = h @ self.w2
        logits += self.b2
        loss, acc, dlogits = _softmax_xent(logits, y)

        dh = dlogits @ self.w2.T                         # uses w2 before its update
        dh *= h > 0
        grad_w2 = h.T @ dlogits
        grad_w2 *= lr32
        self.w2 -= grad_w2
        self.b2 -= lr32 * dlogits.sum(axis=0)
        grad_w1 = x.T @ dh
        grad_w1 *= lr32
        self.w1 -= grad_w1
        self.b1 -= lr32 * dh.sum(axis=0)

        self.step += 1
        seconds = time.perf_counter() - started
        self._pending.append((self.step, loss, acc, seconds))
        return loss, acc, seconds

    def logits(self, x: np.ndarray) -> np.ndarray:
        x, _ = self._check(x, None)
        h = x @ self.w1
        h += self.b1
        np.maximum(h, 0.0, out=h)
        out = h @ self.w2
        out += self.b2
        return out

    def evaluate(self, x: np.ndarray, y: np.ndarray, *, batch: int = 1000) -> dict:
        """Mean loss and accuracy over (x, y): {"loss", "accuracy", "samples", "seconds"}."""
        x, y = self._check(x, y)
        started = time.perf_counter()
        total_loss, correct = 0.0, 0
        for lo in range(0, x.shape[0], batch):
            logits = self.logits(x[lo:lo + batch])
            yy = y[lo:lo + batch]
            loss, _, _ = _softmax_xent(logits, yy)
            total_loss += loss * logits.shape[0]
            correct += int(np.sum(np.argmax(logits, axis=1) == yy))
        n = x.shape[0]
        return {"loss": total_loss / n, "accuracy": correct / n, "samples": n,
                "seconds": time.perf_counter() - started}

    # -- the log --------------------------------------------------------------------------------

    def read_log(self) -> np.ndarray:
        """The whole training log (structured: step, loss, batch_acc, seconds), pending steps included."""
        parts = list(self._log)
        if self._pending:
            rows = np.empty(len(self._pending), dtype=_log_dtype())
            for name, col in zip(rows.dtype.names, zip(*self._pending)):
                rows[name] = col
            parts.append(rows)
        return np.concatenate(parts) if parts else np.empty(0, dtype=_log_dtype())

    # -- files ----------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> None:
        """Write the model to ``path`` atomically (temporary file beside it, fsync, rename)."""
        log = self.read_log()
        write_mlp_file(path, self.params(), step=self.step, seed=self.seed, rng_state=self.rng_state, log=log,
                       created=self.created)
        self._log = [log] if len(log) else []
        self._pending = []

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MLP":
        """Read and validate an MLP model file; any problem is a one-line ModelFileError."""
        c = read_mlp_file(path)
        p = c.params
        return cls(p["w1"], p["b1"], p["w2"], p["b2"], step=c.step, seed=c.seed, rng_state=c.rng_state, log=c.log,
                   created=c.created)

    def summary(self, path: str | os.PathLike | None = None) -> dict[str, Any]:
        """What `deepnet info` shows for an MLP file."""
        log = self.read_log()
        last = None
        if len(log):
            row = log[-1]
            last = {"step": int(row["step"]), "loss": float(row["loss"]), "batch_acc": float(row["batch_acc"]),
                    "seconds": float(row["seconds"])}
        out: dict[str, Any] = {}
        if path is not None:
            out["path"] = os.fspath(path)
        out.update({"kind": KIND, "format_version": FORMAT_VERSION, "hidden": self.hidden,
                    "input_dim": self.input_dim, "n_classes": self.n_classes,
                    "parameters": sum(p.size for p in self.params().values()), "step": self.step,
                    "seed": self.seed, "init": INIT})
        if path is not None:
            out["file_size_bytes"] = os.path.getsize(path)
        out.update({"created": self.created, "log_rows": int(len(log)), "last_log": last})
        return out
