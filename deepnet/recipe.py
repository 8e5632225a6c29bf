"""The MNIST recipe, top to bottom: create or open a model, draw minibatches, step, report, save.

Every hyperparameter default lives in ``RECIPE`` below; the CLI and the API read them from there.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm import tqdm

from deepnet import activations
from deepnet.data import ensure_mnist
from deepnet.errors import ConfigError
from deepnet.formats.hdf5 import ModelFile
from deepnet.formats.idx import load_mnist
from deepnet.model import DEFAULT_CHUNK_LAYERS, DEFAULT_EVAL_BATCH, DeepNet, EvalResult
from deepnet.report import Table, format_rate, format_seconds, print_fields, print_json


@dataclass(frozen=True)
class Recipe:
    """The defaults of a training run (the original experiment's, tuned where noted in the README)."""

    layers: int = 1_000_000
    width: int = 4
    activation: str = "softsign"
    batch: int = 16
    steps: int = 1000
    layer_lr: float = 0.05
    head_lr: float = 0.05
    chunk_layers: int = DEFAULT_CHUNK_LAYERS
    seed: int = 0
    train_limit: int = 60_000
    report_every: int = 100
    eval_samples: int = 1000


RECIPE = Recipe()


def mnist_inputs(images: np.ndarray) -> np.ndarray:
    """Pixels (n, 28, 28) uint8 -> (n, 784) float32 in [0, 1] (x = pixels / 255)."""
    return images.reshape(images.shape[0], -1).astype(np.float32) / np.float32(255.0)


def _positive(name: str, value, kind=int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ConfigError(f"--{name} must be {'an integer' if kind is int else 'a finite number'}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"--{name} must be finite, got {value!r}")
    if value <= 0:
        raise ConfigError(f"--{name} must be > 0, got {value!r}")


def _non_negative_float(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"--{name} must be a finite number >= 0, got {value!r}")


def load_training_set(data_dir: str | Path | None, train_limit: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_mnist(ensure_mnist(data_dir), "train")
    if not 1 <= train_limit <= images.shape[0]:
        raise ConfigError(f"--train-limit must be in 1..{images.shape[0]}, got {train_limit}")
    return mnist_inputs(images[:train_limit]), labels[:train_limit]


def load_test_set(data_dir: str | Path | None, samples: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_mnist(ensure_mnist(data_dir), "test")
    if not 1 <= samples <= images.shape[0]:
        raise ConfigError(f"--samples must be in 1..{images.shape[0]}, got {samples}")
    return mnist_inputs(images[:samples]), labels[:samples]


def _training_rng(model_file: ModelFile) -> np.random.Generator:
    """The minibatch generator: continued from the file's saved state, else seeded from the model's seed."""
    rng = np.random.default_rng([model_file.seed, 1])
    if model_file.rng_state is not None:
        rng.bit_generator.state = model_file.rng_state
    return rng


def train(
    model: str | Path,
    *,
    steps: int = RECIPE.steps,
    layers: int | None = None,
    width: int | None = None,
    activation: str | None = None,
    alpha: float | None = None,
    seed: int = RECIPE.seed,
    batch: int = RECIPE.batch,
    layer_lr: float = RECIPE.layer_lr,
    head_lr: float = RECIPE.head_lr,
    chunk_layers: int = RECIPE.chunk_layers,
    train_limit: int = RECIPE.train_limit,
    report_every: int = RECIPE.report_every,
    eval_samples: int = RECIPE.eval_samples,
    in_memory: bool = False,
    data_dir: str | Path | None = None,
    json: bool = False,
    progress: bool = True,
) -> dict:
    """Train a model file on MNIST for ``steps`` steps, creating it first if it does not exist.

    An existing model continues from its step and its minibatch generator; ``layers``, ``width`` and
    ``activation``, if given, must agree with the file. Returns the final figures as a dict.
    """
    for name, value in (("steps", steps), ("batch", batch), ("chunk-layers", chunk_layers),
                        ("train-limit", train_limit), ("report-every", report_every)):
        _positive(name, value)
    _non_negative_float("layer-lr", layer_lr)
    _non_negative_float("head-lr", head_lr)
    if isinstance(eval_samples, bool) or not isinstance(eval_samples, int) or eval_samples < 0:
        raise ConfigError(f"--eval-samples must be an integer >= 0, got {eval_samples!r}")
    for name, value in (("layers", layers), ("width", width)):
        if value is not None:
            _positive(name, value)
    if alpha is not None:
        _positive("alpha", alpha, float)
    if activation is not None:
        activations.get(activation)
    x_train, y_train = load_training_set(data_dir, train_limit)
    test = load_test_set(data_dir, eval_samples) if eval_samples else None

    path = Path(model)
    if not path.exists():
        init(path, layers=RECIPE.layers if layers is None else layers, width=RECIPE.width if width is None else width,
             activation=RECIPE.activation if activation is None else activation, alpha=alpha, seed=seed, progress=progress and not json)
    expect = {k: v for k, v in (("layers", layers), ("width", width), ("activation", activation)) if v is not None}

    with DeepNet.open(path, writable=True, in_memory=in_memory, chunk_layers=chunk_layers, expect=expect) as net:
        if alpha is not None and not math.isclose(alpha, net.file.alpha, rel_tol=1e-6):
            raise ConfigError(f"{path} has alpha {net.file.alpha:g} but --alpha {alpha:g} was given")
        rng = _training_rng(net.file)
        first_step = net.step
        log = _StepLog(net, report_every, json)
        bar = tqdm(total=steps, desc="train", unit="step", disable=json or not progress, leave=False,
                   dynamic_ncols=True)
        log.write = bar.write if not bar.disable else log.write
        started = time.perf_counter()
        try:
            for _ in range(steps):
                idx = rng.integers(0, train_limit, size=batch)
                result = net.train_step(x_train[idx], y_train[idx], layer_lr=layer_lr, head_lr=head_lr)
                bar.update(1)
                log.add(result, rng)
        finally:
            bar.close()
        log.flush(rng)
        elapsed = time.perf_counter() - started

        final = {
            "event": "final",
            "model": str(path),
            "steps": net.step - first_step,
            "step": net.step,
            "loss": log.last_loss,
            "batch_acc": log.last_acc,
            "seconds": elapsed,
            "seconds_per_step": elapsed / steps,
            "layer_samples_per_s": net.layers * batch * steps / elapsed,
        }
        if test is not None:
            result = net.evaluate(*test)
            final.update(test_loss=result.loss, test_acc=result.accuracy, test_samples=result.samples)
    if json:
        print_json(final)
    else:
        _print_final(final)
    return final


class _StepLog:
    """Collects step figures: prints a report every ``report_every`` steps and appends them to /train/log."""

    def __init__(self, net: DeepNet, report_every: int, json: bool) -> None:
        self.net = net
        self.report_every = report_every
        self.json = json
        self.pending: list = []
        self.window: list = []
        self.write: Callable[[str], None] = print
        self.table = Table([("step", 9), ("loss", 8), ("batch_acc", 9), ("s/step", 8), ("layer-samples/s", 15)],
                           write=lambda line: self.write(line))
        self.last_loss = float("nan")
        self.last_acc = float("nan")

    def add(self, result, rng: np.random.Generator) -> None:
        self.pending.append(result)
        self.window.append(result)
        if len(self.window) >= self.report_every:
            self.report()
            self.flush(rng)

    def report(self) -> None:
        if not self.window:
            return
        n = len(self.window)
        loss = sum(r.loss for r in self.window) / n
        acc = sum(r.batch_acc for r in self.window) / n
        seconds = sum(r.seconds for r in self.window) / n
        rate = self.net.layers * self._batch() / seconds
        step = self.window[-1].step
        self.last_loss, self.last_acc = loss, acc
        if self.json:
            print_json({"event": "report", "step": step, "loss": loss, "batch_acc": acc,
                        "seconds_per_step": seconds, "layer_samples_per_s": rate})
        else:
            self.table.row(step, f"{loss:.4f}", f"{acc:.3f}", f"{seconds:.4f}", format_rate(rate))
        self.window = []

    def _batch(self) -> int:
        return self.net.engine._work_batch

    def flush(self, rng: np.random.Generator) -> None:
        """Append pending figures to the log and save the model's state (heads, step, rng)."""
        if self.window:
            self.report()
        if not self.pending:
            return
        f = self.net.file
        f.append_log([r.step for r in self.pending], [r.loss for r in self.pending],
                     [r.batch_acc for r in self.pending], [r.seconds for r in self.pending])
        self.pending = []
        f.rng_state = rng.bit_generator.state
        self.net.save()


def _print_final(final: dict) -> None:
    fields = {
        "model": final["model"],
        "steps": f"{final['steps']} (now at step {final['step']})",
        "loss": f"{final['loss']:.4f} (mean of the last report window)",
        "batch_acc": f"{final['batch_acc']:.3f}",
        "time": f"{format_seconds(final['seconds'])} ({final['seconds_per_step']:.4f} s/step)",
        "layer-samples/s": format_rate(final["layer_samples_per_s"]),
    }
    if "test_acc" in final:
        fields["test"] = f"loss {final['test_loss']:.4f}, accuracy {final['test_acc']:.4f} on {final['test_samples']} images"
    print_fields(fields)


def init(
    model: str | Path,
    *,
    layers: int = RECIPE.layers,
    width: int = RECIPE.width,
    activation: str = RECIPE.activation,
    alpha: float | None = None,
    seed: int = RECIPE.seed,
    input_dim: int = 784,
    n_classes: int = 10,
    overwrite: bool = False,
    progress: bool = True,
) -> ModelFile:
    """Create a new model file (core weights uniform in [-0.001, 0.001], Xavier heads); returns it closed."""
    _positive("layers", layers)
    _positive("width", width)
    activations.get(activation)
    if alpha is not None:
        _positive("alpha", alpha, float)
    model_file = ModelFile.create(model, layers=layers, width=width, activation=activation, alpha=alpha,
                                  seed=seed, input_dim=input_dim, n_classes=n_classes, overwrite=overwrite,
                                  progress=progress)
    model_file.close()
    return model_file


def evaluate(
    model: str | Path,
    *,
    samples: int = 10_000,
    batch: int = DEFAULT_EVAL_BATCH,
    chunk_layers: int = RECIPE.chunk_layers,
    in_memory: bool = False,
    data_dir: str | Path | None = None,
    json: bool = False,
    progress: bool = True,
) -> dict:
    """Evaluate a model file on the first ``samples`` MNIST test images; returns loss, accuracy, time."""
    _positive("samples", samples)
    _positive("batch", batch)
    _positive("chunk-layers", chunk_layers)
    x, y = load_test_set(data_dir, samples)
    with DeepNet.open(model, in_memory=in_memory, chunk_layers=chunk_layers) as net:
        with tqdm(total=samples, desc="eval", unit="img", disable=json or not progress, delay=2.0,
                  leave=False, dynamic_ncols=True) as bar:
            result: EvalResult = net.evaluate(x, y, batch=batch, progress=bar.update)
        figures = {"event": "eval", "model": str(model), "step": net.step, **asdict(result),
                   "samples_per_s": result.samples / result.seconds}
    if json:
        print_json(figures)
    else:
        print_fields({
            "model": figures["model"],
            "step": figures["step"],
            "loss": f"{result.loss:.4f}",
            "accuracy": f"{result.accuracy:.4f} ({int(round(result.accuracy * result.samples))}/{result.samples})",
            "time": f"{format_seconds(result.seconds)} ({figures['samples_per_s']:.1f} images/s)",
        })
    return figures
