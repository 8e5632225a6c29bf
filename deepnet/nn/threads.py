"""How many threads a pass of the core runs on: the user's setting, or one or several by measurement."""

from __future__ import annotations

import os

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


class ThreadChoice:
    """1 or ``most`` threads for a pass that is run again and again: whichever has been faster here.

    The second core pays only when it is free and when the kernels at hand use it well (not always:
    bench/README.md, "nn/threads.py"), and one thread or two give the same result bit for bit. So the
    choice is made by measurement: the first pass is not counted (it pays for first touches of new
    buffers), then each option is tried ``TRIALS`` times (alternately) and the faster kept, trying the
    other again after ``RECHECK_EVERY`` passes; each re-check that confirms the choice doubles the wait
    before the next (up to ``MAX_RECHECK_EVERY``), so a much slower option costs little. An option's speed is the best of its
    last ``KEEP`` passes: on a shared machine a pass is only ever slowed by others, so one unlucky pass
    does not decide the choice for long.
    """

    RECHECK_EVERY = 16
    MAX_RECHECK_EVERY = 256
    KEEP = 3
    TRIALS = 2   # passes of each option before the first choice

    def __init__(self, most: int) -> None:
        self.most = max(1, most)
        self._seconds: dict[int, list[float]] = {}   # threads -> seconds of its last KEEP passes
        self._warmed_up = False
        self._interval = self.RECHECK_EVERY
        self._since_check = 0                        # passes since the other option last ran

    @property
    def settled(self) -> bool:
        """Whether the first choice is made: until then passes alternate between the options on purpose."""
        if self.most < 2:
            return True
        return (self._warmed_up and len(self._seconds) == 2
                and min(len(seconds) for seconds in self._seconds.values()) >= self.TRIALS)

    def _best(self) -> int:
        return min(self._seconds, key=lambda threads: min(self._seconds[threads]))

    def pick(self) -> int:
        """The thread count for the next pass."""
        if self.most < 2:
            return 1
        for trial in range(self.TRIALS):
            for threads in (self.most, 1):
                if len(self._seconds.get(threads, [])) <= trial:
                    return threads
        best = self._best()
        other = 1 if best != 1 else self.most
        return other if self._since_check >= self._interval - 1 else best

    def record(self, threads: int, seconds: float) -> None:
        """Note that a pass on ``threads`` threads took ``seconds``."""
        if self.most < 2:
            return   # nothing to choose
        if not self._warmed_up:
            self._warmed_up = True
            return
        trials = not self.settled
        rechecked = not trials and threads != self._best()
        self._seconds[threads] = (self._seconds.get(threads, []) + [seconds])[-self.KEEP:]
        if rechecked:
            confirmed = threads != self._best()
            self._interval = min(2 * self._interval, self.MAX_RECHECK_EVERY) if confirmed else self.RECHECK_EVERY
            self._since_check = 0
        elif not trials:
            self._since_check += 1


class FixedThreads:
    """A thread count set by the user instead of measured: ThreadChoice's interface, always ``threads``."""

    settled = True

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def pick(self) -> int:
        """Always ``threads``."""
        return self.threads

    def record(self, threads: int, seconds: float) -> None:
        """Nothing to learn from a pass."""
