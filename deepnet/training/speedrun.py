"""`deepnet speedrun`: wall-clock time to a target held-out accuracy, in the spirit of hlb-CIFAR10.

The whole recipe, top to bottom, with every hyperparameter in ``SPEEDRUN`` (a ``SpeedrunRecipe``):

1. load MNIST; set the last ``holdout`` training images aside (the held-out slice) and draw minibatches
   uniformly from the rest;
2. create a fresh model (a temporary file unless ``--model`` is given) and open it, in RAM by default;
3. start the clock; step; after every ``eval_every``-th step evaluate the held-out slice, unless the mean
   batch accuracy of the steps since the last evaluation is more than ``eval_gate`` below the target
   (the batch accuracy is free; an evaluation through 10M layers is not); stop as soon as the held-out
   accuracy reaches ``target_acc``, or after ``max_steps``;
4. stop the clock; evaluate the full 10,000-image test set.

The headline figure, ``time_to_target``, is the wall-clock time from the start of the first step to
the end of the held-out evaluation that reached the target: it includes every step and every held-out
evaluation, and excludes loading the data, creating and loading the model, the final test evaluation
and saving. The report also gives the steps, the held-out accuracy at the target, the test accuracy, the
time spent in steps and in evaluations, and the machine.

The run stops at its target, so its length is unknown: the report rows carry no ETA and the progress
bar counts towards "at most" ``max_steps`` without a remaining time (an ETA to ``max_steps`` would
promise a length the run is not going to have, whenever it succeeds). The workload line is a notice
of this module's logger (INFO).
"""

from __future__ import annotations

import logging
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from deepnet import activations
from deepnet.data.dataset import ArrayMinibatches
from deepnet.data.sources import new_record, open_dataset
from deepnet.errors import ConfigError, DeepnetError
from deepnet.flags import int_at_least, non_negative_number, number_in, writable_directory
from deepnet.nn import memory
from deepnet.nn.network import DEFAULT_CHUNK_LAYERS, DeepNet, StepResult
from deepnet.training import loop
from deepnet.training.heldout import HeldOut
from deepnet.training.loop import Hook, ProgressBar, StepEvent
from deepnet.training.recipe import init, training_rng
from deepnet.training.reporting import OnReport, StepLog, ignore_report
from deepnet.training.schedule import Schedule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SpeedrunRecipe:
    """Every hyperparameter of the speedrun, in one place (the CLI's flags override them)."""

    target_acc: float = 0.70          # stop when the held-out accuracy reaches this
    layers: int = 10_000_000
    width: int = 4
    activation: str = "softsign"
    batch: int = 16
    layer_lr: float = 0.05
    head_lr: float = 0.05
    schedule: str = "constant"        # constant, cosine or linear (deepnet.training.schedule), over max_steps
    warmup: int = 0
    final_lr_ratio: float = 0.0       # where a cosine/linear decay ends, as a fraction of the base rates
    eval_every: int = 100             # held-out evaluation cadence (steps)
    eval_gate: float = 0.05           # skip an evaluation while the mean batch accuracy is this far below target
    holdout: int = 5000               # the last N training images, never trained on
    max_steps: int = 5000             # give up after this many steps
    seed: int = 0                     # model initialisation and minibatches
    in_memory: bool = True            # core weights in RAM (faster); False: streamed from the file
    chunk_layers: int = DEFAULT_CHUNK_LAYERS
    test_samples: int | None = None   # the final test evaluation (None: the whole test set)
    report_every: int = 100           # a table row every N steps (and after every held-out evaluation)
    data: str = "mnist"               # the source (deepnet.data.sources), recorded in the model
    coarsen: int = 1                  # K x K cells of each image as (max, VAL2) bytes; 1: the pixels


SPEEDRUN = SpeedrunRecipe()


class TargetNotReached(DeepnetError):
    """The speedrun ended (max_steps) without reaching its target; the CLI exits with status 1."""

    exit_status = 1


