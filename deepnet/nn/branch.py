"""The residual MLP branch of the dense model: a 784-H-10 ReLU MLP on the input, beside the deep core.

With a branch (``--branch mlp --hidden H``, chosen when the model is created) the model's logits are the
deep core's plus the branch's::

    logits = (h_L W_out + b_out) + (relu(x W1 + b1) W2 + b2)

and one training step descends both together: the loss's gradient with respect to the logits
(``dlogits``) flows into the output head and the core as before, and into the branch, whose gradients
are taken at its pre-step weights and applied with the heads' learning rate (scheduled like them).
The branch's arithmetic is the MLP baseline's (``deepnet.nn.mlp.MLP.train_step``: ReLU mask from the
hidden activations, ``dh`` through the old ``w2``), only fed an external ``dlogits``.

Its parameters live in the model file beside the heads::

    /                attrs: branch = "mlp", branch_hidden = H      (absent or "": no branch)
    /branch/mlp/w1   float32 (input_dim, H)     /branch/mlp/b1   float32 (H,)
    /branch/mlp/w2   float32 (H, n_classes)     /branch/mlp/b2   float32 (n_classes,)

contiguous datasets written whole: streamed training overwrites them in place every step (raw data only,
before the step's commit record, like the heads); in memory they travel with the atomic rewrite.
Files written before branches existed have no ``branch`` attribute and are branch-less.

BLAS: the branch's matrix products (batch x 784 x H) run on one BLAS thread. On a small machine a
multi-threaded BLAS call between two core passes leaves its worker threads spinning on the cores the
kernels need (measured here: a 100k-layer step went from 17 ms to 39 ms with a hidden-128 branch, and
back to 17 ms with one BLAS thread), as deepnet.nn.mlp found for the MLP baseline.

Initialisation: as the MLP baseline's (``w1`` He-uniform, ``w2`` Xavier-uniform, zero biases), drawn from
``np.random.default_rng([seed, 2])``, a stream of its own, so a model with a branch has exactly the core
and heads of the same model without one.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from deepnet.errors import ConfigError, ModelFileError
from deepnet.flags import int_at_least

KINDS = ("mlp",)
KEYS = ("w1", "b1", "w2", "b2")
GROUP = "branch/mlp"


_BLAS_CONTROLS: list | None = None


@contextmanager
def one_blas_thread():
    """OpenBLAS limited to one thread inside the block (found once; a no-op without OpenBLAS)."""
    global _BLAS_CONTROLS
    if _BLAS_CONTROLS is None:
        from deepnet.nn.blas import openblas_controls

        _BLAS_CONTROLS = [(setter, old) for setter, old in openblas_controls() if old > 1]
    for setter, _ in _BLAS_CONTROLS:
        setter(1)
    try:
        yield
    finally:
        for setter, old in _BLAS_CONTROLS:
            setter(old)


def check_options(branch: str | None, hidden: int | None) -> tuple[str | None, int | None]:
    """Validate ``--branch`` / ``--hidden``: (None, None) for no branch, else ("mlp", H)."""
    if branch in (None, "", "none"):
        if hidden is not None:
            raise ConfigError("--hidden is the branch's hidden units: give it with --branch mlp")
        return None, None
    if branch not in KINDS:
        raise ConfigError(f"--branch must be {' or '.join(KINDS)} (or omitted), got {branch!r}")
    if hidden is None:
        raise ConfigError("--branch mlp needs --hidden H (the branch's hidden units, e.g. 128)")
    return branch, int_at_least("hidden", hidden, 1)


@dataclass
class BranchStep:
    """One step's branch forward pass, then its gradients (taken before anything is updated)."""

    x: np.ndarray
    hidden: np.ndarray     # relu(x W1 + b1), (batch, H)
    logits: np.ndarray     # (batch, n_classes)
    grads: dict | None = None

    def finite(self) -> bool:
        return self.grads is not None and all(np.isfinite(g).all() for g in self.grads.values())


