"""`mpiexec -n P deepnet train ROOT`: one training run over P ranks, each holding its layers in RAM.

Every rank runs this. The model is a sharded model (deepnet.formats.shards: a root file and one shard
per rank); a new one is created (rank 0) with exactly the weights a one-process model of the same seed
gets. All ranks draw the same minibatches from the same generator; rank 0 feeds the input head and
reports, the last rank computes the loss. A step is the exact step of deepnet.distributed.pipeline.

Commits are two-phase (deepnet.formats.shards): every rank writes its layers as a new shard version,
then rank 0 rewrites the root to point at them; the root is the commit point, so a rank killed at any
moment leaves a model that resumes from the last step every rank holds. Ctrl-C or SIGTERM (mpiexec
passes them to every rank) finishes the step, saves and stops: the ranks agree after each step on
whether any of them was asked to stop, so all stop after the same step.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepnet.data.dataset import ArrayMinibatches, Dataset, check_count
from deepnet.distributed.mpi import Ranks
from deepnet.distributed.pipeline import RankCore, RankStep, default_micro_batches, micro_batch_sizes
from deepnet.errors import ConfigError, DeepnetError, ModelFileError
from deepnet.flags import positive
from deepnet.formats import shards
from deepnet.formats.data_record import write_data_record
from deepnet.formats.locking import flock
from deepnet.formats.shard_files import shard_dir
from deepnet.kernels.loader import kernels_for
from deepnet.nn import heads as _heads
from deepnet.nn.losses import softmax_cross_entropy
from deepnet.training import loop
from deepnet.training.loop import Hook, ProgressBar, StepClock, StepEvent, mean_rows
from deepnet.training.options import RECIPE, RunOptions, TrainOptions
from deepnet.training.data_plan import training_data
from deepnet.training.recipe import plan_settings
from deepnet.training.reporting import OnReport
from deepnet.training.signals import Interrupted, StopSignal

log = logging.getLogger(__name__)

#: Message tags: states go up and gradients come down per micro-batch; the rest are control messages.
TAG_UP, TAG_DOWN = 1 << 20, 2 << 20
TAG_VERSION, TAG_HEAD, TAG_SETUP, TAG_EVAL, TAG_TOTALS = range(1, 6)

#: Images per forward pass of the final test evaluation.
EVAL_BATCH = 1024

#: Flags a run over several ranks does not take yet (each a one-line refusal before anything is written).
UNSUPPORTED = ("ema", "ema_every", "branch", "hidden", "holdout", "eval_every", "keep_best", "patience",
               "resume_torn")


class MpiLink:
    """The pipeline's Link over MPI: states to rank + 1, gradients to rank - 1."""

    def __init__(self, ranks: Ranks) -> None:
        self.ranks = ranks

    def send_up(self, m: int, h: np.ndarray) -> None:
        self.ranks.send(h, self.ranks.rank + 1, TAG_UP + m)

    def recv_from_below(self, m: int, shape: tuple[int, int]) -> np.ndarray:
        return self.ranks.recv(shape, self.ranks.rank - 1, TAG_UP + m)

    def send_down(self, m: int, g: np.ndarray) -> None:
        self.ranks.send(g, self.ranks.rank - 1, TAG_DOWN + m)

    def recv_from_above(self, m: int, shape: tuple[int, int]) -> np.ndarray:
        return self.ranks.recv(shape, self.ranks.rank + 1, TAG_DOWN + m)


def check_options(options: TrainOptions, ranks: Ranks) -> None:
    """Refuse what a run over several ranks does not do, before anything is written."""
    given = [name for name in UNSUPPORTED if getattr(options, name) not in (None, False)]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ConfigError(f"{flags}: not available in a run over {ranks.size} MPI ranks yet (run with one "
                          "process after `deepnet gather`)")
    options.check()  # every value as one process checks it
    positive("rank-timeout", options.rank_timeout, float)


