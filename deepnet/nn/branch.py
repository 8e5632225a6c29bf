"""The residual MLP branch of the dense model: a 784-H-10 ReLU MLP on the input, beside the deep core.

With a branch (``--branch mlp --hidden H``, chosen when the model is created) the model's logits are the
deep core's plus the branch's::

    logits = (h_L W_out + b_out) + (relu(x W1 + b1) W2 + b2)

and one training step descends both together: the loss's gradient with respect to the logits
(``dlogits``) flows into the output head and the core as before, and into the branch, whose gradients
are taken at its pre-step weights and applied with the heads' learning rate (scheduled like them).
The branch's arithmetic is the MLP baseline's, one implementation (``deepnet.nn.mlp.MLPParams``), only
fed an external ``dlogits``.

Its parameters live in the model file beside the heads: root attributes ``branch = "mlp"`` and
``branch_hidden = H`` (absent or "": no branch), and float32 datasets ``w1`` (input_dim, H), ``b1`` (H,),
``w2`` (H, n_classes), ``b2`` (n_classes,) in the group ``formats.layout.BRANCH_GROUP``:
contiguous datasets written whole: streamed training overwrites them in place every step (raw data only,
before the step's commit record, like the heads); in memory they travel with the atomic rewrite.
Files written before branches existed have no ``branch`` attribute and are branch-less.

BLAS: the branch's matrix products (batch x 784 x H) run on one BLAS thread (deepnet.nn.blas): a
multi-threaded BLAS call between two core passes slows the kernels (bench/README.md, "nn/branch.py").

Initialisation: as the MLP baseline's (``w1`` He-uniform, ``w2`` Xavier-uniform, zero biases), drawn from
``np.random.default_rng([seed, 2])``, a stream of its own, so a model with a branch has exactly the core
and heads of the same model without one.
"""

from __future__ import annotations

import h5py
import numpy as np

from deepnet.errors import ConfigError, ModelFileError
from deepnet.flags import int_at_least
from deepnet.formats.hdf5 import ModelFile
from deepnet.formats.layout import BRANCH_GROUP, BRANCH_HIDDEN_ATTR, BRANCH_KIND_ATTR, mlp_paths
from deepnet.nn.blas import one_blas_thread
from deepnet.nn.mlp import MLPParams, MLPPass, init_arrays

KINDS = ("mlp",)


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


class MLPBranch(MLPParams):
    """The branch's four parameters (float32, in RAM) and the MLP's arithmetic, run on one BLAS thread."""

    WHAT = "branch"
    kind = "mlp"

    @classmethod
    def new(cls, hidden: int, *, input_dim: int, n_classes: int, seed: int) -> "MLPBranch":
        """He-uniform w1, Xavier-uniform w2, zero biases, from default_rng([seed, 2])."""
        return cls(*init_arrays(hidden, input_dim, n_classes, np.random.default_rng([seed, 2])))

    # -- arithmetic --------------------------------------------------------------------------------

    def forward(self, x: np.ndarray) -> MLPPass:
        """As MLPParams.forward, on one BLAS thread."""
        with one_blas_thread():
            return super().forward(x)

    def gradients(self, fwd: MLPPass, dlogits: np.ndarray) -> dict[str, np.ndarray]:
        """As MLPParams.gradients, on one BLAS thread."""
        with one_blas_thread():
            return super().gradients(fwd, dlogits)

    # -- the model file ----------------------------------------------------------------------------

    def write_new(self, h5: h5py.Group) -> None:
        """Create the branch's datasets and root attributes in an HDF5 file being written whole
        (a new model, or the in-memory checkpoint's replacement file)."""
        h5.attrs[BRANCH_KIND_ATTR] = self.kind
        h5.attrs[BRANCH_HIDDEN_ATTR] = np.int64(self.hidden)
        write_datasets(h5, BRANCH_GROUP, self.params())

    def write_in_place(self, model_file: ModelFile) -> None:
        """Overwrite the branch's datasets of an open model file with raw data writes (no HDF5 metadata
        changes): streamed training's per-step write, made before the step's commit record."""
        params = self.params()
        for key, name in mlp_paths(BRANCH_GROUP).items():
            model_file.write_raw(name, params[key])

    @classmethod
    def read(cls, h5: h5py.Group, path: str, *, input_dim: int, n_classes: int, group: str = BRANCH_GROUP,
             hidden: int | None = None) -> "MLPBranch":
        """The branch stored under ``group`` of an open h5py file, its shapes checked."""
        if hidden is None:
            hidden = stored_hidden(h5, path)
        shapes = (input_dim, hidden), (hidden,), (hidden, n_classes), (n_classes,)
        arrays = []
        for name, shape in zip(mlp_paths(group).values(), shapes):
            ds = h5.get(name)
            if ds is None or not hasattr(ds, "shape"):
                raise ModelFileError(f"{path} says it has an MLP branch but /{name} is missing")
            if ds.shape != shape or ds.dtype != np.float32:
                raise ModelFileError(f"{path}: /{name} is {ds.dtype} {ds.shape} but the branch (hidden "
                                     f"{hidden}) needs float32 {shape}")
            arrays.append(ds[()])
        return cls(*arrays)


def write_datasets(h5: h5py.Group, group: str, params: dict[str, np.ndarray]) -> None:
    """MLP parameters as the datasets under ``group`` of a file being written whole (replacing any)."""
    for key, name in mlp_paths(group).items():
        if name in h5:
            del h5[name]
        h5.create_dataset(name, data=params[key])


def stored_kind(h5: h5py.Group) -> str | None:
    """The branch named by an open file's root attributes (None: no branch)."""
    value = h5.attrs.get(BRANCH_KIND_ATTR)
    if value is None:
        return None
    if isinstance(value, (bytes, np.bytes_)):
        value = bytes(value).decode("utf-8", errors="replace")
    value = str(value)
    return value or None


def stored_hidden(h5: h5py.Group, path: str) -> int:
    """The branch's hidden units, from an open file's root attributes (checked)."""
    value = h5.attrs.get(BRANCH_HIDDEN_ATTR)
    if value is None or isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ModelFileError(f"{path} has an MLP branch but its attribute {BRANCH_HIDDEN_ATTR} is {value!r}")
    return int(value)


def load(model_file: ModelFile) -> MLPBranch | None:
    """The branch of an open ModelFile, or None if it has none (files from before branches included)."""
    h5 = model_file.h5
    kind = stored_kind(h5)
    if kind is None:
        return None
    if kind not in KINDS:
        raise ModelFileError(f"{model_file.path} has a branch of kind {kind!r}; this deepnet knows {', '.join(KINDS)}")
    return MLPBranch.read(h5, model_file.path, input_dim=model_file.input_dim, n_classes=model_file.n_classes)


def summary(model_file: ModelFile) -> dict:
    """What `deepnet info` shows about the branch."""
    h5 = model_file.h5
    kind = stored_kind(h5)
    if kind is None:
        return {"branch": "none"}
    try:
        return {"branch": f"{kind}, hidden {stored_hidden(h5, model_file.path)}"}
    except ModelFileError as exc:
        return {"branch": f"{kind} ({exc})"}
