"""Teachers: fixed random networks whose outputs on Gaussian inputs are the data a student learns
(the teacher-student setting of LuckMatters, for deep residual cores).

A teacher is a deepnet model file (dense; any depth, width and activation, relu by default) with the root
attribute ``teacher`` (JSON: data_std, init_scale, seed). Its weights, drawn from ``default_rng([seed, 5])``:

    core      W_i, b_i ~ N(0, init_scale^2 / w)      (the scale of a He-like init at init_scale sqrt(2))
    input     W_in ~ N(0, 1 / (data_std^2 input_dim)), b_in = 0   (x W_in has std 1 for inputs of std data_std)
    output    W_out ~ N(0, 1 / w), b_out = 0

The student's inputs are x ~ N(0, data_std^2) per coordinate, float32, drawn by the student's own
minibatch generator (committed with every step, so a run is reproducible and resumes where it stopped);
its targets are the teacher's outputs (``--loss mse``) or their argmax as class labels (``--loss xent``).
The test set is ``samples`` inputs from ``default_rng([seed, 6])``, labelled the same way.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import h5py
import numpy as np

from deepnet import activations
from deepnet.data.dataset import Dataset
from deepnet.errors import ConfigError, ModelFileError
from deepnet.flags import int_at_least, positive
from deepnet.formats.create import create_file
from deepnet.formats.data_record import DataRecord
from deepnet.formats.hdf5 import ModelFile
from deepnet.nn.network import DeepNet

TEACHER_ATTR = "teacher"
#: The training samples a teacher's data counts as (for the settings a run stores; samples are fresh).
NOMINAL_TRAIN = 60_000
DEFAULT_TEST_SAMPLES = 10_000
_LABEL_BATCH = 1024


def teacher_weights(*, layers: int, width: int, input_dim: int, outputs: int, data_std: float, init_scale: float,
                    seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """A teacher's core rows (layers, w*w + w) and heads, as the module docstring defines them."""
    rng = np.random.default_rng([seed, 5])
    std = init_scale / math.sqrt(width)
    core = rng.normal(0.0, std, size=(layers, width * width + width)).astype(np.float32)
    heads = {"input_weight": rng.normal(0.0, 1.0 / (data_std * math.sqrt(input_dim)),
                                        size=(input_dim, width)).astype(np.float32),
             "input_bias": np.zeros(width, np.float32),
             "output_weight": rng.normal(0.0, 1.0 / math.sqrt(width), size=(width, outputs)).astype(np.float32),
             "output_bias": np.zeros(outputs, np.float32)}
    return core, heads


def make_teacher(path: str | os.PathLike, *, layers: int, width: int, activation: str, input_dim: int, outputs: int,
                 data_std: float, init_scale: float, alpha: float | None, seed: int, overwrite: bool) -> dict:
    """Write a teacher model file at ``path``; returns its description."""
    positive("layers", layers)
    positive("width", width)
    positive("input-dim", input_dim)
    int_at_least("outputs", outputs, 2)
    positive("data-std", data_std, float)
    positive("init-scale", init_scale, float)
    int_at_least("seed", seed, 0)
    if layers * (width * width + width) * 4 > 8 << 30:
        raise ConfigError(f"a teacher of {layers:,} layers of width {width} would need more than 8 GiB in RAM")
    core, heads = teacher_weights(layers=layers, width=width, input_dim=input_dim, outputs=outputs,
                                  data_std=data_std, init_scale=init_scale, seed=seed)
    info = {"data_std": float(data_std), "init_scale": float(init_scale), "seed": int(seed)}

    def extra(f: h5py.File) -> None:
        f.attrs[TEACHER_ATTR] = json.dumps(info, sort_keys=True)

    activations.get(activation)
    create_file(path, layers=layers, width=width, activation=activation, alpha=alpha, seed=seed, input_dim=input_dim,
                n_classes=outputs, overwrite=overwrite, progress=False, core_weights=core, heads=heads, extra=extra)
    with ModelFile.open(path, "r") as model_file:
        alpha = model_file.alpha
    return {"teacher": os.fspath(path), "layers": layers, "width": width, "activation": activation,
            "input_dim": input_dim, "outputs": outputs, "alpha": alpha, **info}


def read_teacher_info(model_file: ModelFile) -> dict | None:
    """The ``teacher`` attribute of an open model file (None: the file is not a teacher)."""
    raw = model_file.h5.attrs.get(TEACHER_ATTR)
    if raw is None:
        return None
    try:
        info = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
        return {"data_std": float(info["data_std"]), "init_scale": float(info["init_scale"]),
                "seed": int(info["seed"])}
    except (ValueError, TypeError, KeyError) as exc:
        raise ModelFileError(f"{model_file.path}: its {TEACHER_ATTR!r} attribute is unreadable ({exc})") from None


class TeacherDataset(Dataset):
    """Gaussian inputs and a teacher's outputs (or their argmax), fresh for every minibatch."""

    generative = True

    def __init__(self, record: DataRecord) -> None:
        self.record = record
        self.path = Path(record.source.partition(":")[2])
        self.name = f"teacher:{self.path}"
        self.net = DeepNet.open(self.path, in_memory=True)
        try:
            info = read_teacher_info(self.net.file)
            if info is None:
                raise ConfigError(f"{self.path} is a model but not a teacher (make one with `deepnet teacher`)")
        except BaseException:
            self.net.close()
            raise
        self.data_std, self.seed = info["data_std"], info["seed"]
        self.input_dim, self.n_classes = self.net.input_dim, self.net.file.n_classes
        self.n_train = NOMINAL_TRAIN

    def inputs(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` Gaussian inputs of std data_std, float32."""
        return rng.standard_normal((n, self.input_dim), dtype=np.float32) * np.float32(self.data_std)

    def outputs(self, x: np.ndarray) -> np.ndarray:
        """The teacher's outputs (n, outputs) float32 of inputs x."""
        return np.concatenate([self.net.logits(x[lo:lo + _LABEL_BATCH])
                               for lo in range(0, x.shape[0], _LABEL_BATCH)]).astype(np.float32, copy=False)

    def targets(self, x: np.ndarray) -> np.ndarray:
        """What a student is trained to give on x: the outputs (mse) or their argmax (xent)."""
        out = self.outputs(x)
        return out if self.record.loss == "mse" else np.argmax(out, axis=1)

    def draw(self, rng: np.random.Generator, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """A fresh minibatch from the run's generator."""
        x = self.inputs(rng, batch)
        return x, self.targets(x)

    def minibatches(self, limit: int) -> "TeacherDataset":
        return self

    def test(self, samples: int | None, flag: str = "test-samples") -> tuple[np.ndarray, np.ndarray]:
        n = DEFAULT_TEST_SAMPLES if samples is None else samples
        positive(flag, n)
        x = self.inputs(np.random.default_rng([self.seed, 6]), n)
        return x, self.targets(x)

    def close(self) -> None:
        self.net.close()