def _lock_run(root: Path) -> int:
    """One run at a time per model: rank 0 holds an exclusive flock on the shards' directory for the run
    (released when the process ends); a second run is refused in one line."""
    try:
        return flock(str(shard_dir(root)), exclusive=True)
    except BlockingIOError:
        raise ModelFileError(f"{root} is being trained by another run") from None
    except OSError as exc:
        raise ModelFileError(f"cannot lock {shard_dir(root)}: {exc.strerror}") from None


_held_locks: list[int] = []


def release_locks() -> None:
    """Release the run's lock on its model (rank 0; at the end of the run)."""
    while _held_locks:
        os.close(_held_locks.pop())


def prepare_model(options: TrainOptions, ranks: Ranks, dataset: Dataset) -> Path:
    """The root of the run's sharded model: created by rank 0 if missing (for ``dataset``'s inputs and
    classes, recording it); refused if it does not fit."""
    root = Path(options.model)
    problem: DeepnetError | None = None
    if ranks.rank == 0:
        try:
            if not root.exists():
                layers = options.new_layers
                shards.split_layers(layers, ranks.size)  # refuses more ranks than layers
                shards.create_sharded(root, ranks.size, layers=layers, width=options.new_width,
                                      activation=options.new_activation, alpha=options.alpha, seed=options.seed,
                                      input_dim=dataset.input_dim, n_classes=dataset.n_classes,
                                      extra=lambda f: write_data_record(f, dataset.record))
            elif not shards.is_sharded(root):
                raise ConfigError(f"{root} is a one-file model; split it for {ranks.size} ranks first: "
                                  f"deepnet shard {root} --ranks {ranks.size}")
            _held_locks.append(_lock_run(root))
            shards.remove_stale_versions(root)
        except DeepnetError as exc:
            problem = exc
    said = ranks.bcast_obj(None if problem is None else str(problem), TAG_SETUP)
    if problem is not None:
        raise problem
    if said is not None:
        raise QuietError(said)
    return root


class QuietError(ConfigError):
    """The error rank 0 reports; the other ranks end with its status and print nothing."""

    quiet = True


@dataclass
class Opened:
    """What a rank read from the model to start the run."""

    core: np.ndarray
    layers_here: int
    heads: dict[str, np.ndarray]
    stored: dict | None
    first_step: int
    rng_state: dict | None
    width: int
    alpha: float
    activation: str
    seed: int
    layers: int


def open_rank(root: Path, options: TrainOptions, ranks: Ranks) -> Opened:
    """This rank's layers and the model's state, checked against the job and the flags."""
    with shards.open_root(root) as model:
        f = model.file
        if len(model.shards) != ranks.size:
            raise ConfigError(f"{root} has {len(model.shards)} shards but mpiexec started {ranks.size} ranks "
                              f"(run with -n {len(model.shards)}, or gather and shard it again)")
        for name, want in options.expect().items():
            if getattr(f, name) != want:
                raise ConfigError(f"{root} has {name} {getattr(f, name)} but --{name} {want} was given")
        return Opened(model.read_core(ranks.rank), model.shards[ranks.rank].layers,
                       {k: v.copy() for k, v in f.read_heads().items()}, f.train_settings, f.step, f.rng_state,
                       f.width, f.alpha, f.activation, f.seed, f.layers)


def train_distributed(options: TrainOptions, ranks: Ranks, *, progress: bool, on_report: OnReport) -> dict:
    """Train ``options.model`` over the job's ranks (see the module docstring); returns the final figures
    on rank 0 and ``{"rank": r}`` elsewhere."""
    check_options(options, ranks)
    dataset, test = open_data(options)
    try:
        return _train_prepared(options, ranks, dataset, test, progress, on_report)
    finally:
        release_locks()


