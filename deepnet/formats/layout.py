"""Every name inside a deepnet model file: attribute names, groups and datasets (docs/DESIGN.md, "Files").

The one place an HDF5 path is spelled; every other module asks for it here, so the layout can be read
(and changed) in one screen. No I/O: reading and writing live in the other modules of ``deepnet.formats``.
"""

from __future__ import annotations

import numpy as np

FORMAT = "deepnet"
FORMAT_VERSION = 1

#: The ``kind`` attribute of the root: what the file holds.
KIND_DENSE = "dense"
KIND_MLP = "mlp"

# -- root attributes of a dense model file, by type ----------------------------------------------------
DENSE_INT_ATTRS = ("format_version", "width", "layers", "input_dim", "n_classes", "step", "seed")
DENSE_FLOAT_ATTRS = ("alpha", "init_scale")
DENSE_STR_ATTRS = ("format", "kind", "activation", "rng_state", "created", "updated")
# Optional: the distribution (name, version) of the plugin that provided the activation, recorded when the
# file is created with a plugin's activation (nothing for a built-in, or one registered from Python), so a
# missing plugin can be named. Files without them are valid.
ACTIVATION_PACKAGE_ATTR = "activation_package"
ACTIVATION_PACKAGE_VERSION_ATTR = "activation_package_version"
DENSE_OPTIONAL_STR_ATTRS = (ACTIVATION_PACKAGE_ATTR, ACTIVATION_PACKAGE_VERSION_ATTR)

# -- root attributes of an MLP model file (besides format, format_version, kind, init, updated) ---------
MLP_INT_ATTRS = ("hidden", "input_dim", "n_classes", "step", "seed")
MLP_REQUIRED_ATTRS = (*MLP_INT_ATTRS, "rng_state", "created")

# -- the deep core --------------------------------------------------------------------------------
CORE_WEIGHTS = "core/weights"        # float32 (L, w*w + w), row i = [W_i (in, out) row-major | b_i]
CORE_CHUNK_STEP = "core/chunk_step"  # int64, per storage chunk: the step that last wrote it

# -- the heads (dense model) ------------------------------------------------------------------------
HEAD_KEYS = ("input_weight", "input_bias", "output_weight", "output_bias")
HEAD_PATHS = {
    "input_weight": "head/input/weight",
    "input_bias": "head/input/bias",
    "output_weight": "head/output/weight",
    "output_bias": "head/output/bias",
}

# -- training state ---------------------------------------------------------------------------------
TRAIN_LOG = "train/log"          # per step: step, loss, batch_acc, seconds
TRAIN_COMMIT = "train/commit"    # two checksummed slots of the commit record
TRAIN_HELDOUT = "train/heldout"  # per held-out measurement: step, heldout_loss, heldout_acc
TRAIN_EVALS = "train/evals"      # per evaluation a training run made: step, kind, samples, loss, accuracy

LOG_DTYPE = np.dtype([("step", "<i8"), ("loss", "<f8"), ("batch_acc", "<f8"), ("seconds", "<f8")])
LOG_CHUNK_ROWS = 4096            # rows per HDF5 storage chunk of /train/log
HELDOUT_DTYPE = np.dtype([("step", "<i8"), ("heldout_loss", "<f8"), ("heldout_acc", "<f8")])
#: A row of /train/evals: the step evaluated, what was evaluated (one of EVAL_KINDS, ASCII), on how many
#: images (0: not known, a row converted from /train/heldout), the mean loss and the accuracy.
EVAL_DTYPE = np.dtype([("step", "<i8"), ("kind", "S8"), ("samples", "<i8"), ("loss", "<f8"), ("accuracy", "<f8")])
EVAL_HELDOUT = "heldout"         # the held-out images of --holdout, at --eval-every
EVAL_TEST = "test"               # MNIST's test images, at the end of a run
EVAL_KINDS = (EVAL_HELDOUT, EVAL_TEST)
EVAL_CHUNK_ROWS = 256            # rows per HDF5 storage chunk of /train/evals

