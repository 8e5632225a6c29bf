"""The public functions of deepnet: each does one command's work and returns its result, printing nothing.

The ``deepnet`` command (deepnet.cli) is built from these functions: their signatures are its flags
and their docstrings its ``--help``. ``progress=True`` shows tqdm bars and notices on stderr;
``on_report`` receives the report rows of a training run as dicts.
"""

from __future__ import annotations

import inspect
import os
from dataclasses import fields
from pathlib import Path

from deepnet import activations as _activations
from deepnet.activations import check as _activation_check
from deepnet.activations import plugins as _plugins
from deepnet.api_data import diagnose, fetch_data, luckmatters, teacher  # noqa: F401  (the API's data half)
from deepnet.distributed import mpi as _mpi
from deepnet.distributed import run as _distributed
from deepnet.errors import ConfigError, ModelFileError
from deepnet.flags import writable_directory
from deepnet.formats import raw as _raw
from deepnet.formats import shards as _shards
from deepnet.formats.hdf5 import ModelFile
from deepnet.formats.layout import KIND_MLP
from deepnet.formats.mlp_file import model_kind
from deepnet.kernels import jit as _jit
from deepnet.kernels.loader import kernels_for
from deepnet.mach import run as _mach
from deepnet.mach.evaluate import evaluate_section
from deepnet.nn.network import DEFAULT_EVAL_BATCH
from deepnet.tools import bench as _bench
from deepnet.tools import info as _info
from deepnet.tools.check import CheckReport, check_model
from deepnet.tools.plot import parse_size, plot_training
from deepnet.training import mlp as _mlp_training
from deepnet.training import recipe as _recipe
from deepnet.training import speedrun as _speedrun
from deepnet.training.mlp import MLP_RECIPE as _MLP
from deepnet.training.options import RECIPE as R
from deepnet.training.options import TrainOptions
from deepnet.training.reporting import OnReport, ignore_report
from deepnet.training.speedrun import SPEEDRUN as _SR

PathLike = str | os.PathLike

#: Images per forward pass of an MLP evaluation.
_MLP_EVAL_BATCH = 1000


def init(model: PathLike, *, layers: int = R.layers, width: int = R.width, activation: str = R.activation,
         alpha: float | None = None, seed: int = R.seed, input_dim: int = 784, n_classes: int = 10,
         branch: str | None = None, hidden: int | None = None, overwrite: bool = False,
         progress: bool = False) -> ModelFile:
    """Create a model file with freshly initialised weights; returns the ModelFile, closed.

    Core weights are uniform in [-0.001, 0.001], the heads Xavier-uniform.

    Args:
        model: path of the HDF5 model file to create.
        layers: number of residual core layers L.
        width: units per core layer w.
        activation: core activation (see `deepnet activations`).
        alpha: residual scale; default 1/sqrt(layers).
        seed: seed of the weight initialisation and of the minibatch generator.
        input_dim: input features (784 for MNIST).
        n_classes: output classes (10 for MNIST).
        branch: "mlp" adds a residual MLP branch (input -> hidden ReLU -> logits added to the core's).
        hidden: the branch's hidden units (with --branch mlp).
        overwrite: replace an existing file.
        progress: show a progress bar while the weights are written (in blocks of ~4 MiB; a core of
            1 GiB or more is written behind, dropped from the page cache as it reaches the disk, so
            memory stays bounded whatever the depth).
    """
    return _recipe.init(model, layers=layers, width=width, activation=activation, alpha=alpha, seed=seed,
                        input_dim=input_dim, n_classes=n_classes, overwrite=overwrite, progress=progress,
                        branch=branch, hidden=hidden)


