"""The training loop every trainer runs through: draw a minibatch, take a step, let the hooks act.

Dense training (deepnet.training.recipe), the speedrun (deepnet.training.speedrun) and the MLP baseline
(deepnet.training.mlp) differ only in their step function and their hooks: reports, held-out
evaluation, the weight average, checkpoints, a target to stop at. A hook sees every step in the order
the hooks were given, then, once the loop ends without an exception, ``at_end`` in the same order.

Also here: :class:`StepClock`, the estimate of the time left (the report rows' ETA and the progress bar's)
from the steady state, and :class:`ProgressBar`. Nothing here prints: the bar is tqdm's, on stderr.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

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


class Minibatches(Protocol):
    """Where a run's minibatches come from (deepnet.data.sources.ArrayMinibatches draws rows of arrays
    uniformly with replacement; a teacher draws fresh samples)."""

    def draw(self, rng: np.random.Generator, batch: int) -> tuple[np.ndarray, np.ndarray]:
        """The next minibatch (inputs, labels or targets), drawn with ``rng``."""


def run(step: StepFunction, data: Minibatches, *, rng: np.random.Generator, batch: int, steps: int,
        hooks: Sequence[Hook] = (), stop_requested: Callable[[], bool] = never) -> int:
    """Take up to ``steps`` steps on minibatches of ``batch`` drawn from ``data`` with ``rng``.

    Stops early when ``stop_requested()`` (checked before each step) or a hook sets ``event.stop``.
    Returns the steps taken.
    """
    done = 0
    while done < steps and not stop_requested():
        x, y = data.draw(rng, batch)
        result = step(x, y, done)
        done += 1
        event = StepEvent(done, result)
        for hook in hooks:
            hook.after_step(event)
        if event.stop:
            break
    for hook in hooks:
        hook.at_end()
    return done


class StepClock:
    """The wall-clock time per step of a run in its steady state, for an ETA.

    ``tick()`` after each step (held-out evaluations and checkpoints included: they recur, so they
    belong in the estimate). The first steps of a run are slow (the threads' warm-up, the choice of one
    thread or two, page faults), so the first ``warmup`` intervals are left out once there are more:
    the estimate is then the mean interval since the warm-up ended. Until then it is the median of the
    intervals so far after the first (all of them if there is only one).
    """

    def __init__(self, warmup: int = 5, now: Callable[[], float] = time.perf_counter) -> None:
        self.warmup = warmup
        self.now = now
        self.last = now()
        self.early: list[float] = []          # the first ``warmup`` intervals
        self.steady_seconds = 0.0             # the sum of the later ones
        self.steady_steps = 0

    def tick(self) -> None:
        """A step (and whatever followed it) has ended."""
        t = self.now()
        interval, self.last = t - self.last, t
        if len(self.early) < self.warmup:
            self.early.append(interval)
        else:
            self.steady_seconds += interval
            self.steady_steps += 1

    def seconds_per_step(self) -> float:
        """The estimate (NaN before the first tick)."""
        if self.steady_steps:
            return self.steady_seconds / self.steady_steps
        if not self.early:
            return float("nan")
        return statistics.median(self.early[1:] or self.early)

    def eta(self, steps_left: int) -> float:
        """Seconds for ``steps_left`` more steps (0 when none are left; NaN before the first tick)."""
        return 0.0 if steps_left <= 0 else steps_left * self.seconds_per_step()


class _Bar(tqdm):
    """A tqdm bar whose rate (hence its remaining time) is a StepClock's, when one is set."""

    clock: StepClock | None = None

    @property
    def format_dict(self) -> dict:
        d = super().format_dict
        seconds = self.clock.seconds_per_step() if self.clock is not None else float("nan")
        if seconds > 0:
            d["rate"] = 1.0 / seconds
        return d


class ProgressBar(Hook):
    """A tqdm bar on stderr, one tick per step (hidden unless ``show``); use as a context manager.

    Its remaining time comes from a :class:`StepClock`. ``at_most``: ``total`` is only a limit (a
    speedrun's --max-steps, which stops earlier at its target): the bar then says "at most" and shows
    no remaining time."""

    def __init__(self, total: int, desc: str, show: bool, *, at_most: bool = False) -> None:
        fmt = "{l_bar}{bar}| {n_fmt}/at most {total_fmt} [{elapsed}, {rate_fmt}{postfix}]" if at_most else None
        self.clock = StepClock()
        self.bar = _Bar(total=total, desc=desc, unit="step", disable=not show, leave=False, dynamic_ncols=True,
                        bar_format=fmt)
        self.bar.clock = self.clock

    def after_step(self, event: StepEvent) -> None:
        self.clock.tick()
        self.bar.update(1)

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
