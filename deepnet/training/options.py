"""The optional parts of a dense training run, set up from ``deepnet.train``'s flags and called from its loop.

- learning-rate schedules (deepnet.training.schedule): the layer and head rates of each step;
- held-out evaluation (deepnet.training.heldout): ``--holdout N --eval-every K``;
- the weight average (deepnet.training.ema): ``--ema DECAY [--ema-every K]``, in memory only;
- the MLP branch (deepnet.nn.branch): chosen when the model is created; checked here when it exists.

The stored training settings (the commit record's ``train`` entry, committed with every step) hold the
schedules and the held-out split beside batch, learning rates and train_limit, so a resumed run goes on
exactly as an uninterrupted one; each flag given explicitly replaces its stored value.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from deepnet.nn import branch as _branch
from deepnet.training import ema as _ema
from deepnet.training import heldout as _heldout
from deepnet.training import schedule as _schedule
from deepnet.errors import ConfigError
from deepnet.flags import int_at_least


class RunOptions:
    """What a training run does besides plain SGD steps (all of it optional)."""

    def __init__(self, *, holdout: int | None = None, eval_every: int | None = None, schedule: str | None = None,
                 warmup: int | None = None, final_lr_ratio: float | None = None, decay_steps: int | None = None,
                 ema: float | None = None, ema_every: int | None = None, branch: str | None = None,
                 hidden: int | None = None, in_memory: bool = False) -> None:
        # Cheap checks first: a bad flag is refused before any data is read or file created.
        _ema.check_options(ema, ema_every, in_memory)
        self.branch, self.hidden = _branch.check_options(branch, hidden)
        if holdout is not None:
            int_at_least("holdout", holdout, 0)
        if eval_every is not None:
            int_at_least("eval-every", eval_every, 1)
        self.flags = {"kind": schedule, "warmup": warmup, "final_ratio": final_lr_ratio, "decay_steps": decay_steps}
        if schedule is not None or warmup is not None or final_lr_ratio is not None:
            _schedule.Schedule(kind=schedule or "constant", warmup_steps=warmup or 0,
                               final_ratio=0.0 if final_lr_ratio is None else final_lr_ratio)
        self.holdout_flag = holdout
        self.eval_every_flag = eval_every
        self.ema_decay = ema
        self.ema_every = ema_every
        self.schedules: dict[str, _schedule.Schedule] = {}
        self.base = {"layer_lr": 0.0, "head_lr": 0.0}
        self.heldout: _heldout.HeldOut | None = None
        self.average: _ema.WeightAverage | None = None

    def check_new_model(self, layers: int, width: int) -> None:
        """Before a new model is created: refuse EMA if the core and its copy would not fit."""
        if self.ema_decay is not None:
            _ema.check_fits(layers * (width * width + width) * 4, resident=False)

    def new_model_branch(self) -> dict:
        """init()'s branch arguments for a new model."""
        return {"branch": self.branch, "hidden": self.hidden}

    def prepare(self, net: Any, settings: dict, *, train_limit: int | None, default_train_limit: int,
                images: np.ndarray, labels: np.ndarray, first_step: int, steps: int) -> None:
        """Set the run up on the open ``net``: completes ``settings`` (train_limit with the held-out images
        set aside, the schedules, the held-out split) in place."""
        stored = net.train_settings or {}
        n_train = int(images.shape[0])
        if self.branch is not None:
            have = net.branch
            if have is None:
                raise ConfigError(f"{net.file.path} has no branch: --branch is chosen when a model is created "
                                  f"(init, or train creating the file)")
            if have.hidden != self.hidden:
                raise ConfigError(f"{net.file.path} has an MLP branch of hidden {have.hidden} but --hidden "
                                  f"{self.hidden} was given")

        holdout = self.holdout_flag if self.holdout_flag is not None else stored.get("holdout", 0) or 0
        eval_every = self.eval_every_flag if self.eval_every_flag is not None else stored.get("eval_every")
        if not holdout:
            eval_every = None if self.eval_every_flag is None else eval_every
        holdout, eval_every = _heldout.check_options(holdout, eval_every, n_train)
        settings["train_limit"] = _heldout.train_limit(train_limit, stored.get("train_limit"),
                                                       default_train_limit, n_train, holdout)
        if holdout:  # stored only when in use: a plain run's settings are what they always were
            settings["holdout"], settings["eval_every"] = holdout, eval_every
            from deepnet.training.recipe import mnist_inputs

            self.heldout = _heldout.HeldOut(mnist_inputs(images[n_train - holdout:]), labels[n_train - holdout:],
                                            eval_every)
            self.heldout.attach(net)

        self.schedules = _schedule.resolve(stored, step=first_step, run_end=first_step + steps,
                                           default=_schedule.Schedule(), kind=self.flags["kind"],
                                           warmup=self.flags["warmup"], final_ratio=self.flags["final_ratio"],
                                           decay_steps=self.flags["decay_steps"])
        if any(s != _schedule.Schedule() for s in self.schedules.values()):  # likewise
            settings.update(_schedule.settings(self.schedules))
        self.base = {"layer_lr": float(settings["layer_lr"]), "head_lr": float(settings["head_lr"])}

        if self.ema_decay is not None:
            self.average = _ema.WeightAverage.start(net, self.ema_decay, self.ema_every)

    def lrs(self, step: int) -> dict:
        """The learning rates of the step taken from committed ``step``."""
        return {"layer_lr": self.base["layer_lr"] * self.schedules["layer_schedule"].factor(step),
                "head_lr": self.base["head_lr"] * self.schedules["head_schedule"].factor(step)}

    def after_step(self, net: Any) -> float | None:
        """After each step: update the average; measure the held-out accuracy when due (returned, else None)."""
        if self.average is not None:
            self.average.after_step(net)
        if self.heldout is not None and self.heldout.due(net.step):
            return self.heldout.measure(net)
        return None

    def finish(self, net: Any, test: tuple | None, final: dict) -> None:
        """Add the run's extra figures to ``final`` (after its test evaluation of the live weights)."""
        if self.heldout is not None and self.heldout.last is not None:
            step, _, acc = self.heldout.last
            final.update(heldout_acc=acc, heldout_step=step, heldout_samples=self.heldout.size)
        if self.average is not None:
            final.update(ema_decay=self.average.decay, ema_every=self.average.every)
            with self.average.swapped_in(net):
                if test is not None:
                    result = net.evaluate(*test)
                    final.update(ema_test_loss=result.loss, ema_test_acc=result.accuracy)
                if self.heldout is not None:
                    result = net.evaluate(self.heldout.x, self.heldout.y)
                    final.update(ema_heldout_acc=result.accuracy)

    def close(self) -> None:
        if self.average is not None:
            self.average.close()