def train(model: PathLike = "model.h5", *, steps: int | None = None, until_step: int | None = None,
          layers: int | None = None, width: int | None = None, activation: str | None = None,
          alpha: float | None = None, seed: int = R.seed, batch: int | None = None, lr: float | None = None,
          layer_lr: float | None = None, head_lr: float | None = None, chunk_layers: int = R.chunk_layers,
          train_limit: int | None = None, report_every: int = R.report_every,
          test_samples: int | None = R.test_samples, in_memory: bool = False, checkpoint_every: int | None = None, resume_torn: bool = False,
          holdout: int | None = None, eval_every: int | None = None, keep_best: bool = False,
          patience: int | None = None, schedule: str | None = None, warmup: int | None = None,
          final_lr_ratio: float | None = None, decay_steps: int | None = None, ema: float | None = None,
          ema_every: int | None = None, branch: str | None = None, hidden: int | None = None,
          data: str | None = None, coarsen: int | tuple | None = None, decode: str | None = None,
          loss: str | None = None, data_dir: PathLike | None = None, micro_batches: int | None = None,
          rank_timeout: float = 300.0, mode: str = "exact", sections: int | None = None, mach_inputs: str | None = None,
          local_weight: float | None = None, delayed_weight: float | None = None, max_delay: int | None = None,
          distill_hidden: int | None = None, distill_lr: float | None = None, time_limit: float | None = None,
          progress: bool = False, on_report: OnReport | None = None) -> dict:
    """Train a model with exact SGD (or as asynchronous Mach sections, --mode mach) on MNIST or the data
    --data names, creating the model file if it does not exist.

    An existing model continues from its committed step, exactly as if never interrupted; --layers,
    --width and --activation must then agree with the file, and --batch, --layer-lr, --head-lr and
    --train-limit default to the values it was trained with. --steps K runs K more steps; --until-step N
    runs until the model is at step N, so the same command run again after an interruption finishes
    the plan. Streamed, every step is committed to the file; in memory, the file is replaced atomically
    at checkpoints and at the end. Ctrl-C (or SIGTERM) finishes the current step, saves and stops (exit
    status 130; 143 for SIGTERM); pressed again, it abandons the step.
    The table shows step, loss, batch accuracy, held-out accuracy (when measured), s/step,
    layer-samples/s and the ETA; every step's figures go to /train/log (`deepnet plot` draws them).
    An existing MLP model file trains as `deepnet train-mlp` would (flags of dense models only are
    refused). Returns the final figures as a dict.

    Learning-rate schedules (--schedule --warmup --final-lr-ratio --decay-steps) apply to both rates and
    are stored with the model: a run given none of these flags continues the stored schedule exactly; a
    run given any of them starts a new schedule at the model's current step, unless they describe the
    stored schedule (same kind, warmup, final ratio and decay end), which then continues.

    Args:
        model: HDF5 model file (created if missing).
        steps: SGD steps to run now (default 1000).
        until_step: train until the model's step is N instead (none if it is there already).
        layers: core layers L for a new model (default 1000000).
        width: core width w for a new model (default 4).
        activation: core activation for a new model (default softsign).
        alpha: residual scale for a new model; default 1/sqrt(layers).
        seed: seed of a new model's weights and minibatches.
        batch: minibatch size (default 16, or the model's last).
        lr: SGD learning rate of both the core layers and the heads (--layer-lr and --head-lr override it).
        layer_lr: SGD learning rate of the core layers (default 0.05, or the model's last).
        head_lr: SGD learning rate of the input and output heads (default 0.05, or the model's last).
        chunk_layers: layers per kernel call and per read from the file (does not change results);
            lengthened for deep models to at most 1000 chunks a pass, up to 64 MiB each (1B layers at
            width 2: 1M-layer chunks); in RAM (--in-memory) at least 1M. A streamed core larger than
            1/16 of the RAM is read and written with its pages released from the page cache (memory
            bounded whatever the depth).
        train_limit: draw minibatches from the first N training images (default 60000, or the model's last).
        report_every: print a report every N steps (figures are means over those steps).
        test_samples: test samples evaluated at the end (default the whole test set; 0 skips it).
        in_memory: hold the core weights in RAM instead of streaming them from the file.
        checkpoint_every: write the model file every N steps (in memory: an atomic replacement; streamed:
            an fsync); default every 10 minutes of training, and always at the end and on Ctrl-C.
        resume_torn: train on from a file holding a torn step (a writer killed mid-step), accepting its
            mixed state as the last committed step; without it such a file is refused.
        holdout: set the last N training images aside (never trained on) and measure the accuracy on
            them every --eval-every steps (default: the model's last, else none; 0: none).
        eval_every: steps between held-out evaluations (with --holdout).
        keep_best: write the model at its best held-out accuracy so far to MODEL.best.h5 beside it (with
            --holdout and --eval-every).
        patience: stop after N held-out evaluations in a row without a new best (with --holdout and
            --eval-every); the run then saves and runs the test evaluation as usual.
        schedule: learning-rate schedule: constant, cosine, linear (decay after the warmup), or
            step:T1=LR1[,T2=LR2...] (the layer rate becomes LR1 T1 steps after the schedule starts, and
            the head rate keeps its ratio to it).
        warmup: steps of linear warmup at the start of the schedule.
        final_lr_ratio: the fraction of the base rates a cosine/linear decay ends at (default 0).
        decay_steps: the global step where the decay ends (default: the end of this run).
        ema: keep an exponential moving average of the weights with this decay, e.g. 0.999 (needs
            --in-memory: a second copy of the core in RAM); the end reports both test accuracies.
        ema_every: Lookahead-style: every K steps move the average towards the weights (by 1 - ema) and
            write it back into them, instead of averaging after every step.
        branch: "mlp" gives a NEW model a residual MLP branch whose logits are added to the core's.
        hidden: the branch's hidden units (with --branch mlp).
        data: what to learn from: mnist (default), idx:DIR (the four IDX files of a dataset laid out
            as MNIST), npz:FILE (x, y, optional x_test, y_test) or teacher:FILE (`deepnet teacher`); an
            existing model's default is what it was created with.
        coarsen: a new model's inputs: each K x K cell of an image as two bytes, its max and the ratio
            VAL2 with max*VAL2/255 ~ its average (1: the pixels; default).
        decode: how coarse cells become inputs: ratio (max/255 and max*VAL2/255/255; default) or raw
            (max/255 and VAL2/255).
        loss: a new model's loss: xent (softmax cross-entropy on labels; default) or mse (mean squared
            error on a teacher's outputs; the default with --data teacher:FILE).
        data_dir: MNIST directory; default $DEEPNET_DATA, else a per-user cache (fetched if empty).
        micro_batches: under mpiexec, cut each batch into this many micro-batches that move through the
            ranks one behind the other (default: 1 at two ranks; from three ranks, up to 2 x the ranks,
            of at least 16 samples each).
        rank_timeout: under mpiexec, end the job with an error naming a rank that sent nothing for this
            many seconds, as one that died or hangs would.
        mode: exact (exact SGD through the whole depth) or mach: under mpiexec -n S, S sections train
            asynchronously, with own heads, synthetic inputs and late gradients (docs/MACH.md).
        sections: Mach sections S (one MPI rank each; the model has S shards).
        mach_inputs: mixed (a section takes the newest real input waiting, else a synthetic one;
            default) or real (it waits for a real one: forward-locked).
        local_weight: weight of a section's own loss in its layers' gradient (default 1).
        delayed_weight: weight of the late gradient from the section above (default 1).
        max_delay: drop late gradients more than N steps old (default 8; 0: wait for them).
        distill_hidden: hidden units of each section's distilled input model (default 32).
        distill_lr: SGD rate of the distilled input models' regression (default 0.01).
        time_limit: end a Mach run by this many seconds (at the step the slowest section reaches).
        progress: show progress bars on stderr.
        on_report: called with each report row (a dict).
    """
    given = locals()
    options = TrainOptions(**{f.name: given[f.name] for f in fields(TrainOptions)})
    options.check()
    if mode == "mach":
        return _mach.train_mach(options, progress=progress, on_report=on_report or ignore_report)
    ranks = _mpi.world(rank_timeout)
    if ranks is not None:
        return _distributed.train_distributed(options, ranks, progress=progress,
                                              on_report=on_report or ignore_report)
    if micro_batches is not None:
        raise ConfigError("--micro-batches applies to a run over several MPI ranks (mpiexec -n P deepnet train)")
    if _kind_or_none(model) == KIND_MLP:
        return _train_mlp_file(given)
    return _recipe.train(options, progress=progress, on_report=on_report or ignore_report)