def open_data(options: TrainOptions) -> tuple[Dataset, tuple[np.ndarray, np.ndarray] | None]:
    """The run's dataset (every rank opens it: rank 0 needs the inputs, the last rank the labels) and its
    test set; over MPI, only fixed training sets with labels."""
    _, dataset = training_data(options.model, data=options.data, coarsen=options.coarsen, decode=options.decode,
                               loss=options.loss, data_dir=options.data_dir, mode="r")
    if dataset.generative or dataset.record.loss != "xent":
        dataset.close()
        raise ConfigError(f"over MPI ranks deepnet trains on fixed labelled data with --loss xent; "
                          f"{dataset.name} with --loss {dataset.record.loss} trains in one process")
    if options.train_limit is not None:
        check_count("train-limit", options.train_limit, dataset.n_train)
    return dataset, dataset.test(options.test_samples) if options.test_samples != 0 else None


def open_run(options: TrainOptions, ranks: Ranks, dataset: Dataset) -> tuple[Path, Opened]:
    """The run's root (created if missing, locked) and this rank's part of it; every rank starts, or none
    does (a rank that failed says why)."""
    root = prepare_model(options, ranks, dataset)
    error: DeepnetError | None = None
    try:
        opened = open_rank(root, options, ranks)
        dataset.fits(root, opened.heads["input_weight"].shape[0], opened.heads["output_bias"].shape[0])
    except DeepnetError as exc:
        error = exc
    if ranks.any(error is not None, TAG_SETUP):
        raise error if error is not None else QuietError("another rank could not start")
    return root, opened


def _train_prepared(options: TrainOptions, ranks: Ranks, dataset: Dataset,
                    test: tuple[np.ndarray, np.ndarray] | None, progress: bool, on_report: OnReport) -> dict:
    root, opened = open_run(options, ranks, dataset)
    try:
        return _train(options, ranks, root, opened, dataset, test, progress, on_report)
    except DeepnetError as exc:
        exc.abort = ranks.abort  # the other ranks would wait for this one: the job ends
        raise


def plan_run(options: TrainOptions, opened: Opened, n_train: int) -> tuple[int, int, int, RunOptions, dict]:
    """(first step, steps, until step, the run's options, its settings): batch, rates, train_limit and
    schedules as one process resolves, stores and continues them."""
    first = opened.first_step
    steps = options.planned_steps(first)
    plan = RunOptions(options)
    return first, steps, first + steps, plan, plan_settings(options, plan, opened.stored, first, n_train)