def final_fields(final: dict) -> dict:
    """The extra lines of the text summary of a run."""
    fields = {}
    if "heldout_acc" in final:
        fields["held-out"] = (f"accuracy {final['heldout_acc']:.4f} at step {final['heldout_step']} on the last "
                              f"{final['heldout_samples']} training images")
    if "ema_test_acc" in final or "ema_heldout_acc" in final:
        parts = []
        if "ema_test_acc" in final:
            parts.append(f"test loss {final['ema_test_loss']:.4f}, accuracy {final['ema_test_acc']:.4f}")
        if "ema_heldout_acc" in final:
            parts.append(f"held-out accuracy {final['ema_heldout_acc']:.4f}")
        every = f", every {final['ema_every']} steps" if final.get("ema_every") else ""
        fields[f"EMA ({final['ema_decay']:g}{every})"] = "; ".join(parts)
    return fields


def summary(model_file: Any) -> dict:
    """What `deepnet info` adds for a dense model: training settings with the schedules, branch, average,
    last held-out figure."""
    out: dict = {}
    settings = model_file.train_settings
    if settings:
        plain = {k: v for k, v in settings.items() if k not in _schedule.SETTINGS_KEYS}
        out["train_settings"] = plain
        for key in _schedule.SETTINGS_KEYS:
            if settings.get(key):
                try:
                    out[key] = _schedule.Schedule.from_dict(settings[key]).describe()
                except ConfigError as exc:
                    out[key] = f"unusable ({exc})"
    out.update(_branch.summary(model_file))
    out.update(_ema.summary(model_file))
    out.update(_heldout.summary(model_file))
    return out