#: The flags of `train` that an MLP model file takes (train_mlp has the same names).
_MLP_FLAGS = frozenset({"steps", "until_step", "batch", "lr", "schedule", "seed", "train_limit", "report_every",
                        "test_samples", "hidden", "data", "coarsen", "decode", "data_dir"})


def _train_mlp_file(given: dict) -> dict:
    """`train` on an existing MLP model file: train_mlp with the flags given, refusing the dense-only ones."""
    defaults = {name: p.default for name, p in inspect.signature(train).parameters.items()}
    changed = [name for name, value in given.items()
               if name not in ("model", "progress", "on_report") and value != defaults[name]]
    dense_only = [name for name in changed if name not in _MLP_FLAGS]
    if dense_only:
        flags = ", ".join("--" + name.replace("_", "-") for name in dense_only)
        raise ConfigError(f"{os.fspath(given['model'])} is an MLP model; {flags} "
                          f"{'applies' if len(dense_only) == 1 else 'apply'} to dense models only")
    kwargs = {name: given[name] for name in changed}
    return train_mlp(given["model"], progress=given["progress"], on_report=given["on_report"], **kwargs)


def _kind_or_none(model: PathLike) -> str | None:
    """A model file's kind, or None where it cannot be told (the open that follows says why)."""
    try:
        return model_kind(model)
    except ModelFileError:  # locked by a training run: the dense path's own open says so
        return None


