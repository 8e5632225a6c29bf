"""Training the MLP baseline on MNIST (``deepnet train-mlp``/``eval-mlp``) through the training loop.

Minibatches are drawn uniformly with replacement from the first ``train_limit`` training images by
``np.random.default_rng([seed, 1])``, whose state is saved, so a continued run draws what an
uninterrupted one would have. ``--schedule`` is a Schedule over the steps of one run
(deepnet.training.schedule.parse_run_schedule): cosine (the default), linear, constant or
``step:T1=LR1[,T2=LR2...]`` (the original's "0.05 then 0.03" over 5000 steps is
``--lr 0.05 --schedule step:2500=0.03``).

The run's length is ``steps`` more steps, or ``until_step`` (train until the model's step is N). With
``steps`` the schedule runs over this call's steps (t = 0 .. steps-1 from its start), as it always has;
with ``until_step`` it runs over the global steps 0 .. N-1 (t is the model's step), so that the same
command run again after an interruption finishes the original plan exactly. Ctrl-C (or SIGTERM)
finishes the current step, saves and stops (deepnet.training.signals).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from deepnet.data.dataset import ArrayMinibatches, check_count
from deepnet.data.sources import new_record, open_dataset, run_record
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
from deepnet.training.signals import Interrupted, StopSignal


@dataclass(frozen=True)
class MLPRecipe:
    """The defaults of ``train-mlp`` (how they were chosen: bench/README.md, "deepnet/training/mlp.py")."""

    hidden: int = 512
    batch: int = 128
    steps: int = 15_000
    lr: float = 0.2
    schedule: str = "cosine"
    seed: int = 0
    train_limit: int | None = None  # None: every training sample
    report_every: int = 500
    test_samples: int | None = None  # test images evaluated at the end of train-mlp (None: all; 0: skip)
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


def train_mlp(
    model: str | os.PathLike = "mlp.h5",
    *,
    hidden: int | None = None,
    steps: int | None = None,
    until_step: int | None = None,
    batch: int = R.batch,
    lr: float = R.lr,
    schedule: str = R.schedule,
    seed: int = R.seed,
    train_limit: int | None = R.train_limit,
    report_every: int = R.report_every,
    test_samples: int | None = R.test_samples,
    threads: int = R.threads,
    data: str | None = None,
    coarsen: int | None = None,
    decode: str | None = None,
    data_dir: str | os.PathLike | None = None,
    progress: bool = False,
    on_report: OnReport = ignore_report,
) -> dict:
    """Train an MLP model file on MNIST for ``steps`` more SGD steps (default R.steps) or until its step
    is ``until_step``, creating it if it does not exist.

    An existing model continues from its step and minibatch generator (``hidden``, if given, must
    agree; ``seed`` only seeds a new model). The lr schedule runs over this call's steps, or with
    ``until_step`` over the global steps up to it. The file is saved atomically at every report and at
    the end; ``test_samples`` test images are evaluated at the end. A new model records ``data``,
    ``coarsen`` and ``decode`` (deepnet.data.sources); an existing one is fed through its own. Report rows (event, step, loss,
    batch_acc, lr, seconds_per_step) go to ``on_report``.
    """
    if steps is not None and until_step is not None:
        raise ConfigError("--steps (more steps) and --until-step (the step to end at) cannot both be given")
    for name, value, minimum in (("steps", steps, 1), ("until-step", until_step, 0), ("batch", batch, 1),
                                 ("train-limit", train_limit, 1), ("report-every", report_every, 1),
                                 ("test-samples", test_samples, 0), ("seed", seed, 0), ("threads", threads, 0)):
        if value is not None:
            int_at_least(name, value, minimum)
    if hidden is not None:
        int_at_least("hidden", hidden, 1)
    positive("lr", lr, float)
    lr_schedule = parse_run_schedule(schedule, (R.steps if steps is None else steps) if until_step is None
                                     else max(until_step, 1))

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
    first_step = 0 if net is None else net.step
    if until_step is not None and until_step < first_step:
        raise ConfigError(f"--until-step {until_step} is before the model's step {first_step}")
    run_steps = until_step - first_step if until_step is not None else R.steps if steps is None else steps
    until = first_step + run_steps
    record = new_record(source=data, coarsen=coarsen, decode=decode, loss=None) if net is None else \
        run_record(net.data, path, source=data, coarsen=coarsen, decode=decode, loss=None)
    dataset = open_dataset(record, data_dir)
    if dataset.generative:
        dataset.close()
        dataset.require_fixed("train-mlp")
    test = dataset.test(test_samples) if test_samples != 0 else None
    limit = dataset.n_train if train_limit is None else train_limit
    check_count("train-limit", limit, dataset.n_train)
    x_train, y_train = dataset.train_slice(0, limit)
    if net is None:
        new_hidden = R.hidden if hidden is None else hidden
        check_mlp_training(input_dim=dataset.input_dim, hidden=new_hidden, n_classes=dataset.n_classes, batch=batch,
                           new=True)
        net = MLP.new(new_hidden, seed=seed, input_dim=dataset.input_dim, n_classes=dataset.n_classes)
        net.data = record
    else:
        dataset.fits(path, net.input_dim, net.n_classes)
        check_mlp_training(input_dim=net.input_dim, hidden=net.hidden, n_classes=net.n_classes, batch=batch, new=False)

    rng = minibatch_rng(net.seed, net.rng_state, lambda exc: (
        f"{path}: attribute rng_state is not a state of numpy's PCG64 generator"))
    base_lr = float(lr)

    def step(x: np.ndarray, y: np.ndarray, t: int) -> tuple[float, float, float, float]:
        lr_now = lr_schedule.lr(base_lr, t if until_step is None else net.step)
        return (*net.train_step(x, y, lr_now), lr_now)

    # The one-writer lock of the file, held for the whole run and handed to each saved version.
    stop = StopSignal()
    with stop, WriterLock(path) as lock:
        log = _MLPLog(net, path, rng, report_every, on_report, lock)
        started = time.perf_counter()
        with ProgressBar(run_steps, "train-mlp", progress) as bar, blas_threads(threads):
            stop.arm()
            try:
                done = loop.run(step, ArrayMinibatches(x_train, y_train), rng=rng, batch=batch, steps=run_steps,
                                hooks=[bar, log], stop_requested=lambda: stop.count > 0)
                if log.saved_step is None:  # no step taken (--until-step 0): the new model is still saved
                    log.save()
            except NonFiniteError as exc:
                stop.done = True
                raise log.after_non_finite(exc) from None
            except KeyboardInterrupt:
                stop.done = True
                held = "nothing was written" if log.saved_step is None else f"{path} holds step {log.saved_step}"
                raise Interrupted(f"abandoned step {net.step + 1}; {held}", stop.signum, held_step=log.saved_step,
                                  until_step=until) from None
            stop.disarm(f"stopped after step {net.step}, which {path} holds; the final evaluation was skipped",
                        held_step=log.saved_step, until_step=until)
        if done < run_steps:
            raise Interrupted(f"stopped after step {net.step} of {until}; {path} holds step {log.saved_step}",
                              stop.signum, held_step=log.saved_step, until_step=until)
        elapsed = time.perf_counter() - started

        final = {"event": "final", "model": str(path), "kind": KIND, "hidden": net.hidden,
                 "steps": net.step - first_step, "step": net.step, "loss": log.last["loss"],
                 "batch_acc": log.last["batch_acc"], "seconds": elapsed,
                 "seconds_per_step": elapsed / done if done else float("nan")}
    if test is not None:  # after the run's lock is released: the record takes it again
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
        self.save()

    def save(self) -> None:
        """Save the model (atomically), with the generator as it is now."""
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
    samples: int | None = None,
    batch: int = 1000,
    data: str | None = None,
    data_dir: str | os.PathLike | None = None,
) -> dict:
    """Evaluate an MLP model file on the first ``samples`` test samples (None: all) of the data it
    records (or ``data``), through its own input transform: loss, accuracy, time."""
    if samples is not None:
        int_at_least("test-samples", samples, 1)
    int_at_least("batch", batch, 1)
    net = MLP.load(model)
    record = net.data if data is None else run_record(net.data, model, source=data, coarsen=None, decode=None,
                                                      loss=None)
    dataset = open_dataset(record, data_dir)
    dataset.fits(model, net.input_dim, net.n_classes)
    x, y = dataset.required_test(samples, "to evaluate on")
    result = net.evaluate(x, y, batch=batch)
    return {"event": "eval", "model": os.fspath(model), "kind": KIND, "step": net.step, "hidden": net.hidden,
            **result, "samples_per_s": result["samples"] / max(result["seconds"], 1e-12)}
