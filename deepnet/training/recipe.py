"""Dense training, top to bottom: create or open a model, run the training loop, save, evaluate.

Every hyperparameter default lives in ``RECIPE`` (deepnet.training.options); the flags arrive as one
``TrainOptions``. Nothing here prints: results are returned, report rows go to ``on_report``, warnings
are ``warnings.warn`` and notices go to this module's logger at INFO (the command line shows both).
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

from deepnet import activations
from deepnet.data.dataset import Dataset, check_count
from deepnet.errors import ConfigError, DeepnetError
from deepnet.flags import positive
from deepnet.formats.data_record import DataRecord, write_data_record
from deepnet.formats.hdf5 import ModelFile, remove_stale_temporaries
from deepnet.nn import branch as _branch
from deepnet.nn import memory
from deepnet.nn.engine import NonFiniteError
from deepnet.nn.network import DEFAULT_EVAL_BATCH, DeepNet, EvalResult
from deepnet.training import ema as _ema
from deepnet.training import loop
from deepnet.training.data_plan import model_data, refuse_generative, training_data
from deepnet.training.loop import Hook, ProgressBar, StepEvent
from deepnet.training.options import RECIPE, RunOptions, TrainOptions
from deepnet.training.reporting import OnReport, StepLog, ignore_report
from deepnet.training.signals import Interrupted, StopSignal

log = logging.getLogger(__name__)


def training_rng(net: DeepNet) -> np.random.Generator:
    """The minibatch generator: continued from the committed state, else seeded from the model's seed."""
    return loop.minibatch_rng(net.file.seed, net.rng_state, lambda exc: (
        f"{net.file.path}: the stored minibatch generator state is unusable ({exc})"))


class Saves(Hook):
    """When to make the model file durable: every ``every`` steps (else every RECIPE.checkpoint_seconds)
    before the last, and after the last. ``saving`` says whether a save is under way (for the message
    of an interrupted one)."""

    def __init__(self, net: DeepNet, every: int | None, steps: int) -> None:
        self.net, self.every, self.steps = net, every, steps
        self.last = time.monotonic()
        self.saving = False

    def due(self, steps_done: int) -> bool:
        """Whether a checkpoint is due after ``steps_done`` steps of this run."""
        if self.every is not None:
            return steps_done % self.every == 0
        return time.monotonic() - self.last >= RECIPE.checkpoint_seconds

    def save(self) -> None:
        """Make the model file durable (the step in RAM, in memory; an fsync, streamed)."""
        self.saving = True
        self.net.save(durable=True)
        self.saving = False

    def after_step(self, event: StepEvent) -> None:
        if event.done < self.steps and self.due(event.done):
            self.save()
            self.last = time.monotonic()

    def at_end(self) -> None:
        self.save()


def train(options: TrainOptions, *, progress: bool = False, on_report: OnReport = ignore_report) -> dict:
    """Train ``options.model`` on its data for ``options.steps`` more steps (or until ``options.until_step``),
    creating it first if it does not exist; returns the final figures (see deepnet.api.train).
    ``progress`` shows tqdm bars on stderr."""
    options.check()
    run = RunOptions(options)
    record, dataset = training_data(options.model, data=options.data, coarsen=options.coarsen,
                                    decode=options.decode, loss=options.loss, data_dir=options.data_dir)
    try:
        refuse_generative(dataset, train_limit=options.train_limit, holdout=options.holdout)
        if options.train_limit is not None:
            check_count("train-limit", options.train_limit, dataset.n_train)
        test = dataset.test(options.test_samples) if options.test_samples != 0 else None

        path = Path(options.model)
        if not path.exists():
            options.planned_steps(0)
            run.check_new_model(options.new_layers, options.new_width)
            plan_settings(options, run, None, 0, dataset.n_train)  # a refused run creates no file
            memory.check_new_model(layers=options.new_layers, width=options.new_width, input_dim=dataset.input_dim,
                                   n_classes=dataset.n_classes, hidden=run.hidden, batch=options.batch or RECIPE.batch)
            init(path, **run.new_model_branch(), layers=options.new_layers, width=options.new_width,
                 activation=options.new_activation, alpha=options.alpha, seed=options.seed, progress=progress,
                 input_dim=dataset.input_dim, n_classes=dataset.n_classes, data=record)

        stop = StopSignal()
        with stop, DeepNet.open(path, writable=True, in_memory=options.in_memory, chunk_layers=options.chunk_layers,
                                expect=options.expect(), resume_torn=options.resume_torn) as net:
            dataset.fits(path, net.input_dim, net.file.n_classes)
            try:
                return _train_open(net, options, run, stop, dataset, test, progress, on_report)
            finally:
                run.close()
    finally:
        dataset.close()