def evaluate(model: PathLike = "model.h5", *, test_samples: int | None = None, batch: int | None = None,
             chunk_layers: int = R.chunk_layers, in_memory: bool = False, use_ema: bool = False,
             section: int | None = None, synthetic: bool = False, data: str | None = None,
             data_dir: PathLike | None = None, progress: bool = False) -> dict:
    """Evaluate a model on the test set of its data (MNIST unless it was trained on other data), through
    its own input transform: loss, accuracy, elapsed time (returned as a dict).

    Works on either kind of model file: a dense model runs its core (streamed, or read into RAM with
    --in-memory), an MLP model its two layers (``hidden`` in the result says so).

    Args:
        model: HDF5 model file (dense or mlp).
        test_samples: evaluate the first N test samples (default all).
        batch: images per forward pass (default 1024 for a dense model, 1000 for an MLP).
        chunk_layers: layers per kernel call and per read from the file (dense); lengthened for deep
            models to at most 1000 chunks a pass, up to 64 MiB each; in RAM at least 1M.
        in_memory: load the core weights into RAM first (dense).
        use_ema: evaluate the weight average stored by training with --ema (dense; read into RAM).
        section: a model trained with --mode mach: evaluate the stack of sections 0..K with section K's
            own output head (read into RAM).
        synthetic: with --section K: section K alone, fed by its distilled input model instead of the
            sections below it.
        data: evaluate on another source of the same inputs and classes (mnist, idx:DIR, npz:FILE,
            teacher:FILE); default the one the model was trained on.
        data_dir: MNIST directory; default $DEEPNET_DATA, else a per-user cache (fetched if empty).
        progress: show a progress bar on stderr.
    """
    if synthetic and section is None:
        raise ConfigError("--synthetic needs --section K (the section fed by its distilled input model)")
    if section is not None:
        if use_ema:
            raise ConfigError("--use-ema and --section cannot be combined (a Mach model has no weight average)")
        return evaluate_section(model, section, synthetic=synthetic, samples=test_samples,
                                batch=DEFAULT_EVAL_BATCH if batch is None else batch, chunk_layers=chunk_layers,
                                data=data, data_dir=data_dir)
    if _kind_or_none(model) == KIND_MLP:
        if use_ema:
            raise ConfigError(f"{os.fspath(model)} is an MLP model, which has no weight average (--use-ema)")
        return evaluate_mlp(model, test_samples=test_samples, batch=_MLP_EVAL_BATCH if batch is None else batch,
                            data=data, data_dir=data_dir)
    return _recipe.evaluate(model, samples=test_samples, batch=DEFAULT_EVAL_BATCH if batch is None else batch,
                            chunk_layers=chunk_layers, in_memory=in_memory, use_ema=use_ema, data=data,
                            data_dir=data_dir, progress=progress)


