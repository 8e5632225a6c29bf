"""The MLP: a 784-hidden-10 ReLU classifier in NumPy, ``relu(x W1 + b1) W2 + b2``, and its SGD step.

One implementation of its arithmetic, ``MLPParams``, serves both uses of the network: ``MLP`` (the
baseline model, trained by deepnet.training.mlp, with its own model file) and ``MLPBranch`` (the
residual branch of a dense model, deepnet.nn.branch, fed the dense model's ``dlogits``). A step is four
float32 matrix products (BLAS), the softmax cross-entropy (deepnet.nn.losses) and a plain SGD update
whose gradients are all taken at the pre-step weights (``dh`` through the old ``w2``).

Initialisation: ``w1`` He-uniform (limit sqrt(6 / input_dim): a ReLU follows), ``w2`` Xavier-uniform
(limit sqrt(6 / (hidden + n_classes)): a linear softmax layer follows), biases zero; the baseline draws
from ``np.random.default_rng([seed, 0])``, the branch from a stream of its own.

Model file: :mod:`deepnet.formats.mlp_file` (kind "mlp", written whole and atomically).
"""


from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from deepnet.errors import ConfigError
from deepnet.flags import int_at_least
from deepnet.formats.data_record import DataRecord
from deepnet.formats.layout import FORMAT_VERSION, LOG_DTYPE, MLP_KEYS
from deepnet.formats.layout import KIND_MLP as KIND
from deepnet.formats.locking import WriterLock
from deepnet.formats.mlp_file import INIT, read_mlp_file, write_mlp_file
from deepnet.formats.values import now
from deepnet.nn.batches import check_batch
from deepnet.nn.finite import NonFiniteError, all_finite, assign, quiet, stepped
from deepnet.nn.losses import softmax_cross_entropy


# ----------------------------------------------------------------------------------------------
# the model