def _train_open(net: DeepNet, options: TrainOptions, run: RunOptions, stop: StopSignal, dataset: Dataset,
                test: tuple[np.ndarray, np.ndarray] | None, progress: bool, on_report: OnReport) -> dict:
    """train() on the opened model."""
    path = Path(options.model)
    if options.alpha is not None and not math.isclose(options.alpha, net.file.alpha, rel_tol=1e-6):
        raise ConfigError(f"{path} has alpha {net.file.alpha:g} but --alpha {options.alpha:g} was given")
    first_step = net.step
    steps = options.planned_steps(first_step)
    until = first_step + steps
    settings = plan_settings(options, run, net.train_settings, first_step, dataset.n_train)
    run.prepare(net, settings, dataset)
    batch, train_limit = settings["batch"], settings["train_limit"]
    net.train_settings = settings
    remove_stale_temporaries(path)
    minibatches = dataset.minibatches(train_limit)
    rng = training_rng(net)
    best = run.best

    def step(x: np.ndarray, y: np.ndarray, t: int) -> object:
        return net.train_step(x, y, **run.lrs(net.step), rng_state=rng.bit_generator.state)

    with ProgressBar(steps, "train", progress) as bar:
        log_rows = StepLog(net, options.report_every, on_report, total=steps, batch=batch,
                           heldout=run.heldout is not None)
        if net.accepted_torn is not None:
            torn = net.accepted_torn
            log.info(f"--resume-torn: continuing from step {torn.step}, with {torn.layers_updated} of "
                     f"{net.layers} layers{' and the heads' if torn.heads_changed else ''} as updated by the "
                     f"interrupted step {torn.torn_step}")
        saves = Saves(net, options.checkpoint_every, steps)
        hooks: list[Hook] = [bar, run, log_rows, saves] if best is None else [bar, run, log_rows, best, saves]
        started = time.perf_counter()
        stop.arm(net)
        try:
            done = loop.run(step, minibatches, rng=rng, batch=batch, steps=steps, hooks=hooks,
                            stop_requested=lambda: stop.count > 0 or (best is not None and best.exhausted))
            stop.disarm(f"stopped after step {net.step}, which {path} holds; the final evaluation was skipped",
                        held_step=net.saved_step, until_step=until)
        except NonFiniteError as exc:
            stop.done = True
            raise _after_non_finite(net, exc) from None
        except KeyboardInterrupt:
            stop.done = True
            what = f"saving step {net.step}" if saves.saving else f"step {net.step + 1}"
            raise Interrupted(f"abandoned {what}; {_holds(net)}", stop.signum, held_step=_held_step(net),
                              until_step=until) from None
    if done < steps and stop.count > 0:
        raise Interrupted(f"stopped after step {net.step} of {until}; {path} holds step {net.saved_step}",
                          stop.signum, held_step=net.saved_step, until_step=until)
    if best is not None:
        best.stopped_early = best.exhausted and done < steps
    elapsed = time.perf_counter() - started

    final = {
        "event": "final",
        "model": str(path),
        "steps": net.step - first_step,
        "step": net.step,
        "loss": log_rows.last_loss,
        "batch_acc": log_rows.last_acc,
        "seconds": elapsed,
        "seconds_per_step": elapsed / done if done else float("nan"),
        "layer_samples_per_s": net.layers * batch * done / elapsed if done else float("nan"),
        "best_heldout_acc": None,
        "best_heldout_step": None,
        "best_model": None,
        "stopped_early": False,
    }
    if test is not None:
        result = net.evaluate(*test)
        net.file.record_evaluation(net.step, "test", result.samples, result.loss, result.accuracy)
        final.update(test_loss=result.loss, test_acc=result.accuracy, test_samples=result.samples)
    run.finish(net, test, final)
    return final


def plan_settings(options: TrainOptions, run: RunOptions, stored: dict | None, first_step: int,
                  n_train: int) -> dict:
    """This run's training settings (batch, rates, train_limit, schedules), checked against the model's
    ``stored`` ones (None: a new model) and the ``n_train`` training images (see RunOptions.plan); the
    run over MPI ranks plans with it too."""
    layer_lr = options.lr if options.layer_lr is None else options.layer_lr
    head_lr = options.lr if options.head_lr is None else options.head_lr
    settings = _settings(stored, batch=options.batch, layer_lr=layer_lr, head_lr=head_lr,
                         train_limit=options.train_limit)
    run.plan(stored, settings, train_limit=options.train_limit, default_train_limit=RECIPE.train_limit,
             n_train=n_train, first_step=first_step, steps=options.planned_steps(first_step))
    check_count("train-limit", settings["train_limit"], n_train)
    return settings


def _settings(stored: dict | None, **given: object) -> dict:
    """This run's training settings: as given, else as the model was last trained, else the RECIPE's."""
    stored = stored or {}
    out = {}
    for key, value in given.items():
        if value is None:
            value = stored.get(key, getattr(RECIPE, key))
        out[key] = value
    return out