def speedrun(model: PathLike | None = None, *, target_acc: float = _SR.target_acc, layers: int = _SR.layers, width: int = _SR.width,
             activation: str = _SR.activation, batch: int = _SR.batch, layer_lr: float = _SR.layer_lr,
             head_lr: float = _SR.head_lr, schedule: str = _SR.schedule, warmup: int = _SR.warmup,
             final_lr_ratio: float = _SR.final_lr_ratio, eval_every: int = _SR.eval_every,
             eval_gate: float = _SR.eval_gate, holdout: int = _SR.holdout, max_steps: int = _SR.max_steps,
             seed: int = _SR.seed, in_memory: bool = _SR.in_memory, chunk_layers: int = _SR.chunk_layers,
             test_samples: int | None = _SR.test_samples, report_every: int = _SR.report_every,
             data: str = _SR.data, coarsen: int | tuple | None = None, workdir: PathLike | None = None,
             data_dir: PathLike | None = None, progress: bool = False, on_report: OnReport | None = None) -> dict:
    """Time to a target accuracy: train a fresh model until its held-out accuracy reaches --target-acc.

    Trains on the first 60000 - --holdout training images, evaluates the last --holdout every
    --eval-every steps (skipped while the mean batch accuracy since the last evaluation is more than
    --eval-gate below the target), stops at the target, then evaluates the full test set. The headline,
    time to target, is wall clock from the first step to the end of the evaluation that reached it:
    held-out evaluations included; data loading, model creation and the test evaluation excluded.
    Every default is deepnet.training.speedrun.SPEEDRUN. Exit status 1 if --max-steps ran out first.
    Returns the report as a dict (``reached`` False if --max-steps ran out first).

    Args:
        model: keep the trained model here (must not exist); default a temporary file, removed.
        target_acc: held-out accuracy to reach.
        layers: core layers L.
        width: core width w.
        activation: core activation.
        batch: minibatch size.
        layer_lr: SGD learning rate of the core.
        head_lr: SGD learning rate of the heads.
        schedule: constant, cosine or linear (decaying over --max-steps).
        warmup: warmup steps.
        final_lr_ratio: the fraction of the rates a decay ends at.
        eval_every: steps between held-out evaluations.
        eval_gate: skip an evaluation while the mean batch accuracy since the last one is more than this
            below the target (1 never skips).
        holdout: held-out images (the last N training images).
        max_steps: give up after this many steps.
        seed: seed of the weights and minibatches.
        in_memory: hold the core in RAM (default; --noin-memory streams it from the file).
        chunk_layers: layers per kernel call (in RAM at least 1M).
        test_samples: test images of the final evaluation (default all).
        report_every: a table row every N steps.
        data: the training data: mnist, idx:DIR or npz:FILE (see train).
        coarsen: K x K cells of each image as (max, VAL2) bytes (see train; 1: the pixels).
        workdir: directory of the temporary model (default the system's temporary directory).
        data_dir: MNIST directory; default $DEEPNET_DATA, else a per-user cache (fetched if empty).
        progress: show progress bars on stderr (no remaining time: the run stops at its target).
        on_report: called with each report row (a dict).
    """
    given = locals()
    overrides = {f.name: given[f.name] for f in fields(_speedrun.SpeedrunRecipe)}
    return _speedrun.speedrun(model=model, workdir=workdir, data_dir=data_dir, progress=progress,
                              on_report=on_report or ignore_report, **overrides)


def info(model: PathLike) -> dict:
    """Show what is in a model file: shape, activation, step, size, last logged figures.

    Args:
        model: HDF5 model file.
    """
    return _info.model_info(model)


def check(model: PathLike) -> CheckReport:
    """Check a model file: format, shapes, dtypes, attributes, every weight finite, and whether it holds
    a committed step (healthy) or a step its writer was killed in the middle of (torn).

    Exit status 0 only for a healthy file; 1 for a torn or damaged one (the report says what is wrong);
    2 if it cannot be read as a deepnet model at all.

    Args:
        model: HDF5 model file.
    """
    return check_model(model)