def _train(options: TrainOptions, ranks: Ranks, root: Path, opened: Opened, dataset: Dataset,
           test: tuple[np.ndarray, np.ndarray] | None, progress: bool, on_report: OnReport) -> dict:
    """The run itself, once every rank holds its layers."""
    first_step, steps, until, plan, settings = plan_run(options, opened, dataset.n_train)
    batch = settings["batch"]
    micro = options.micro_batches or default_micro_batches(batch, ranks.size)
    if not 1 <= micro <= batch:
        raise ConfigError(f"--micro-batches must be in 1..{batch} (the batch), got {micro}")

    mine = {k: v for k, v in opened.heads.items() if (ranks.rank == 0 and k.startswith("input"))
            or (ranks.rank == ranks.size - 1 and k.startswith("output"))}
    rank_core = RankCore(opened.core, kernels_for(opened.activation, opened.width), opened.width, opened.alpha,
                         options.chunk_layers, micro_batch_sizes(batch, micro))
    part = RankStep(ranks.rank, ranks.size, rank_core, mine)
    link = MpiLink(ranks)
    rng = loop.minibatch_rng(opened.seed, opened.rng_state, lambda exc: f"{root}: the stored minibatch "
                             f"generator state is unusable ({exc})")
    limit = settings["train_limit"]
    # Only rank 0 needs the inputs, only the last rank the labels; every rank draws the same indices.
    x_train, y_train = dataset.train_slice(0, limit)
    if ranks.rank != 0:
        x_train = np.zeros((limit, 0), np.float32)
    commit = _Commits(root, ranks, part, settings, options.checkpoint_every)

    def step(x: np.ndarray, y: np.ndarray, t: int) -> tuple[float, float, float]:
        started = time.perf_counter()
        part.x, part.y = x, y
        part.forward_phase(link)
        rates = plan.lrs(first_step + t)
        part.backward_phase(link, rates["layer_lr"], rates["head_lr"])
        # One collective a step: the last rank's figures for rank 0's report and log, and whether any
        # rank was asked to stop (so that every rank stops after the same step).
        own = [part.loss, part.correct / batch] if part.last else [0.0, 0.0]
        clock_due = float(ranks.rank == 0 and commit.clock_due())  # rank 0's clock decides for all
        loss, accuracy, asked, due = ranks.sum(np.array([*own, float(stop.count > 0), clock_due]))
        agreed["stop"], commit.due_now = asked > 0, due > 0
        figures = (float(loss), float(accuracy))
        commit.stepped(first_step + t + 1, figures, time.perf_counter() - started, rng.bit_generator.state)
        return (*figures, time.perf_counter() - started)

    agreed = {"stop": False}
    stop = StopSignal()
    waited_before, sent_before = ranks.waited, ranks.sent_bytes
    started = time.perf_counter()
    with stop, ProgressBar(steps, "train", progress and ranks.rank == 0) as bar:
        report = _Report(ranks.rank == 0, options.report_every, on_report, layers=opened.layers, batch=batch,
                         total=steps)
        stop.arm()
        done = loop.run(step, ArrayMinibatches(x_train, y_train), rng=rng, batch=batch, steps=steps, hooks=[bar, report, commit],
                        stop_requested=lambda: agreed["stop"])
    elapsed = time.perf_counter() - started
    totals = ranks.gather_obj({"rank": ranks.rank, "layers": opened.layers_here,
                               "waited": ranks.waited - waited_before,
                               "sent_bytes": ranks.sent_bytes - sent_before}, TAG_TOTALS)
    step_now = first_step + done
    if done < steps:
        raise Interrupted(f"stopped after step {step_now} of {until}; {root} holds step {step_now}", stop.signum,
                          held_step=step_now, until_step=until)
    evaluated = _evaluate(part, ranks, test) if test is not None else None
    if ranks.rank != 0:
        return {"rank": ranks.rank}
    per_step = max(done, 1)
    final = {"event": "final", "model": str(root), "steps": done, "step": step_now, "loss": report.last_loss,
             "batch_acc": report.last_acc, "seconds": elapsed,
             "seconds_per_step": elapsed / done if done else float("nan"),
             "layer_samples_per_s": opened.layers * batch * done / elapsed if done else float("nan"),
             "ranks": ranks.size, "micro_batches": micro,
             "per_rank": [{**t, "waited_per_step": t["waited"] / per_step,
                           "sent_bytes_per_step": t["sent_bytes"] / per_step} for t in totals]}
    if evaluated is not None:
        final.update(test_loss=evaluated[0], test_acc=evaluated[1], test_samples=int(test[1].shape[0]))
    return final


class _Report(Hook):
    """Rank 0's report rows (the others keep count only): means over the steps since the last row."""

    def __init__(self, active: bool, every: int, on_report: OnReport, *, layers: int, batch: int, total: int) -> None:
        self.active, self.every, self.on_report = active, every, on_report
        self.layers, self.batch, self.total = layers, batch, total
        self.window: list[tuple[float, float, float]] = []
        self.done = 0
        self.clock = StepClock()
        self.last_loss = self.last_acc = float("nan")

    def after_step(self, event: StepEvent) -> None:
        self.window.append(event.result)
        self.clock.tick()
        self.done += 1
        if self.done % self.every == 0:
            self.report()

    def at_end(self) -> None:
        self.report()

    def report(self) -> None:
        if not self.window:
            return
        loss, acc, seconds = mean_rows(self.window)
        self.last_loss, self.last_acc = loss, acc
        self.window = []
        if self.active:
            self.on_report({"event": "report", "step": self.done, "loss": loss, "batch_acc": acc,
                            "seconds_per_step": seconds, "layer_samples_per_s": self.layers * self.batch / seconds,
                            "eta_seconds": self.clock.eta(self.total - self.done)})


