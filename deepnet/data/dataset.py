"""What every data source gives a model, whatever it is: a :class:`Dataset` (inputs as the model sees them,
labels or targets, a test split) and the minibatches a run draws from it (deepnet.data.sources opens
them)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from deepnet.errors import ConfigError
from deepnet.formats.data_record import DataRecord


def check_count(flag: str, value: int, available: int) -> None:
    """Refuse a count of samples outside 1..available, naming ``--flag``."""
    if not 1 <= value <= available:
        raise ConfigError(f"--{flag} must be in 1..{available}, got {value}")


@dataclass
class ArrayMinibatches:
    """Minibatches drawn uniformly with replacement from arrays of inputs and labels."""

    x: np.ndarray
    y: np.ndarray

    def draw(self, rng: np.random.Generator, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """The next minibatch: ``batch`` indices from ``rng``, then those rows."""
        idx = rng.integers(0, self.x.shape[0], size=batch)
        return self.x[idx], self.y[idx]


class Dataset:
    """A data source opened for a model: its inputs as the model sees them, its labels or targets.

    ``n_train`` is the number of training samples (a teacher's: RECIPE-sized nominal count, see
    deepnet.data.teacher); ``generative`` sources draw fresh samples and have no fixed training set."""

    record: DataRecord
    name: str
    input_dim: int
    n_classes: int
    n_train: int
    generative: bool = False

    def train_slice(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """Training samples start..stop-1 as inputs (float32 (n, input_dim)) and labels."""
        self.require_fixed("a slice of training samples")
        raise NotImplementedError

    def require_fixed(self, what: str) -> None:
        """Refuse ``what``, which needs a fixed training set, if this source draws fresh samples."""
        if self.generative:
            raise ConfigError(f"{what} needs a fixed training set; {self.name} draws fresh samples every step")

    def minibatches(self, limit: int) -> ArrayMinibatches:
        """What a run draws its minibatches from: the first ``limit`` training samples."""
        return ArrayMinibatches(*self.train_slice(0, limit))

    def test(self, samples: int | None, flag: str = "test-samples") -> tuple[np.ndarray, np.ndarray] | None:
        """The first ``samples`` test samples (None: all of them; None back if the source has none and
        none were asked for); a count out of range is refused naming ``--flag``."""
        raise NotImplementedError

    def required_test(self, samples: int | None, purpose: str,
                      flag: str = "test-samples") -> tuple[np.ndarray, np.ndarray]:
        """``test``'s split, refused in one line naming ``purpose`` ("to evaluate on") if there is none."""
        test = self.test(samples, flag)
        if test is None:
            raise ConfigError(f"{self.name} has no test split {purpose}")
        return test

    def close(self) -> None:
        """Release what the source holds open (a teacher's network)."""

    def fits(self, path: object, input_dim: int, n_classes: int) -> None:
        """Refuse to feed this data to the model at ``path`` if it takes other inputs or classes."""
        if input_dim != self.input_dim:
            raise ConfigError(f"{path} takes {input_dim} inputs but {self.name} gives {self.input_dim}")
        if n_classes != self.n_classes:
            raise ConfigError(f"{path} has {n_classes} outputs but {self.name} has {self.n_classes} "
                              f"{'outputs' if self.record.loss == 'mse' else 'classes'}")


Split = tuple[np.ndarray, np.ndarray]


class ArrayDataset(Dataset):
    """A source held as arrays: samples in a stored form (pixels, coarse bytes or floats) and labels;
    ``to_inputs`` makes the model's float32 inputs of any slice of them. Either split may be given as a
    function that loads it, called when the split is first needed (an evaluation never reads the
    training images); ``input_dim`` is told from whichever split is loaded already."""

    def __init__(self, record: DataRecord, name: str, train: Split | Callable[[], Split],
                 test: Split | Callable[[], Split | None] | None, to_inputs: Callable[[np.ndarray], np.ndarray],
                 n_classes: int) -> None:
        self.record, self.name = record, name
        self._train, self._test = train, test
        self.to_inputs = to_inputs
        self.n_classes = n_classes

    def _train_split(self) -> Split:
        if callable(self._train):
            self._train = self._train()
        return self._train

    def _test_split(self) -> Split | None:
        if callable(self._test):
            self._test = self._test()
        return self._test

    @property
    def n_train(self) -> int:
        return int(self._train_split()[0].shape[0])

    @property
    def input_dim(self) -> int:
        loaded = self._train if not callable(self._train) else self._test_split() or self._train_split()
        return int(self.to_inputs(loaded[0][:1]).shape[1])

    def train_slice(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        stored, labels = self._train_split()
        return self.to_inputs(stored[start:stop]), labels[start:stop]

    def test(self, samples: int | None, flag: str = "test-samples") -> tuple[np.ndarray, np.ndarray] | None:
        split = self._test_split()
        if split is None:
            if samples is None:
                return None
            raise ConfigError(f"{self.name} has no test split (x_test, y_test): use --{flag} 0")
        stored, labels = split
        n = int(stored.shape[0]) if samples is None else samples
        check_count(flag, n, int(stored.shape[0]))
        return self.to_inputs(stored[:n]), labels[:n]


def pixels(images: np.ndarray) -> np.ndarray:
    """Images (n, ...) uint8 -> (n, pixels) float32 in [0, 1] (x = pixels / 255)."""
    return images.reshape(images.shape[0], -1).astype(np.float32) / np.float32(255.0)