def bench(*, layers: int = 10_000_000, width: int = 4, activation: str = "softsign", batch: int = 16,
          steps: int = 3, streamed: bool = False, chunk_layers: int = R.chunk_layers, eval_samples: int = 0,
          eval_batch: int = 1024, workdir: PathLike | None = None, threads: int = 0) -> dict:
    """Time exact SGD steps of the reference workload (10M layers, width 4, softsign, batch 16) here.

    Creates a temporary model (layers x (width*width+width) x 4 bytes on disk), runs warm-up steps
    (the first, then until the choices of threads and backward layout are made: 7 on two cores; 1
    with --threads), times --steps steps, and reports the median seconds per step, layer-samples per
    second, the threads each timed step's forward and backward passes ran on, the backward's batch
    block and how its threads split it (by blocks or segments), and (on Linux) how much
    of the machine's CPU time a hypervisor took for others meanwhile: on a shared virtual machine,
    how disturbed the figures are. The kernels are the fastest build this CPU runs (AVX-512, AVX2 or
    portable), reported as "kernels"; $DEEPNET_KERNELS=portable|avx2|avx512 picks one.

    Args:
        layers: core layers.
        width: core width.
        activation: core activation.
        batch: minibatch size.
        steps: timed steps (after the warm-up steps, reported apart); the median is reported.
        streamed: stream the weights from the file instead of holding them in RAM.
        chunk_layers: layers per kernel call and per read (lengthened for deep models to at most 1000
            chunks a pass, up to 64 MiB each; in RAM at least 1M).
        eval_samples: also time forward-only evaluation of this many test images (0: skip).
        eval_batch: images per evaluation forward pass.
        workdir: directory for the temporary model (default: the system temp dir).
        threads: run every pass on this many threads (at most the CPUs, or $DEEPNET_THREADS) instead of
            letting the thread choice measure one against two, as training does (0).
    """
    writable_directory("workdir", workdir)
    return _bench.run_bench(layers=layers, width=width, activation=activation, batch=batch, steps=steps,
                            in_memory=not streamed, chunk_layers=chunk_layers, eval_images=eval_samples,
                            eval_batch=eval_batch, workdir=workdir, threads=threads)


def train_mlp(model: PathLike = "mlp.h5", *, hidden: int | None = None, steps: int | None = None,
              until_step: int | None = None, batch: int = _MLP.batch, lr: float = _MLP.lr,
              schedule: str = _MLP.schedule, seed: int = _MLP.seed, train_limit: int | None = _MLP.train_limit,
              report_every: int = _MLP.report_every, test_samples: int | None = _MLP.test_samples,
              threads: int = _MLP.threads, data: str | None = None, coarsen: int | tuple | None = None,
              decode: str | None = None, data_dir: PathLike | None = None, progress: bool = False,
              on_report: OnReport | None = None) -> dict:
    """Train the baseline 784-hidden-10 ReLU MLP (NumPy, minibatch SGD), creating the file if missing
    (inputs and classes as the data gives them: --data, --coarsen).

    The defaults are deepnet.training.mlp.MLP_RECIPE (hidden 512, batch 128, lr 0.2 cosine, 15000 steps).
    The original experiment's run: --hidden 128 --batch 128 --steps 5000 --lr 0.05 --schedule step:2500=0.03.
    An existing model continues from its saved step; --hidden must then agree with the file. With
    --steps the schedule runs over this run's steps; with --until-step N it runs over the model's steps
    0 to N, so the same command run again after an interruption finishes the plan exactly. Ctrl-C (or
    SIGTERM) finishes the current step, saves and stops. Returns the final figures as a dict.

    Args:
        model: HDF5 model file of kind mlp (created if missing).
        hidden: hidden units of a new model (default 512).
        steps: SGD steps to run now (default 15000).
        until_step: train until the model's step is N instead (none if it is there already).
        batch: minibatch size.
        lr: learning rate at the start of the schedule.
        schedule: cosine (lr -> 0 over the run), linear, constant, or step:T1=LR1[,T2=LR2...] (lr until
            step T1 of the run, then LR1, ...).
        seed: seed of a new model's weights (He/Xavier-uniform) and minibatches.
        train_limit: draw minibatches from the first N training images (default all).
        report_every: print a report and save the file every N steps.
        test_samples: test samples evaluated at the end (default the whole test set; 0 skips it).
        threads: BLAS threads while training (0: BLAS's default; 1 is robust on a shared machine).
        data: mnist (default), idx:DIR or npz:FILE (as for train); an existing model's default is its own.
        coarsen: a new model's inputs: K x K cells of each image as (max, VAL2) bytes (as for train).
        decode: how coarse cells become inputs: ratio (default) or raw (as for train).
        data_dir: MNIST directory; default $DEEPNET_DATA, else a per-user cache (fetched if empty).
        progress: show a progress bar on stderr.
        on_report: called with each report row (a dict).
    """
    return _mlp_training.train_mlp(model, hidden=hidden, steps=steps, until_step=until_step, batch=batch, lr=lr,
                                   schedule=schedule, seed=seed, train_limit=train_limit,
                                   report_every=report_every, test_samples=test_samples, threads=threads,
                                   data=data, coarsen=coarsen, decode=decode, data_dir=data_dir, progress=progress,
                                   on_report=on_report or ignore_report)


