"""The training loop every trainer runs through: draw a minibatch, take a step, let the hooks act.

Dense training (deepnet.training.recipe), the speedrun (deepnet.training.speedrun) and the MLP baseline
(deepnet.training.mlp) differ only in their step function and their hooks: reports, held-out
evaluation, the weight average, checkpoints, a target to stop at. A hook sees every step in the order
the hooks were given, then, once the loop ends without an exception, ``at_end`` in the same order.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
from tqdm import tqdm

from deepnet.errors import ModelFileError

#: One step on a minibatch: (inputs, labels, index of the step within this run) -> the step's result.
StepFunction = Callable[[np.ndarray, np.ndarray, int], Any]


@dataclass
class StepEvent:
    """What the hooks see after a step; they may fill in ``heldout`` and ask for ``stop``."""

    done: int                       # steps taken in this run, this one included
    result: Any                     # the step function's return value
    heldout: float | None = None    # a held-out accuracy measured after this step
    stop: bool = False              # end the run after this step


class Hook:
    """Something a run does besides its steps; the methods do nothing unless overridden."""

    def after_step(self, event: StepEvent) -> None:
        """Called after every step."""

    def at_end(self) -> None:
        """Called once after the last step (not when a step or a hook raised)."""


def never() -> bool:
    """The default stop request: none."""
    return False


def run(step: StepFunction, x: np.ndarray, y: np.ndarray, *, rng: np.random.Generator, batch: int, steps: int,
        hooks: Sequence[Hook] = (), stop_requested: Callable[[], bool] = never) -> int:
    """Take up to ``steps`` steps on minibatches drawn uniformly with replacement from ``x``/``y``.

    Stops early when ``stop_requested()`` (checked before each step) or a hook sets ``event.stop``.
    Returns the steps taken.
    """
    done = 0
    while done < steps and not stop_requested():
        idx = rng.integers(0, x.shape[0], size=batch)
        result = step(x[idx], y[idx], done)
        done += 1
        event = StepEvent(done, result)
        for hook in hooks:
            hook.after_step(event)
        if event.stop:
            break
    for hook in hooks:
        hook.at_end()
    return done


class ProgressBar(Hook):
    """A tqdm bar on stderr, one tick per step (hidden unless ``show``); use as a context manager."""

    def __init__(self, total: int, desc: str, show: bool) -> None:
        self.bar = tqdm(total=total, desc=desc, unit="step", disable=not show, leave=False, dynamic_ncols=True)

    def after_step(self, event: StepEvent) -> None:
        self.bar.update(1)

    def say(self, line: str) -> None:
        """A notice on stderr that does not break the bar."""
        if self.bar.disable:
            print(line, file=sys.stderr, flush=True)
        else:
            self.bar.write(line, file=sys.stderr)

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def mean_rows(window: Sequence[Sequence[float]]) -> list[float]:
    """Column means of a window of per-step figures."""
    n = len(window)
    return [sum(row[i] for row in window) / n for i in range(len(window[0]))]


def minibatch_rng(seed: int, state: dict | None, unusable: Callable[[Exception], str]) -> np.random.Generator:
    """The minibatch generator of a model: seeded from its seed, continued from its stored ``state``
    (a committed step's), so a resumed run draws what an uninterrupted one would have. A state numpy
    refuses is a ModelFileError with the message ``unusable(exc)``."""
    rng = np.random.default_rng([seed, 1])
    if state is not None:
        try:
            rng.bit_generator.state = state
        except (TypeError, ValueError, KeyError) as exc:
            raise ModelFileError(unusable(exc)) from None
    return rng