def _held_step(net: DeepNet) -> int | None:
    """The step the model file holds now (None if it holds no committed step or cannot be read)."""
    if net.in_memory:
        return net.saved_step
    try:
        state = net.file.state()
    except Exception:  # the file itself failed: unknown
        return None
    return state.step if state.healthy else None


def _holds(net: DeepNet) -> str:
    """What the model file holds now, for a message."""
    try:
        return net.file_holds()
    except Exception:  # the file itself failed: say nothing rather than something wrong
        return f"see `deepnet check {net.file.path}`"


def _after_non_finite(net: DeepNet, exc: NonFiniteError) -> NonFiniteError:
    """A refused step: in memory, the steps since the last checkpoint are good, so save them first."""
    if net.in_memory and not net.unusable and net.step != net.saved_step:
        try:
            net.save(durable=True)
        except DeepnetError:
            return exc
        why = getattr(exc, "why", None)
        if why:
            return NonFiniteError(f"step {net.step + 1} refused: {why}; saved the last good step, "
                                  f"{net.step}, to {net.file.path}", start=exc.start, stop=exc.stop)
    return exc  # streamed: every good step is committed already, and the refused one wrote nothing


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
    progress: bool = False,
    branch: str | None = None,
    hidden: int | None = None,
    data: DataRecord | None = None,
) -> ModelFile:
    """Create a new model file (core weights uniform in [-0.001, 0.001], Xavier heads); returns it closed.

    ``branch="mlp", hidden=H`` adds the residual MLP branch (deepnet.nn.branch), drawn from its own stream;
    ``data`` is the record of what the model learns from (deepnet.formats.data_record; None: MNIST pixels).
    """
    positive("layers", layers)
    positive("width", width)
    activations.get(activation)
    if alpha is not None:
        positive("alpha", alpha, float)
    branch, hidden = _branch.check_options(branch, hidden)
    memory.check_new_model(layers=layers, width=width, input_dim=input_dim, n_classes=n_classes, hidden=hidden)
    new_branch, extra_bytes = None, 0
    if branch is not None:
        new_branch = _branch.MLPBranch.new(hidden, input_dim=input_dim, n_classes=n_classes, seed=seed)
        extra_bytes = sum(a.nbytes for a in new_branch.params().values())  # counted in the free-space check

    def extra(f: object) -> None:
        if new_branch is not None:
            new_branch.write_new(f)
        if data is not None:
            write_data_record(f, data)

    model_file = ModelFile.create(model, layers=layers, width=width, activation=activation, alpha=alpha,
                                  seed=seed, input_dim=input_dim, n_classes=n_classes, overwrite=overwrite,
                                  progress=progress, extra=extra, extra_bytes=extra_bytes)
    model_file.close()
    return model_file


def evaluate(
    model: str | Path,
    *,
    samples: int | None = None,
    batch: int = DEFAULT_EVAL_BATCH,
    chunk_layers: int = RECIPE.chunk_layers,
    in_memory: bool = False,
    use_ema: bool = False,
    data: str | None = None,
    data_dir: str | Path | None = None,
    progress: bool = False,
) -> dict:
    """Evaluate a model file on the first ``samples`` test samples (None: all) of the data it records
    (or ``data``, of the same inputs and classes), through its own input transform; returns loss,
    accuracy, time.

    ``use_ema`` evaluates the weight average stored in the file (deepnet.training.ema) instead of the
    weights, reading the averaged core into RAM; it is an error if the file has none. A file that does
    not hold a committed step is evaluated with a warning (``warnings.warn``).
    """
    if samples is not None:
        positive("test-samples", samples)
    positive("batch", batch)
    positive("chunk-layers", chunk_layers)
    with DeepNet.open(model, in_memory=in_memory, chunk_layers=chunk_layers) as net:
        dataset = model_data(net.file, data, data_dir)
        try:
            x, y = dataset.required_test(samples, "to evaluate on")
        finally:
            dataset.close()
        samples = int(x.shape[0])
        state = net.file.state()
        if not state.healthy:
            warnings.warn(f"{model} is not a committed step: {state.message} (see `deepnet check`)", stacklevel=2)
        average = _ema.use_average(net) if use_ema else None
        with tqdm(total=samples, desc="eval", unit="img", disable=not progress, delay=2.0,
                  leave=False, dynamic_ncols=True) as bar:
            result: EvalResult = net.evaluate(x, y, batch=batch, progress=bar.update)
        figures = {"event": "eval", "model": str(model), "step": net.step, **asdict(result),
                   "samples_per_s": result.samples / result.seconds}
        if average is not None:
            figures.update(ema=True, ema_decay=average["decay"], ema_every=average["every"], ema_step=average["step"])
    return figures