def evaluate_mlp(model: PathLike = "mlp.h5", *, test_samples: int | None = None, batch: int = _MLP_EVAL_BATCH,
                 data: str | None = None, data_dir: PathLike | None = None) -> dict:
    """Evaluate an MLP model on the test set of its data: loss, accuracy, elapsed time (returned as a dict).

    `deepnet eval` does the same for either kind of model; this command reads MLP models only.

    Args:
        model: HDF5 model file of kind mlp.
        test_samples: evaluate the first N test samples (default all).
        batch: images per forward pass.
        data: evaluate on another source of the same inputs and classes; default the model's own.
        data_dir: MNIST directory; default $DEEPNET_DATA, else a per-user cache (fetched if empty).
    """
    return _mlp_training.evaluate_mlp(model, samples=test_samples, batch=batch, data=data, data_dir=data_dir)


def import_raw(model: PathLike | None = None, *, head: PathLike | None = None, weights: PathLike | None = None,
               kind: str = "dense", layers: int | None = None, width: int | None = None,
               activation: str | None = None, alpha: float | None = None, hidden: int | None = None,
               seed: int = 0, overwrite: bool = False, progress: bool = False) -> dict:
    """Make a model file from the original experiment's raw little-endian float32 files.

    Dense: --weights holds L rows of [W (w x w, input-major) | b (w)]; --head holds input_w (784 x w) |
    input_b (w) | output_w (w x 10) | output_b (10). MLP (--kind mlp --hidden H): --head holds
    w1 (784 x H) | b1 | w2 (H x 10) | b2. File sizes are checked before anything is written; the model
    is built under a temporary name and renamed into place when complete. Returns what was imported.

    Args:
        model: HDF5 model file to create.
        head: raw head file (dense) or the whole raw MLP (mlp).
        weights: raw core weights file (dense only).
        kind: dense or mlp.
        layers: core layers L (dense).
        width: core width w (dense).
        activation: core activation (dense; the raw files do not record it).
        alpha: residual scale (dense); default 1/sqrt(layers).
        hidden: hidden units (mlp).
        seed: seed stored in the model (it seeds the minibatches of later training).
        overwrite: replace an existing model file.
        progress: show a progress bar on stderr.
    """
    return _raw.import_raw(model, head=head, weights=weights, kind=kind, layers=layers, width=width,
                           activation=activation, alpha=alpha, hidden=hidden, seed=seed, overwrite=overwrite,
                           progress=progress)


def export_raw(model: PathLike | None = None, *, head: PathLike | None = None, weights: PathLike | None = None,
               overwrite: bool = False, progress: bool = False) -> dict:
    """Write a model's parameters as the original experiment's raw float32 files (see import-raw).

    A dense model writes --weights (streamed) and --head; an mlp model writes --head only. Each file is
    written under a temporary name and renamed into place when complete. Returns what was written.

    Args:
        model: HDF5 model file (dense or mlp).
        head: raw head file to write (the whole MLP for an mlp model).
        weights: raw core weights file to write (dense only).
        overwrite: replace existing output files.
        progress: show a progress bar on stderr.
    """
    return _raw.export_raw(model, head=head, weights=weights, overwrite=overwrite, progress=progress)