# -- the MLP: the parameters of an MLP model file, and of the residual MLP branch of a dense one -----
MLP_KEYS = ("w1", "b1", "w2", "b2")
MLP_GROUP = "mlp"                # an MLP model file's parameters: /mlp/w1 ...
BRANCH_GROUP = "branch/mlp"      # a dense model's residual MLP branch: /branch/mlp/w1 ...
BRANCH_KIND_ATTR = "branch"      # root attributes naming the branch: its kind and hidden width
BRANCH_HIDDEN_ATTR = "branch_hidden"

# -- the exponential moving average of the weights (--ema) ---------------------------------------------
EMA_GROUP = "ema"
EMA_CORE = "ema/core/weights"
EMA_HEAD_PATHS = {key: f"ema/{path}" for key, path in HEAD_PATHS.items()}
EMA_BRANCH_GROUP = "ema/branch/mlp"
EMA_DECAY_ATTR = "ema_decay"   # root attributes of the stored average
EMA_EVERY_ATTR = "ema_every"
EMA_STEP_ATTR = "ema_step"


def mlp_paths(group: str) -> dict[str, str]:
    """The dataset path of each MLP parameter under ``group`` (MLP_GROUP, BRANCH_GROUP, EMA_BRANCH_GROUP)."""
    return {key: f"{group}/{key}" for key in MLP_KEYS}

# -- a sharded model (docs/DESIGN.md, "Sharded models"): a root file and one shard file per rank ----------
#: The root's table of its shards, one row per shard in layer order: the shard file (a path relative to the
#: root's directory), its first layer and layer count, the step it holds, and the CRC-32 of its core bytes.
SHARDS = "shards"
SHARD_DTYPE = np.dtype([("file", "S255"), ("first_layer", "<i8"), ("layers", "<i8"), ("step", "<i8"),
                        ("crc32", "<i8")])
SHARD_SET_ATTR = "shard_set"                    # root and shards: the id tying the shards to their root
SHARD_CHUNK_LAYERS_ATTR = "shard_chunk_layers"  # root: storage chunk layers of its (virtual) core
SHARD_INDEX_ATTR = "shard_index"                # shard: its index, the shard count, its first layer, its
SHARD_COUNT_ATTR = "shard_count"                #   core's CRC-32, the root's file name when it was written
SHARD_FIRST_LAYER_ATTR = "shard_first_layer"
SHARD_CRC_ATTR = "shard_crc32"
SHARD_ROOT_ATTR = "shard_root"
ROOT_SHARD_ATTRS = (SHARD_SET_ATTR, SHARD_CHUNK_LAYERS_ATTR)
SHARD_DIR_SUFFIX = ".shards"                    # big.h5 -> big.shards/


def shard_file_name(index: int, count: int, step: int, shard_set: str) -> str:
    """The name of shard `index` of `count` holding `step`, in the shard directory of the set `shard_set`."""
    return f"r{index}-of-{count}.step{step:09d}.{shard_set}.h5"


#: A shard file's name: index, count, step, set (see shard_file_name).
SHARD_FILE_PATTERN = r"r(?P<index>\d+)-of-(?P<count>\d+)\.step(?P<step>\d+)\.(?P<set>[0-9a-f]+)\.h5"

# -- a Mach model (docs/DESIGN.md, "Mach sections"): a sharded model whose shards train as sections ----------
MACH_GROUP = "mach"                      # attrs: sections, step (of the state), settings (JSON)
MACH_LOG = "mach/log"                    # every section's step figures, appended at each commit
MACH_LOG_DTYPE = np.dtype([("section", "<i4"), ("step", "<i8"), ("loss", "<f4"), ("batch_acc", "<f4"),
                           ("seconds", "<f4"), ("real", "u1")])
MACH_HEAD_KEYS = ("output_weight", "output_bias")  # a section's own head (the last one's is /head/output)
MACH_DISTILL_KEYS = ("input_weight", "input_bias", "w1", "b1", "w2", "b2")


def mach_section_group(index: int) -> str:
    """The group of section `index`: attrs rng_state and counters (JSON); head/, distill/ datasets."""
    return f"{MACH_GROUP}/section{index}"