def init_arrays(hidden: int, input_dim: int, n_classes: int,
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(w1, b1, w2, b2) drawn from ``rng``: w1 He-uniform, w2 Xavier-uniform, zero biases."""
    lim1 = math.sqrt(6.0 / input_dim)
    lim2 = math.sqrt(6.0 / (hidden + n_classes))
    w1 = rng.uniform(-lim1, lim1, size=(input_dim, hidden)).astype(np.float32)
    w2 = rng.uniform(-lim2, lim2, size=(hidden, n_classes)).astype(np.float32)
    return w1, np.zeros(hidden, np.float32), w2, np.zeros(n_classes, np.float32)


@dataclass
class MLPPass:
    """One forward pass, keeping what the gradients need."""

    x: np.ndarray          # (batch, input_dim) float32
    hidden: np.ndarray     # relu(x W1 + b1), (batch, H); hidden > 0 is the ReLU's derivative mask
    logits: np.ndarray     # (batch, n_classes)


class MLPParams:
    """The four float32 parameters of the MLP and its arithmetic: forward, gradients, SGD update.

    The parameters are the attributes ``w1, b1, w2, b2``; ``params()`` names them. Updates are in
    place, so views handed out earlier (``params()``) see them.
    """

    #: How error messages name the network.
    WHAT = "MLP"

    def __init__(self, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray) -> None:
        self.w1, self.b1, self.w2, self.b2 = self._checked(w1, b1, w2, b2)

    def _checked(self, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray,
                 b2: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        arrays = tuple(np.ascontiguousarray(a, dtype=np.float32) for a in (w1, b1, w2, b2))
        w1, b1, w2, b2 = arrays
        hidden = w1.shape[1] if w1.ndim == 2 else -1
        if hidden < 0 or b1.shape != (hidden,) or w2.ndim != 2 or w2.shape[0] != hidden \
                or b2.shape != (w2.shape[1],):
            raise ConfigError(f"{self.WHAT} parameter shapes do not fit: " +
                              ", ".join(f"{k} {a.shape}" for k, a in zip(MLP_KEYS, arrays)))
        return w1, b1, w2, b2

    # -- shape ----------------------------------------------------------------------------------

    @property
    def hidden(self) -> int:
        """Hidden units H."""
        return self.w1.shape[1]

    @property
    def input_dim(self) -> int:
        """Inputs per sample."""
        return self.w1.shape[0]

    @property
    def n_classes(self) -> int:
        """Classes (logits per sample)."""
        return self.w2.shape[1]

    def params(self) -> dict[str, np.ndarray]:
        """The parameters by name (the arrays themselves, not copies)."""
        return {"w1": self.w1, "b1": self.b1, "w2": self.w2, "b2": self.b2}

    def set_params(self, params: dict[str, np.ndarray]) -> None:
        """Compute with these arrays from now on (shapes checked; float32 C-contiguous arrays are used as
        they are, not copied)."""
        self.w1, self.b1, self.w2, self.b2 = self._checked(*(params[k] for k in MLP_KEYS))

    # -- arithmetic -----------------------------------------------------------------------------

    def forward(self, x: np.ndarray) -> MLPPass:
        """x (batch, input_dim) float32 -> the logits, keeping what the gradients need."""
        h = x @ self.w1
        h += self.b1
        np.maximum(h, 0.0, out=h)                       # ReLU in place
        logits = h @ self.w2
        logits += self.b2
        return MLPPass(x, h, logits)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Forward only: the logits (batch, n_classes) of x."""
        return self.forward(x).logits

    def gradients(self, fwd: MLPPass, dlogits: np.ndarray) -> dict[str, np.ndarray]:
        """dLoss/d(each parameter) at the current weights, from dLoss/dlogits of the pass ``fwd``."""
        dh = dlogits @ self.w2.T                         # the old w2: taken before any update
        dh *= fwd.hidden > 0
        return {"w1": fwd.x.T @ dh, "b1": dh.sum(axis=0),
                "w2": fwd.hidden.T @ dlogits, "b2": dlogits.sum(axis=0)}

    def stepped(self, grads: dict[str, np.ndarray], lr: float) -> dict[str, np.ndarray]:
        """The parameters after SGD (each - lr * its gradient, in float32), as new arrays: the caller
        checks them and assigns them (``assign``)."""
        lr32 = np.float32(lr)
        return {key: stepped(param, lr32 * grads[key]) for key, param in self.params().items()}

    def assign(self, values: dict[str, np.ndarray]) -> None:
        """Copy new values (``stepped``) into the parameters, in place."""
        assign(self.params(), values)


class MLP(MLPParams):
    """The MLP baseline model: parameters in RAM, training state, and its log.

    ``MLP.new(hidden, seed)`` initialises one; ``MLP.load(path)`` reads and validates a file;
    ``save(path)`` writes it atomically. ``train_step`` is one SGD step, ``evaluate`` the forward pass.
    """

    def __init__(self, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray, *, step: int = 0,
                 seed: int = 0, rng_state: dict | None = None, log: np.ndarray | None = None,
                 created: str | None = None, data: DataRecord | None = None) -> None:
        super().__init__(w1, b1, w2, b2)
        self.data = DataRecord() if data is None else data
        self.step = int(step)
        self.seed = int(seed)
        self.rng_state = rng_state
        self.created = created or now()
        self._log = [np.asarray(log, dtype=LOG_DTYPE)] if log is not None and len(log) else []
        self._pending: list[tuple[int, float, float, float]] = []

    @classmethod
    def new(cls, hidden: int, *, seed: int = 0, input_dim: int = 784, n_classes: int = 10) -> "MLP":
        """Freshly initialised (module docstring) from ``np.random.default_rng([seed, 0])``."""
        for name, value, minimum in (("hidden", hidden, 1), ("input-dim", input_dim, 1),
                                     ("n-classes", n_classes, 2), ("seed", seed, 0)):
            int_at_least(name, value, minimum)
        return cls(*init_arrays(hidden, input_dim, n_classes, np.random.default_rng([seed, 0])), seed=seed)

    # -- training -------------------------------------------------------------------------------

    def train_step(self, x: np.ndarray, y: np.ndarray, lr: float) -> tuple[float, float, float]:
        """One SGD step on the batch; returns (loss, batch accuracy, seconds), measured before the update.

        The step is appended to the in-RAM log (written by ``save``). Raises NonFiniteError, changing
        nothing, if the loss or an updated weight is not finite (deepnet.nn.finite).
        """
        x, y = check_batch(x, y, input_dim=self.input_dim, n_classes=self.n_classes)
        started = time.perf_counter()
        step = self.step + 1
        with quiet():
            fwd = self.forward(x)
            # The baseline has always averaged its loss in float64 (the dense model in float32).
            loss, acc, dlogits = softmax_cross_entropy(fwd.logits, y, loss_dtype=np.float64)
            if not math.isfinite(loss):
                raise NonFiniteError(f"step {step} refused: the loss is {loss}")
            new = self.stepped(self.gradients(fwd, dlogits), lr)
        bad = [key for key, value in new.items() if not all_finite([value])]
        if bad:
            raise NonFiniteError(f"step {step} refused: the updated MLP weights {', '.join(bad)} are not finite")
        self.assign(new)
        self.step = step
        seconds = time.perf_counter() - started
        self._pending.append((self.step, loss, acc, seconds))
        return loss, acc, seconds

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Forward only: the logits (batch, n_classes) of x, checked first."""
        x, _ = check_batch(x, None, input_dim=self.input_dim, n_classes=self.n_classes)
        return self.forward(x).logits

    def evaluate(self, x: np.ndarray, y: np.ndarray, *, batch: int = 1000) -> dict:
        """Mean loss and accuracy over (x, y): {"loss", "accuracy", "samples", "seconds"}."""
        x, y = check_batch(x, y, input_dim=self.input_dim, n_classes=self.n_classes)
        started = time.perf_counter()
        total_loss, correct = 0.0, 0
        for lo in range(0, x.shape[0], batch):
            logits = self.logits(x[lo:lo + batch])
            yy = y[lo:lo + batch]
            loss, _, _ = softmax_cross_entropy(logits, yy, loss_dtype=np.float64)
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
            rows = np.empty(len(self._pending), dtype=LOG_DTYPE)
            for name, col in zip(rows.dtype.names, zip(*self._pending)):
                rows[name] = col
            parts.append(rows)
        return np.concatenate(parts) if parts else np.empty(0, dtype=LOG_DTYPE)

    # -- files ----------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike, *, lock: WriterLock | None = None) -> None:
        """Write the model to ``path`` atomically (temporary file beside it, fsync, rename); a run that
        saves repeatedly passes the :class:`WriterLock` it holds on ``path``."""
        log = self.read_log()
        write_mlp_file(path, self.params(), step=self.step, seed=self.seed, rng_state=self.rng_state, log=log,
                       created=self.created, lock=lock, data=self.data)
        self._log = [log] if len(log) else []
        self._pending = []

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MLP":
        """Read and validate an MLP model file; any problem is a one-line ModelFileError."""
        c = read_mlp_file(path)
        p = c.params
        return cls(p["w1"], p["b1"], p["w2"], p["b2"], step=c.step, seed=c.seed, rng_state=c.rng_state, log=c.log,
                   created=c.created, data=c.data)

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
