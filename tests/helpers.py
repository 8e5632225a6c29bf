"""Helpers shared by the test modules: where MNIST is, and small model files whose weights matter."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

#: MNIST for the tests, found only through $DEEPNET_DATA (CI sets it to ../shared/data/mnist). Read once,
#: at import, because tests later point $DEEPNET_DATA elsewhere with monkeypatch.
MNIST_DIR = Path(os.environ.get("DEEPNET_DATA", "") or "<$DEEPNET_DATA is not set>")


def have_mnist() -> bool:
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    return all((MNIST_DIR / n).exists() or (MNIST_DIR / (n + ".gz")).exists() for n in names)


def require_mnist_in_ci() -> None:
    """Under CI (``$CI`` set) a missing MNIST is an error, so the MNIST tests cannot all skip unseen."""
    import pytest

    if os.environ.get("CI") and not have_mnist():
        raise pytest.UsageError(f"CI is set but MNIST is not in $DEEPNET_DATA ({MNIST_DIR}); "
                                f"point DEEPNET_DATA at the four IDX files (.ci/run uses ../shared/data/mnist)")


def make_model(path, *, layers: int, width: int, activation: str, input_dim: int = 784, seed: int = 0,
               core_scale: float = 0.5, bias_scale: float = 0.1, alpha: float | None = None):
    """A model file whose core weights are uniform(-core_scale, core_scale) (biases included) and whose
    head biases are non-zero, so every term of the step is exercised. Returns the path."""
    import deepnet
    from deepnet import ModelFile

    deepnet.init(path, layers=layers, width=width, activation=activation, input_dim=input_dim, seed=seed,
                 alpha=alpha, progress=False)
    rng = np.random.default_rng([seed, 99])
    with ModelFile.open(path, "r+") as f:
        core = rng.uniform(-core_scale, core_scale, size=(layers, width * width + width)).astype(np.float32)
        f.write_core(core, 0)
        heads = f.read_heads()
        heads["input_bias"] = rng.uniform(-bias_scale, bias_scale, width).astype(np.float32)
        heads["output_bias"] = rng.uniform(-bias_scale, bias_scale, heads["output_bias"].shape).astype(np.float32)
        f.write_heads(heads)
    return path


def read_weights(path) -> tuple[dict, np.ndarray]:
    """(heads, core) of a model file, as float32 arrays."""
    from deepnet import ModelFile

    with ModelFile.open(path) as f:
        return f.read_heads(), f.read_core()


def train_tiny(path, steps: int) -> None:
    """`steps` SGD steps of random 4-image batches on the model at `path` (seeded), then save."""
    import deepnet

    with deepnet.DeepNet.open(path, writable=True) as net:
        rng = np.random.default_rng(0)
        for _ in range(steps):
            net.train_step(rng.uniform(0, 1, (4, 784)).astype(np.float32), rng.integers(0, 10, 4),
                           layer_lr=0.1, head_lr=0.1)
        net.save()


def kernel_builds() -> list:
    """The kernel modules this machine can run: the portable build, and AVX2 / AVX-512 where the CPU has them."""
    from deepnet.kernels.loader import runnable_builds

    return runnable_builds()