class MLPBranch:
    """The branch's four parameters (float32, in RAM) and its forward/backward arithmetic."""

    def __init__(self, w1: np.ndarray, b1: np.ndarray, w2: np.ndarray, b2: np.ndarray) -> None:
        self.params = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in zip(KEYS, (w1, b1, w2, b2))}
        p = self.params
        input_dim, hidden = p["w1"].shape
        if p["b1"].shape != (hidden,) or p["w2"].ndim != 2 or p["w2"].shape[0] != hidden \
                or p["b2"].shape != (p["w2"].shape[1],):
            raise ConfigError("branch parameter shapes do not fit: " +
                              ", ".join(f"{k} {v.shape}" for k, v in p.items()))

    kind = "mlp"

    @property
    def hidden(self) -> int:
        return self.params["w1"].shape[1]

    @property
    def input_dim(self) -> int:
        return self.params["w1"].shape[0]

    @property
    def n_classes(self) -> int:
        return self.params["w2"].shape[1]

    @classmethod
    def new(cls, hidden: int, *, input_dim: int, n_classes: int, seed: int) -> "MLPBranch":
        """He-uniform w1, Xavier-uniform w2, zero biases, from default_rng([seed, 2])."""
        rng = np.random.default_rng([seed, 2])
        lim1 = math.sqrt(6.0 / input_dim)
        lim2 = math.sqrt(6.0 / (hidden + n_classes))
        w1 = rng.uniform(-lim1, lim1, size=(input_dim, hidden)).astype(np.float32)
        w2 = rng.uniform(-lim2, lim2, size=(hidden, n_classes)).astype(np.float32)
        return cls(w1, np.zeros(hidden, np.float32), w2, np.zeros(n_classes, np.float32))

    def copy(self) -> "MLPBranch":
        return MLPBranch(*(self.params[k].copy() for k in KEYS))

    # -- arithmetic --------------------------------------------------------------------------------

    def forward(self, x: np.ndarray) -> BranchStep:
        """x (batch, input_dim) float32 -> the branch's logits, keeping what the gradients need."""
        p = self.params
        with one_blas_thread():
            h = x @ p["w1"]
            h += p["b1"]
            np.maximum(h, 0.0, out=h)
            logits = h @ p["w2"]
            logits += p["b2"]
        return BranchStep(x, h, logits)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x).logits

    def gradients(self, step: BranchStep, dlogits: np.ndarray) -> BranchStep:
        """The gradients of the loss with respect to the branch's parameters, at its current weights."""
        p = self.params
        with one_blas_thread():
            dh = dlogits @ p["w2"].T            # the old w2
            dh *= step.hidden > 0
            step.grads = {"w1": step.x.T @ dh, "b1": dh.sum(axis=0),
                          "w2": step.hidden.T @ dlogits, "b2": dlogits.sum(axis=0)}
        return step

    def apply(self, step: BranchStep, lr: float) -> None:
        """SGD: each parameter -= lr * its gradient (in place)."""
        lr32 = np.float32(lr)
        for key in KEYS:
            self.params[key] -= lr32 * step.grads[key]

    # -- the model file ----------------------------------------------------------------------------

    def write_new(self, h5: Any) -> None:
        """Create the branch's datasets and root attributes in an HDF5 file being written whole
        (a new model, or the in-memory checkpoint's replacement file)."""
        h5.attrs["branch"] = self.kind
        h5.attrs["branch_hidden"] = np.int64(self.hidden)
        for key in KEYS:
            name = f"{GROUP}/{key}"
            if name in h5:
                del h5[name]
            h5.create_dataset(name, data=self.params[key])

    def write_in_place(self, model_file: Any) -> None:
        """Overwrite the branch's datasets of an open model file with raw data writes (no HDF5 metadata
        changes): streamed training's per-step write, made before the step's commit record."""
        for key in KEYS:
            model_file._raw_write(f"{GROUP}/{key}", self.params[key])

    @classmethod
    def read(cls, h5: Any, path: str, *, input_dim: int, n_classes: int, group: str = GROUP,
             hidden: int | None = None) -> "MLPBranch":
        """The branch stored under ``group`` of an open h5py file, its shapes checked."""
        if hidden is None:
            hidden = stored_hidden(h5, path)
        shapes = {"w1": (input_dim, hidden), "b1": (hidden,), "w2": (hidden, n_classes), "b2": (n_classes,)}
        arrays = []
        for key in KEYS:
            name = f"{group}/{key}"
            ds = h5.get(name)
            if ds is None or not hasattr(ds, "shape"):
                raise ModelFileError(f"{path} says it has an MLP branch but /{name} is missing")
            if ds.shape != shapes[key] or ds.dtype != np.float32:
                raise ModelFileError(f"{path}: /{name} is {ds.dtype} {ds.shape} but the branch (hidden "
                                     f"{hidden}) needs float32 {shapes[key]}")
            arrays.append(ds[()])
        return cls(*arrays)


def stored_kind(h5: Any) -> str | None:
    """The branch named by an open file's root attributes (None: no branch)."""
    value = h5.attrs.get("branch")
    if value is None:
        return None
    if isinstance(value, (bytes, np.bytes_)):
        value = bytes(value).decode("utf-8", errors="replace")
    value = str(value)
    return value or None


def stored_hidden(h5: Any, path: str) -> int:
    value = h5.attrs.get("branch_hidden")
    if value is None or isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ModelFileError(f"{path} has an MLP branch but its attribute branch_hidden is {value!r}")
    return int(value)


def load(model_file: Any) -> MLPBranch | None:
    """The branch of an open ModelFile, or None if it has none (files from before branches included)."""
    h5 = model_file.h5
    kind = stored_kind(h5)
    if kind is None:
        return None
    if kind not in KINDS:
        raise ModelFileError(f"{model_file.path} has a branch of kind {kind!r}; this deepnet knows {', '.join(KINDS)}")
    return MLPBranch.read(h5, model_file.path, input_dim=model_file.input_dim, n_classes=model_file.n_classes)


def summary(model_file: Any) -> dict:
    """What `deepnet info` shows about the branch."""
    h5 = model_file.h5
    kind = stored_kind(h5)
    if kind is None:
        return {"branch": "none"}
    try:
        return {"branch": f"{kind}, hidden {stored_hidden(h5, model_file.path)}"}
    except ModelFileError as exc:
        return {"branch": f"{kind} ({exc})"}
