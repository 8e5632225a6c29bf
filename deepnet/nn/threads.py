"""How a pass of the core runs (on how many threads, in which batch blocks): the user's setting, or the
fastest by measurement."""

from __future__ import annotations

import os
from typing import Hashable, Sequence

from deepnet.errors import ConfigError

#: The environment variable that caps the threads (else: the CPUs this process may run on).
THREADS_ENV = "DEEPNET_THREADS"


def default_threads() -> int:
    """$DEEPNET_THREADS, else the CPUs this process may run on."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if value:
        try:
            threads = int(value)
        except ValueError:
            raise ConfigError(f"{THREADS_ENV} must be a positive integer, not {value!r}") from None
        if threads < 1:
            raise ConfigError(f"{THREADS_ENV} must be a positive integer, not {value!r}")
        return threads
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class MeasuredChoice:
    """One of several ways to run a pass that is run again and again: whichever has been faster here.

    The ways (``options``: thread counts, or (threads, batch block) pairs for the backward pass) give
    the same result bit for bit, and which is fastest depends on the machine: the second core pays only
    when it is free and when the kernels at hand use it well (not always: bench/README.md,
    "nn/threads.py"). So the choice is made by measurement: the first pass is not counted (it pays for
    first touches of new buffers), then each option is tried ``TRIALS`` times (in turn) and the fastest
    kept, trying the others again (the longest unrun first) after ``RECHECK_EVERY`` passes; each
    re-check that confirms the choice doubles the wait before the next (up to ``MAX_RECHECK_EVERY``),
    so a much slower option costs little. An option's speed is the best of its last ``KEEP`` passes: on
    a shared machine a pass is only ever slowed by others, so one unlucky pass does not decide the
    choice for long. Those passes count only while they are fresh (among the choice's last passes of
    one round of trials, ``TRIALS`` of each option, or the last ``KEEP`` + 1 if more: every trial
    counts, and the chosen option's last ``KEEP`` do even across a re-check), else the option's latest
    pass alone: when the machine slows down, an option's times from before do not
    outweigh the chosen one's times from now (bench/README.md has the run that showed it); one pass of
    it gives its time from now.
    """

    RECHECK_EVERY = 16
    MAX_RECHECK_EVERY = 256
    KEEP = 3
    TRIALS = 2   # passes of each option before the first choice

    def __init__(self, options: Sequence[Hashable]) -> None:
        if not options:
            raise ValueError("a choice needs at least one option")
        self.options = tuple(dict.fromkeys(options))
        self._fresh_passes = max(self.KEEP, self.TRIALS * len(self.options)) + 1
        self._seconds: dict[Hashable, list[tuple[int, float]]] = {}   # option -> (pass, seconds), last KEEP
        self._last_run: dict[Hashable, int] = {}          # option -> the count of passes when it last ran
        self._passes = 0
        self._warmed_up = False
        self._interval = self.RECHECK_EVERY
        self._since_check = 0                        # passes since another option last ran

    @property
    def settled(self) -> bool:
        """Whether the first choice is made: until then passes go through the options on purpose."""
        if len(self.options) < 2:
            return True
        return (self._warmed_up and len(self._seconds) == len(self.options)
                and min(len(seconds) for seconds in self._seconds.values()) >= self.TRIALS)

    def _speed(self, option: Hashable) -> float:
        """The best of the option's fresh passes, else its latest pass."""
        kept = self._seconds[option]
        fresh = [seconds for done, seconds in kept if done > self._passes - self._fresh_passes]
        return min(fresh) if fresh else kept[-1][1]

    def _best(self) -> Hashable:
        return min(self._seconds, key=self._speed)

    def pick(self) -> Hashable:
        """The option for the next pass."""
        if len(self.options) < 2:
            return self.options[0]
        for trial in range(self.TRIALS):
            for option in self.options:
                if len(self._seconds.get(option, [])) <= trial:
                    return option
        best = self._best()
        if self._since_check < self._interval - 1:
            return best
        return min((option for option in self.options if option != best), key=lambda o: self._last_run.get(o, -1))

    def record(self, option: Hashable, seconds: float) -> None:
        """Note that a pass run the way ``option`` took ``seconds``."""
        if len(self.options) < 2:
            return   # nothing to choose
        self._passes += 1
        self._last_run[option] = self._passes
        if not self._warmed_up:
            self._warmed_up = True
            return
        trials = not self.settled
        rechecked = not trials and option != self._best()
        self._seconds[option] = (self._seconds.get(option, []) + [(self._passes, seconds)])[-self.KEEP:]
        if rechecked:
            confirmed = option != self._best()
            self._interval = min(2 * self._interval, self.MAX_RECHECK_EVERY) if confirmed else self.RECHECK_EVERY
            self._since_check = 0
        elif not trials:
            self._since_check += 1


class ThreadChoice(MeasuredChoice):
    """1 or ``most`` threads for a pass: a MeasuredChoice of the two (``most`` first)."""

    def __init__(self, most: int) -> None:
        super().__init__((most, 1) if most >= 2 else (1,))


class FixedChoice:
    """A way to run a pass set by the user instead of measured: MeasuredChoice's interface, always
    ``option``."""

    settled = True

    def __init__(self, option: Hashable) -> None:
        self.option = option

    def pick(self) -> Hashable:
        """Always ``option``."""
        return self.option

    def record(self, option: Hashable, seconds: float) -> None:
        """Nothing to learn from a pass."""