def machine() -> str:
    """The CPU model, the CPUs this process may use, and the RAM: what a time is measured on."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    ram = ""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    ram = f", {int(line.split()[1]) / 2**20:.0f} GiB RAM"
                    break
    except (OSError, ValueError):
        pass
    return f"{model}, {cpus} CPUs{ram}"


def _check(recipe: SpeedrunRecipe) -> None:
    number_in("target-acc", recipe.target_acc, 0.0, 1.0, low_open=True)
    for name in ("layers", "width", "batch", "eval_every", "holdout", "max_steps", "chunk_layers",
                 "test_samples", "report_every", "coarsen"):
        if getattr(recipe, name) is not None:
            int_at_least(name.replace("_", "-"), getattr(recipe, name), 1)
    int_at_least("seed", recipe.seed, 0)
    activations.get(recipe.activation)
    for name in ("layer_lr", "head_lr", "eval_gate"):
        non_negative_number(name.replace("_", "-"), getattr(recipe, name))


def speedrun(*, model: str | Path | None = None, workdir: str | Path | None = None,
             data_dir: str | Path | None = None, progress: bool = False, on_report: OnReport = ignore_report,
             **overrides: object) -> dict:
    """Run the speedrun (``SPEEDRUN`` with ``overrides``, e.g. ``layers=100, target_acc=0.5``); returns
    the report as a dict (``reached`` False if ``max_steps`` ran out first).

    ``model``: keep the trained model at this path (it must not exist); default a temporary file in
    ``workdir`` (default the system's temporary directory), removed at the end. ``progress`` shows tqdm
    bars on stderr; the workload line is a logging notice; report rows (without an ETA: the run stops
    at its target) go to ``on_report``.
    """
    unknown = sorted(set(overrides) - {f.name for f in fields(SpeedrunRecipe)})
    if unknown:
        raise ConfigError(f"speedrun has no setting {', '.join(unknown)}")
    recipe = replace(SPEEDRUN, **{k: v for k, v in overrides.items() if v is not None})
    _check(recipe)
    writable_directory("workdir", workdir)
    schedule = Schedule(recipe.schedule, warmup_steps=recipe.warmup, decay_steps=recipe.max_steps,
                        final_ratio=recipe.final_lr_ratio)
    if model is not None and Path(model).exists():
        raise ConfigError(f"{model} already exists: a speedrun starts from a fresh model (choose another --model)")

    # 1. data (not timed)
    record = new_record(source=recipe.data, coarsen=recipe.coarsen, decode=None, loss=None)
    dataset = open_dataset(record, data_dir)
    if dataset.generative:
        dataset.close()
        dataset.require_fixed("a speedrun (it holds images out)")
    n = dataset.n_train
    if recipe.holdout >= n:
        raise ConfigError(f"--holdout must be < {n}, got {recipe.holdout}")
    n_train = n - recipe.holdout
    x_train, y_train = dataset.train_slice(0, n_train)
    heldout = HeldOut(*dataset.train_slice(n_train, n), recipe.eval_every)
    x_test, y_test = dataset.required_test(recipe.test_samples, "for the speedrun's final evaluation")

    # 2. a fresh model (not timed)
    tmpdir = None
    if model is None:
        tmpdir = tempfile.TemporaryDirectory(dir=workdir, prefix="deepnet-speedrun-")
        path = Path(tmpdir.name) / "speedrun.h5"
    else:
        path = Path(model)
    try:
        log.info(f"speedrun: {recipe.layers:,} layers x width {recipe.width}, {recipe.activation}, batch "
                 f"{recipe.batch}, target {recipe.target_acc:g} on {recipe.holdout} held-out images; {machine()}")
        memory.check_new_model(layers=recipe.layers, width=recipe.width, input_dim=dataset.input_dim,
                               n_classes=dataset.n_classes, hidden=None, batch=recipe.batch)
        init(path, layers=recipe.layers, width=recipe.width, activation=recipe.activation, seed=recipe.seed,
             progress=progress, input_dim=dataset.input_dim, n_classes=dataset.n_classes, data=record)
        with DeepNet.open(path, writable=True, in_memory=recipe.in_memory, chunk_layers=recipe.chunk_layers) as net:
            report = _run(net, recipe, schedule, x_train, y_train, heldout, progress=progress, on_report=on_report)
            with tqdm(total=len(y_test), desc="test", unit="img", disable=not progress, leave=False,
                      dynamic_ncols=True) as bar:
                result = net.evaluate(x_test, y_test, progress=bar.update)
            net.file.record_evaluation(net.step, "test", result.samples, result.loss, result.accuracy)
            report.update(test_acc=result.accuracy, test_loss=result.loss, test_samples=result.samples,
                          test_seconds=result.seconds)
            if model is not None:
                heldout.attach(net)
                net.save(durable=True)
    finally:
        if tmpdir is not None:
            tmpdir.cleanup()
    report.update(model=None if model is None else str(model), machine=machine(), recipe=asdict(recipe))
    return report


def _without_eta(on_report: OnReport) -> OnReport:
    """``on_report`` given the rows without their ETA (see the module docstring)."""
    return lambda row: on_report({k: v for k, v in row.items() if k != "eta_seconds"})


class _GatedHeldOut(Hook):
    """Evaluates the held-out slice when due, unless the mean batch accuracy since the last evaluation
    is more than ``eval_gate`` below the target; keeps the best measurement."""

    def __init__(self, net: DeepNet, heldout: HeldOut, recipe: SpeedrunRecipe) -> None:
        self.net, self.heldout, self.recipe = net, heldout, recipe
        self.since_eval: list[float] = []
        self.best = (0, -1.0)

    def after_step(self, event: StepEvent) -> None:
        self.since_eval.append(event.result.batch_acc)
        if not self.heldout.due(self.net.step):
            return
        if np.mean(self.since_eval) >= self.recipe.target_acc - self.recipe.eval_gate:
            event.heldout = self.heldout.measure(self.net)
            if event.heldout > self.best[1]:
                self.best = (self.net.step, event.heldout)
        self.since_eval = []


class _Target(Hook):
    """Stops the run at the first held-out measurement that reaches the target, noting the time."""

    def __init__(self, target: float, started: float) -> None:
        self.target, self.started = target, started
        self.reached_at: float | None = None

    def after_step(self, event: StepEvent) -> None:
        if event.heldout is not None and event.heldout >= self.target:
            self.reached_at = time.perf_counter() - self.started
            event.stop = True


def _run(net: DeepNet, recipe: SpeedrunRecipe, schedule: Schedule, x: np.ndarray, y: np.ndarray,
         heldout: HeldOut, *, progress: bool, on_report: OnReport) -> dict:
    """3. the timed part: steps and held-out evaluations until the target (or max_steps)."""
    net.train_settings = {"batch": recipe.batch, "layer_lr": recipe.layer_lr, "head_lr": recipe.head_lr,
                          "train_limit": int(x.shape[0]), "holdout": heldout.size, "eval_every": recipe.eval_every,
                          "layer_schedule": schedule.to_dict(), "head_schedule": schedule.to_dict()}
    rng = training_rng(net)
    rows = StepLog(net, recipe.report_every, _without_eta(on_report), total=recipe.max_steps, batch=recipe.batch,
                   heldout=True)
    gate = _GatedHeldOut(net, heldout, recipe)

    def step(xb: np.ndarray, yb: np.ndarray, t: int) -> StepResult:
        factor = schedule.factor(net.step)
        return net.train_step(xb, yb, layer_lr=recipe.layer_lr * factor, head_lr=recipe.head_lr * factor,
                              rng_state=rng.bit_generator.state)

    with ProgressBar(recipe.max_steps, "speedrun", progress, at_most=True) as bar:
        target = _Target(recipe.target_acc, time.perf_counter())
        loop.run(step, ArrayMinibatches(x, y), rng=rng, batch=recipe.batch, steps=recipe.max_steps, hooks=[gate, bar, rows, target])
    reached_at = target.reached_at
    best = gate.best
    elapsed = reached_at if reached_at is not None else time.perf_counter() - target.started
    return {
        "event": "speedrun",
        "reached": reached_at is not None,
        "target_acc": recipe.target_acc,
        "time_to_target": reached_at,
        "steps": net.step,
        "heldout_acc": heldout.last[2] if heldout.last else None,   # the last measurement (at the target)
        "best_heldout_acc": best[1] if best[1] >= 0 else None,
        "best_heldout_step": best[0] if best[1] >= 0 else None,
        "heldout_samples": heldout.size,
        "evaluations": len(heldout.rows),
        "eval_seconds": heldout.seconds,
        "train_seconds": elapsed - heldout.seconds,
        "seconds": elapsed,
        "seconds_per_step": (elapsed - heldout.seconds) / max(1, net.step),
        "mode": "in memory" if net.in_memory else "streamed",
    }
