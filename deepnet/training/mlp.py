"""Training the MLP baseline on MNIST (``deepnet train-mlp``/``eval-mlp``) through the training loop.

Minibatches are drawn uniformly with replacement from the first ``train_limit`` training images by
``np.random.default_rng([seed, 1])``, whose state is saved, so a continued run draws what an
uninterrupted one would have. ``--schedule`` is a Schedule over the steps of one run
(deepnet.training.schedule.parse_run_schedule): cosine (the default), linear, constant or
``step:T1=LR1[,T2=LR2...]`` (the original's "0.05 then 0.03" over 5000 steps is
``--lr 0.05 --schedule step:2500=0.03``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from deepnet.data.loaders import load_test_set, load_training_set
from deepnet.errors import ConfigError, ModelFileError
from deepnet.flags import int_at_least, positive
from deepnet.formats.locking import WriterLock
from deepnet.formats.mlp_file import append_mlp_evaluation
from deepnet.nn.blas import blas_threads
from deepnet.nn.finite import NonFiniteError
from deepnet.nn.memory import check_mlp_training
from deepnet.nn.mlp import KIND, MLP
from deepnet.training import loop
from deepnet.training.loop import Hook, ProgressBar, StepEvent, mean_rows, minibatch_rng
from deepnet.training.reporting import OnReport, ignore_report
from deepnet.training.schedule import parse_run_schedule


@dataclass(frozen=True)
class MLPRecipe:
    """The defaults of ``train-mlp`` (how they were chosen: bench/README.md, "deepnet/training/mlp.py")."""

    hidden: int = 512
    batch: int = 128
    steps: int = 15_000
    lr: float = 0.2
    schedule: str = "cosine"
    seed: int = 0
    train_limit: int = 60_000
    report_every: int = 500
    samples: int = 10_000  # test images evaluated at the end of train-mlp (0: skip)
    # BLAS threads while training: one, because the matrices are too small for a second thread to pay
    # off reliably on a shared machine (measurements: bench/README.md).
    threads: int = 1


MLP_RECIPE = MLPRecipe()

#: The original experiment's MLP run (its accuracy and ours: bench/README.md). Its "lr 0.05 then 0.03"
#: is read as 0.05 for the first half of the 5000 steps and 0.03 for the second:
#: ``deepnet train-mlp --model orig.h5 --hidden 128 --batch 128 --steps 5000 --lr 0.05 --schedule step:2500=0.03``
ORIGINAL_MLP_RECIPE = replace(MLP_RECIPE, hidden=128, batch=128, steps=5000, lr=0.05, schedule="step:2500=0.03")

R = MLP_RECIPE
#: MNIST's classes: the logits of a new MLP.
N_CLASSES = 10


def train_mlp(
    model: str | os.PathLike = "mlp.h5",
    *,
    hidden: int | None = None,
    steps: int = R.steps,
    batch: int = R.batch,
    lr: float = R.lr,
    schedule: str = R.schedule,
    seed: int = R.seed,
    train_limit: int = R.train_limit,
    report_every: int = R.report_every,
    samples: int = R.samples,
    threads: int = R.threads,
    data_dir: str | os.PathLike | None = None,
    progress: bool = False,
    on_report: OnReport = ignore_report,
) -> dict:
    """Train an MLP model file on MNIST for ``steps`` SGD steps, creating it if it does not exist.

    An existing model continues from its step and minibatch generator (``hidden``, if given, must
    agree; ``seed`` only seeds a new model). The lr schedule runs over this call's steps. The file is
    saved atomically at every report and at the end; ``samples`` test images are evaluated at the end.
    Report rows (event, step, loss, batch_acc, lr, seconds_per_step) go to ``on_report``.
    """
    for name, value, minimum in (("steps", steps, 1), ("batch", batch, 1), ("train-limit", train_limit, 1),
                                 ("report-every", report_every, 1), ("samples", samples, 0), ("seed", seed, 0),
                                 ("threads", threads, 0)):
        int_at_least(name, value, minimum)
    if hidden is not None:
        int_at_least("hidden", hidden, 1)
    positive("lr", lr, float)
    lr_schedule = parse_run_schedule(schedule, steps)

    path = Path(model)
    if path.exists():
        net = MLP.load(path)
        if hidden is not None and hidden != net.hidden:
            raise ConfigError(f"{path} has hidden {net.hidden} but --hidden {hidden} was given")
    else:
        directory = path.absolute().parent
        if not directory.is_dir():
            raise ModelFileError(f"cannot create {path}: directory {directory} does not exist")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise ModelFileError(f"cannot create {path}: directory {directory} is not writable")
        net = None
    test = load_test_set(data_dir, samples) if samples else None  # first: it is small and checks --samples
    x_train, y_train = load_training_set(data_dir, train_limit)
    if net is None:
        new_hidden = R.hidden if hidden is None else hidden
        check_mlp_training(input_dim=x_train.shape[1], hidden=new_hidden, n_classes=N_CLASSES, batch=batch, new=True)
        net = MLP.new(new_hidden, seed=seed, input_dim=x_train.shape[1], n_classes=N_CLASSES)
    else:
        check_mlp_training(input_dim=net.input_dim, hidden=net.hidden, n_classes=net.n_classes, batch=batch, new=False)

    rng = minibatch_rng(net.seed, net.rng_state, lambda exc: (
        f"{path}: attribute rng_state is not a state of numpy's PCG64 generator"))
    first_step = net.step
    base_lr = float(lr)

    def step(x: np.ndarray, y: np.ndarray, t: int) -> tuple[float, float, float, float]:
        lr_now = lr_schedule.lr(base_lr, t)
        return (*net.train_step(x, y, lr_now), lr_now)

    # The one-writer lock of the file, held for the whole run and handed to each saved version.
    with WriterLock(path) as lock:
        log = _MLPLog(net, path, rng, report_every, on_report, lock)
        started = time.perf_counter()
        with ProgressBar(steps, "train-mlp", progress) as bar, blas_threads(threads):
            try:
                loop.run(step, x_train, y_train, rng=rng, batch=batch, steps=steps, hooks=[bar, log])
            except NonFiniteError as exc:
                raise log.after_non_finite(exc) from None
    elapsed = time.perf_counter() - started

    final = {"event": "final", "model": str(path), "kind": KIND, "hidden": net.hidden, "steps": net.step - first_step,
             "step": net.step, "loss": log.last["loss"], "batch_acc": log.last["batch_acc"], "seconds": elapsed,
             "seconds_per_step": elapsed / steps}
    if test is not None:
        result = net.evaluate(*test)
        append_mlp_evaluation(path, net.step, "test", result["samples"], result["loss"], result["accuracy"])
        final.update(test_loss=result["loss"], test_acc=result["accuracy"], test_samples=result["samples"])
    return final


class _MLPLog(Hook):
    """Reports every ``report_every`` steps and after the last, saving the model (atomically) each time."""

    def __init__(self, net: MLP, path: Path, rng: np.random.Generator, report_every: int,
                 on_report: OnReport, lock: WriterLock | None = None) -> None:
        self.net, self.path, self.rng, self.lock = net, path, rng, lock
        self.report_every, self.on_report = report_every, on_report
        self.window: list[tuple[float, float, float]] = []
        self.lr = float("nan")
        self.last = {"loss": float("nan"), "batch_acc": float("nan")}
        #: The step the file holds (None: there is no file yet), and the generator after the last good step.
        self.saved_step: int | None = net.step if path.exists() else None
        self.good_rng = rng.bit_generator.state

    def after_step(self, event: StepEvent) -> None:
        self.good_rng = self.rng.bit_generator.state
        *figures, self.lr = event.result
        self.window.append(tuple(figures))
        if event.done % self.report_every == 0:
            self.report()

    def at_end(self) -> None:
        if self.window:  # steps since the last report point
            self.report()

    def report(self) -> None:
        loss, acc, secs = mean_rows(self.window)
        self.last.update(loss=loss, batch_acc=acc)
        self.window.clear()
        self.on_report({"event": "report", "step": self.net.step, "loss": loss, "batch_acc": acc, "lr": self.lr,
                        "seconds_per_step": secs})
        self.net.rng_state = self.rng.bit_generator.state
        self.net.save(self.path, lock=self.lock)
        self.saved_step = self.net.step

    def after_non_finite(self, exc: NonFiniteError) -> NonFiniteError:
        """A refused step: the steps since the last save are good, so save them (with the generator as
        it was after the last of them, so a continued run draws what an uninterrupted one would)."""
        if self.net.step != (0 if self.saved_step is None else self.saved_step):
            self.net.rng_state = self.good_rng
            self.net.save(self.path, lock=self.lock)
            self.saved_step = self.net.step
            return NonFiniteError(f"{exc}; saved the last good step, {self.net.step}, to {self.path}")
        if self.saved_step is None:
            return NonFiniteError(f"{exc}; nothing was written")
        return NonFiniteError(f"{exc}; nothing was written ({self.path} holds step {self.saved_step})")


def evaluate_mlp(
    model: str | os.PathLike = "mlp.h5",
    *,
    samples: int = 10_000,
    batch: int = 1000,
    data_dir: str | os.PathLike | None = None,
) -> dict:
    """Evaluate an MLP model file on the first ``samples`` MNIST test images: loss, accuracy, time."""
    int_at_least("samples", samples, 1)
    int_at_least("batch", batch, 1)
    net = MLP.load(model)
    x, y = load_test_set(data_dir, samples)
    result = net.evaluate(x, y, batch=batch)
    return {"event": "eval", "model": os.fspath(model), "kind": KIND, "step": net.step, "hidden": net.hidden,
            **result, "samples_per_s": result["samples"] / max(result["seconds"], 1e-12)}