class _Commits(Hook):
    """The run's checkpoints: every ``every`` steps (else every RECIPE.checkpoint_seconds, as rank 0's
    clock says, which it tells the others) and at the end."""

    def __init__(self, root: Path, ranks: Ranks, part: RankStep, settings: dict, every: int | None) -> None:
        self.root, self.ranks, self.part, self.settings, self.every = root, ranks, part, settings, every
        self.log_rows: list[tuple[int, float, float, float]] = []
        self.step = 0
        self.rng_state: dict | None = None
        self.last = time.monotonic()
        self.done = 0
        self.due_now = False  # the ranks' agreement after the latest step (rank 0's clock_due)

    def stepped(self, step: int, figures: tuple[float, float], seconds: float, rng_state: dict) -> None:
        self.step, self.rng_state = step, rng_state
        self.log_rows.append((step, figures[0], figures[1], seconds))

    def clock_due(self) -> bool:
        """Whether a checkpoint is due by the clock (without --checkpoint-every; asked of rank 0)."""
        return not self.every and time.monotonic() - self.last >= RECIPE.checkpoint_seconds

    def after_step(self, event: StepEvent) -> None:
        self.done += 1
        if (self.done % self.every == 0) if self.every else self.due_now:
            self.save()

    def at_end(self) -> None:
        if self.log_rows:
            self.save()

    def save(self) -> None:
        """Phase one on every rank (its shard version), phase two on rank 0 (the root)."""
        version = shards.write_core_version(self.root, self.ranks.rank, self.step, self.part.core.params)
        versions = self.ranks.gather_obj(str(version), TAG_VERSION)
        heads = dict(self.part.heads)
        if self.ranks.size > 1:
            if self.part.last:
                self.ranks.send_obj(heads, 0, TAG_HEAD)
            elif self.ranks.rank == 0:
                heads.update(self.ranks.recv_obj(self.ranks.size - 1, TAG_HEAD))
        if self.ranks.rank == 0:
            rows = np.array(self.log_rows, dtype=[("step", "<i8"), ("loss", "<f4"), ("batch_acc", "<f4"),
                                                  ("seconds", "<f4")])
            shards.commit_root(self.root, step=self.step, versions=[Path(v) for v in versions], heads=heads,
                               rng_state=self.rng_state, train_settings=self.settings, log_rows=rows)
        self.ranks.bcast_obj(True, TAG_VERSION)  # every rank waits for the root: the step is committed
        self.log_rows = []
        self.last = time.monotonic()


def _evaluate(part: RankStep, ranks: Ranks, test: tuple[np.ndarray, np.ndarray]) -> tuple[float, float] | None:
    """Loss and accuracy over the test images, forward through the ranks in batches (rank 0 returns them)."""
    x, y = test
    width = part.core.width
    loss_sum, correct = 0.0, 0.0
    for lo in range(0, x.shape[0], EVAL_BATCH):
        hi = min(x.shape[0], lo + EVAL_BATCH)
        if part.first:
            h = np.ascontiguousarray(_heads.input_head(part.heads, x[lo:hi]).T)
        else:
            h = ranks.recv((width, hi - lo), ranks.rank - 1, TAG_UP + 1000)
        for start, stop in part.core.bounds:
            part.core.kernels.forward(part.core.params[start:stop], h, part.core.alpha)
        if not part.last:
            ranks.send(h, ranks.rank + 1, TAG_UP + 1000)
            continue
        loss, accuracy, _ = softmax_cross_entropy(_heads.output_head(part.heads, h.T), y[lo:hi])
        loss_sum += loss * (hi - lo)
        correct += accuracy * (hi - lo)
    figures = (loss_sum / x.shape[0], correct / x.shape[0]) if part.last else None
    if ranks.size > 1:
        if part.last:
            ranks.send_obj(figures, 0, TAG_EVAL)
        elif ranks.rank == 0:
            figures = ranks.recv_obj(ranks.size - 1, TAG_EVAL)
    return figures
