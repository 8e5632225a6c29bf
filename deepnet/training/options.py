"""The options of a dense training run: the recipe's defaults, the flags as one value, and the optional
parts of the run set up from them and called from the training loop.

``TrainOptions`` holds every flag of ``deepnet.train`` (the API function builds it; adding a training flag
touches that function and this class). ``RunOptions`` sets up and runs the optional parts:

- learning-rate schedules (deepnet.training.schedule): the layer and head rates of each step;
- held-out evaluation (deepnet.training.heldout): ``--holdout N --eval-every K``;
- the weight average (deepnet.training.ema): ``--ema DECAY [--ema-every K]``, in memory only;
- the MLP branch (deepnet.nn.branch): chosen when the model is created; checked here when it exists;
- the best held-out accuracy (deepnet.training.best): ``--keep-best``, ``--patience K``.

The run's length is ``--steps K`` (K more steps; RECIPE.steps when neither is given) or ``--until-step N``
(until the model's step is N: a rerun after an interruption finishes the original plan).

The stored training settings (the commit record's ``train`` entry, committed with every step) hold the
schedules and the held-out split beside batch, learning rates and train_limit, so a resumed run goes on
exactly as an uninterrupted one; each flag given explicitly replaces its stored value.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepnet import activations
from deepnet.data.dataset import Dataset
from deepnet.errors import ConfigError
from deepnet.flags import int_at_least, non_negative_number, positive
from deepnet.nn import branch as _branch
from deepnet.nn.network import DEFAULT_CHUNK_LAYERS, DeepNet, EvalResult
from deepnet.training import best as _best
from deepnet.training import ema as _ema
from deepnet.training import heldout as _heldout
from deepnet.training import schedule as _schedule
from deepnet.training.loop import Hook, StepEvent


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
    test_samples: int | None = None  # the final test evaluation (None: the whole test set; 0 skips it)
    #: In memory, the model file is replaced (atomically) this often unless --checkpoint-every is given.
    checkpoint_seconds: float = 600.0


RECIPE = Recipe()

#: How the core is trained: exact SGD (one process, or pipelined over MPI ranks), or Mach sections.
MODES = ("exact", "mach")

#: The flags of --mode mach only.
MACH_FLAGS = ("sections", "mach_inputs", "local_weight", "delayed_weight", "max_delay", "distill_hidden",
              "distill_lr", "time_limit")


@dataclass(frozen=True)
class TrainOptions:
    """Every flag of a dense training run (see ``deepnet.api.train`` for what each means).

    None means "not given": the model's stored value when it has one, else the RECIPE's.
    """

    model: str | Path = "model.h5"
    steps: int | None = None
    until_step: int | None = None
    layers: int | None = None
    width: int | None = None
    activation: str | None = None
    alpha: float | None = None
    seed: int = RECIPE.seed
    batch: int | None = None
    lr: float | None = None
    layer_lr: float | None = None
    head_lr: float | None = None
    chunk_layers: int = RECIPE.chunk_layers
    train_limit: int | None = None
    report_every: int = RECIPE.report_every
    test_samples: int | None = RECIPE.test_samples
    in_memory: bool = False
    checkpoint_every: int | None = None
    resume_torn: bool = False
    holdout: int | None = None
    eval_every: int | None = None
    schedule: str | None = None
    warmup: int | None = None
    final_lr_ratio: float | None = None
    decay_steps: int | None = None
    ema: float | None = None
    ema_every: int | None = None
    keep_best: bool = False
    patience: int | None = None
    branch: str | None = None
    hidden: int | None = None
    data_dir: str | Path | None = None
    data: str | None = None
    coarsen: int | None = None
    decode: str | None = None
    loss: str | None = None
    micro_batches: int | None = None
    rank_timeout: float = 300.0
    mode: str = "exact"
    sections: int | None = None
    mach_inputs: str | None = None
    local_weight: float | None = None
    delayed_weight: float | None = None
    max_delay: int | None = None
    distill_hidden: int | None = None
    distill_lr: float | None = None
    time_limit: float | None = None

    def check(self) -> None:
        """Refuse a bad value with one line naming its flag, before any data is read or file created."""
        if self.steps is not None and self.until_step is not None:
            raise ConfigError("--steps (more steps) and --until-step (the step to end at) cannot both be given")
        if self.until_step is not None:
            int_at_least("until-step", self.until_step, 0)
        for name, value in (("chunk-layers", self.chunk_layers), ("report-every", self.report_every)):
            positive(name, value)
        for name, value in (("steps", self.steps), ("batch", self.batch), ("train-limit", self.train_limit),
                            ("checkpoint-every", self.checkpoint_every), ("layers", self.layers),
                            ("width", self.width)):
            if value is not None:
                positive(name, value)
        for name, value in (("lr", self.lr), ("layer-lr", self.layer_lr), ("head-lr", self.head_lr)):
            if value is not None:
                non_negative_number(name, value)
        if self.test_samples is not None:
            int_at_least("test-samples", self.test_samples, 0)
        _best.check_options(self.keep_best, self.patience)
        int_at_least("seed", self.seed, 0)
        if self.alpha is not None:
            positive("alpha", self.alpha, float)
        if self.activation is not None:
            activations.get(self.activation)
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.mode != "mach":
            given = [name for name in MACH_FLAGS if getattr(self, name) is not None]
            if given:
                raise ConfigError(f"--{given[0].replace('_', '-')} applies to --mode mach")
        if self.sections is not None:
            int_at_least("sections", self.sections, 2, " (one section is exact SGD: drop --mode mach)")
        if self.time_limit is not None:
            positive("time-limit", self.time_limit, float)

    def planned_steps(self, first_step: int) -> int:
        """The steps of a run starting at the model's ``first_step``: --steps, else up to --until-step
        (none if the model is there already), else RECIPE.steps."""
        if self.until_step is None:
            return RECIPE.steps if self.steps is None else self.steps
        if self.until_step < first_step:
            raise ConfigError(f"--until-step {self.until_step} is before the model's step {first_step}")
        return self.until_step - first_step

    @property
    def new_layers(self) -> int:
        """The layers of a model created by this run."""
        return RECIPE.layers if self.layers is None else self.layers

    @property
    def new_width(self) -> int:
        """The width of a model created by this run."""
        return RECIPE.width if self.width is None else self.width

    @property
    def new_activation(self) -> str:
        """The activation of a model created by this run."""
        return RECIPE.activation if self.activation is None else self.activation

    def expect(self) -> dict:
        """The shape given, which an existing model must agree with."""
        return {k: v for k, v in (("layers", self.layers), ("width", self.width), ("activation", self.activation))
                if v is not None}


class RunOptions(Hook):
    """What a training run does besides plain SGD steps (all of it optional)."""

    def __init__(self, options: TrainOptions) -> None:
        # Cheap checks first: a bad flag is refused before any data is read or file created.
        _ema.check_options(options.ema, options.ema_every, options.in_memory)
        self.branch, self.hidden = _branch.check_options(options.branch, options.hidden)
        if options.holdout is not None:
            int_at_least("holdout", options.holdout, 0)
        if options.eval_every is not None:
            int_at_least("eval-every", options.eval_every, 1)
        self.flags = {"kind": options.schedule, "warmup": options.warmup, "final_ratio": options.final_lr_ratio,
                      "decay_steps": options.decay_steps}
        _schedule.resolve(None, step=0, run_end=1, default=_schedule.Schedule(), **self.flags)  # the values alone
        self.keep_best, self.patience = options.keep_best, options.patience
        self.holdout_flag = options.holdout
        self.eval_every_flag = options.eval_every
        self.ema_decay = options.ema
        self.ema_every = options.ema_every
        self.schedules: dict[str, _schedule.Schedule] = {}
        self.holdout, self.eval_every = 0, None
        self.base = {"layer_lr": 0.0, "head_lr": 0.0}
        self.heldout: _heldout.HeldOut | None = None
        self.average: _ema.WeightAverage | None = None
        self.best: _best.Best | None = None
        self.stored_best: dict | None = None
        self.net: DeepNet | None = None

    def check_new_model(self, layers: int, width: int) -> None:
        """Before a new model is created: refuse EMA if the core and its copy would not fit."""
        if self.ema_decay is not None:
            _ema.check_fits(layers * (width * width + width) * 4, resident=False)

    def new_model_branch(self) -> dict:
        """init()'s branch arguments for a new model."""
        return {"branch": self.branch, "hidden": self.hidden}

    def plan(self, stored: dict | None, settings: dict, *, train_limit: int | None, default_train_limit: int,
             n_train: int, first_step: int, steps: int) -> None:
        """Check this run's settings against the model's ``stored`` ones (None: a new model) and the data
        (``n_train`` training images), and complete ``settings`` in place: train_limit with the held-out
        images set aside, the held-out split, the schedules. Touches no file, so a new model's run is
        planned (and refused) before its file is created."""
        stored = stored or {}
        holdout = self.holdout_flag if self.holdout_flag is not None else stored.get("holdout", 0) or 0
        eval_every = self.eval_every_flag if self.eval_every_flag is not None else stored.get("eval_every")
        if not holdout:
            eval_every = None if self.eval_every_flag is None else eval_every
        self.holdout, self.eval_every = _heldout.check_options(holdout, eval_every, n_train)
        settings["train_limit"] = _heldout.train_limit(train_limit, stored.get("train_limit"),
                                                       default_train_limit, n_train, self.holdout)
        _best.require_heldout(self.keep_best, self.patience, self.holdout)
        if self.holdout:  # stored only when in use: a plain run's settings are what they always were
            settings["holdout"], settings["eval_every"] = self.holdout, self.eval_every
            self.stored_best = _best.stored_best(stored, self.holdout)
            if self.stored_best is not None:
                settings[_best.KEY] = dict(self.stored_best)
        self.schedules = _schedule.resolve(stored, step=first_step, run_end=first_step + steps,
                                           default=_schedule.Schedule(), kind=self.flags["kind"],
                                           warmup=self.flags["warmup"], final_ratio=self.flags["final_ratio"],
                                           decay_steps=self.flags["decay_steps"])
        if any(s != _schedule.Schedule() for s in self.schedules.values()):  # likewise
            settings.update(_schedule.settings(self.schedules))
        self.base = {"layer_lr": float(settings["layer_lr"]), "head_lr": float(settings["head_lr"])}

    def prepare(self, net: DeepNet, settings: dict, dataset: Dataset) -> None:
        """Set the run planned with ``settings`` up on the open ``net``: its branch checked, the held-out
        slice of ``dataset`` attached, the weight average started."""
        self.net = net
        n_train = dataset.n_train
        if self.branch is not None:
            have = net.branch
            if have is None:
                raise ConfigError(f"{net.file.path} has no branch: --branch is chosen when a model is created "
                                  f"(init, or train creating the file)")
            if have.hidden != self.hidden:
                raise ConfigError(f"{net.file.path} has an MLP branch of hidden {have.hidden} but --hidden "
                                  f"{self.hidden} was given")
        if self.holdout:
            self.heldout = _heldout.HeldOut(*dataset.train_slice(n_train - self.holdout, n_train), self.eval_every)
            self.heldout.attach(net)
            self.best = _best.Best(net, self.stored_best, keep=self.keep_best, patience=self.patience)
        net.check_step_memory(int(settings["batch"]))
        self.average = _ema.resume(net, self.ema_decay, self.ema_every)

    def lrs(self, step: int) -> dict:
        """The learning rates of the step taken from committed ``step``."""
        layer_lr, head_lr = _schedule.rates(self.schedules["layer_schedule"], self.schedules["head_schedule"],
                                            self.base["layer_lr"], self.base["head_lr"], step)
        return {"layer_lr": layer_lr, "head_lr": head_lr}

    def after_step(self, event: StepEvent) -> None:
        """After each step: update the average; measure the held-out accuracy when due."""
        if self.average is not None:
            self.average.after_step(self.net)
        if self.heldout is not None and self.heldout.due(self.net.step):
            event.heldout = self.heldout.measure(self.net)

    def finish(self, net: DeepNet, test: tuple[np.ndarray, np.ndarray] | None, final: dict) -> None:
        """Add the run's extra figures to ``final`` (after its test evaluation of the live weights)."""
        if self.heldout is not None and self.heldout.last is not None:
            step, _, acc = self.heldout.last
            final.update(heldout_acc=acc, heldout_step=step, heldout_samples=self.heldout.size)
        if self.best is not None:
            final.update(self.best.figures())
        if self.average is not None:
            final.update(ema_decay=self.average.decay, ema_every=self.average.every)
            with self.average.swapped_in(net):
                if test is not None:
                    result: EvalResult = net.evaluate(*test)
                    final.update(ema_test_loss=result.loss, ema_test_acc=result.accuracy)
                if self.heldout is not None:
                    result = net.evaluate(self.heldout.x, self.heldout.y)
                    final.update(ema_heldout_acc=result.accuracy)

    def close(self) -> None:
        """Release what the run holds (the weight average's copy of the core)."""
        if self.average is not None:
            self.average.close()