def shard(model: PathLike, *, ranks: int | None = None, out: PathLike | None = None, overwrite: bool = False,
          progress: bool = False) -> dict:
    """Split a dense model file along its depth for `mpiexec -n RANKS deepnet train`: a root file and one shard
    file per rank.

    The root (default MODEL's name with .sharded.h5) holds everything but the core: attributes, heads,
    training log, evaluations, commit record; its /core/weights is a virtual dataset over the shard files,
    which hold contiguous, balanced ranges of layers in the directory beside it (OUT's name with .shards).
    MODEL is left as it is; `deepnet gather` joins the shards back. Returns the root and its shards.

    Args:
        model: the dense HDF5 model file to split (it must hold a committed step).
        ranks: the number of shards, one per MPI rank (at most the number of layers).
        out: the root file to write; default MODEL's name with .sharded.h5.
        overwrite: replace an existing root (and its shard versions).
        progress: show a progress bar on stderr.
    """
    if ranks is None:
        raise ConfigError("--ranks is required: the number of shards, one per MPI rank")
    return _shards.shard_model(model, ranks, out, overwrite=overwrite, progress=progress)


def gather(model: PathLike, *, out: PathLike | None = None, overwrite: bool = False, progress: bool = False) -> dict:
    """Join a sharded model (its root file and shard files) into one ordinary model file.

    Every shard's core is checked against the checksum the root records; the root and its shards are left as
    they are. The new file holds the same weights, heads, log, evaluations and commit record. Returns what
    was written.

    Args:
        model: the root file of the sharded model.
        out: the model file to write.
        overwrite: replace an existing output file.
        progress: show a progress bar on stderr.
    """
    if out is None:
        raise ConfigError("--out is required: the model file to write (-o OUT)")
    return _shards.gather_model(model, out, overwrite=overwrite, progress=progress)


def plot(model: PathLike, *, out: PathLike | None = None, smooth: int = 0, size: str = "1200x800") -> dict:
    """Draw a model's training curves (loss and accuracy vs step, raw and moving average) into an image.

    Needs matplotlib (pip install 'deepnet[plot]'). Works for dense and mlp model files. Returns the
    image's path, the log rows drawn and the moving-average window.

    Args:
        model: HDF5 model file with a training log.
        out: image to write (.png; .svg and .pdf work too); default the model's path with .png.
        smooth: moving-average window in steps (0: about 1/50 of the log).
        size: image size in pixels, WIDTHxHEIGHT.
    """
    width, height = parse_size(size)
    return plot_training(model, out, smooth=smooth, width=width, height=height)


def list_activations() -> dict:
    """List the activations (built-in and plugins): name, origin (built-in or the plugin's package),
    whether its kernel is compiled (built in, cached, or not yet: plugins compile on first use) and
    description; ``problems`` are the plugins that failed to load, one line each.

    Args:
    """
    rows = []
    for name in _activations.available():
        act = _activations.get(name)
        rows.append({"name": name, "origin": act.origin, "compiled": _jit.status(act), "description": act.description})
    return {"activations": rows, "problems": _plugins.errors()}


def check_activation(name: str | None = None) -> dict:
    """Check an activation: run NAME's compiled kernel (compiling it if needed) over a grid of z, compare
    the C derivative with central finite differences of the C forward and both with the NumPy
    versions; the result says the worst errors and whether all are within their tolerances (``ok``).

    Args:
        name: the activation to check.
    """
    if not name:
        raise ConfigError("deepnet activations check needs the activation's name")
    return _activation_check.check_activation(name)


def compile_activations(name: str | None = None) -> list[dict]:
    """Compile NAME's kernel ahead of its first use (default: every activation not compiled yet); returns
    each one's name, module and path.

    Args:
        name: the activation to compile (default: every one not compiled yet).
    """
    names = [name] if name else [n for n in _activations.available()
                                 if _jit.status(_activations.get(n)) == "not yet"]
    out = []
    for act_name in names:
        module = kernels_for(act_name).module
        out.append({"name": act_name, "module": module.__name__, "path": getattr(module, "__file__", None)})
    return out
