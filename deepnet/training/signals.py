"""Ctrl-C and SIGTERM while training: finish the current step, save, stop (exit status 130 or 143 in the
CLI: deepnet.interrupts).

The first signal finishes the current step, saves and stops; the second abandons the step, unless the
step is being written into a streamed file (abandoning it there would leave a torn step), which takes a
third. Once the run has stopped, further signals within ``GRACE_SECONDS`` are ignored.

Notices ("finishing the current step ...") go to the ``deepnet.training.signals`` logger at INFO (the
command line shows them; a Python caller sees them only if it configures logging). A run that stopped
raises :class:`Interrupted`, which says what the model file holds (``held_step``) and where the run was
planned to end (``until_step``), so that the caller can say how to finish it.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from types import FrameType
from typing import Any, Callable

from deepnet.nn.network import DeepNet

GRACE_SECONDS = 1.0  # after a run stops on a signal, further signals within this time are ignored

log = logging.getLogger(__name__)


class Interrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C (or SIGTERM); the message says what the model file holds.

    ``held_step`` is the step the model file holds (None if unknown: a torn or unreadable file) and
    ``until_step`` the step the interrupted run was planned to end at (its first step plus --steps, or
    the --until-step given; None if the run had not started). The message suggests no command: the
    command line builds one from its own arguments.
    """

    def __init__(self, message: str, signum: int = signal.SIGINT, *, held_step: int | None = None,
                 until_step: int | None = None) -> None:
        super().__init__(message)
        self.signum = int(signum)
        self.held_step = None if held_step is None else int(held_step)
        self.until_step = None if until_step is None else int(until_step)


#: What signal.signal() returns: the previous handler (a function, SIG_DFL, SIG_IGN, or None if not Python's).
Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


def ignoring_for(seconds: float, handler: Handler) -> Callable[[int, FrameType | None], None]:
    """A signal handler that ignores signals for `seconds`, then passes them on to `handler`."""
    until = time.monotonic() + seconds

    def handle(signum: int, frame: FrameType | None) -> None:
        if time.monotonic() < until:
            return
        if callable(handler):
            handler(signum, frame)
        elif handler == signal.SIG_DFL:  # the default: die of the signal as if no handler were installed
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    return handle


class StopSignal:
    """The signal handling of one training run (a context manager; see the module docstring)."""

    def __init__(self) -> None:
        self.net: DeepNet | None = None
        #: Whether a signal now finishes the current step (armed) rather than stopping at once.
        self.armed = False
        self.count = 0
        self.signum = signal.SIGINT
        #: Set once the run is abandoned: closing the file must not be interrupted.
        self.done = False
        self._after: str | None = None
        self._after_steps: dict[str, int | None] = {}
        self._previous: dict[int, Handler] = {}
        #: A KeyboardInterrupt the handler raised that landed where Python cannot raise it (a __del__ or
        #: weakref callback, which only print "Exception ignored"): re-raised at the next check().
        self.pending = False
        self._unraisable = None

    def arm(self, net: DeepNet | None = None) -> None:
        """From now on a signal finishes the current step instead of stopping at once. ``net``: the dense
        model being trained (its engine checks for swallowed interrupts between chunks); None for a
        trainer whose steps are short (the MLP baseline)."""
        self.net, self.armed = net, True
        if net is not None:
            net.engine.interrupt_check = self.check

    def check(self) -> None:
        """Raise the interrupt a signal asked for if it was swallowed (called between chunks)."""
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

    def disarm(self, message: str, *, held_step: int | None = None, until_step: int | None = None) -> None:
        """The model is saved: a signal now stops at once (the final evaluation), raising Interrupted
        with `message` and the given steps."""
        if self.net is not None:
            self.net.engine.interrupt_check = None
        self.net, self.armed, self._after, self.pending = None, False, message, False
        self._after_steps = {"held_step": held_step, "until_step": until_step}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
            self._unraisable, sys.unraisablehook = sys.unraisablehook, self._swallowed
        return self

    def __exit__(self, *exc: object) -> None:
        stopped = self.count > 0 or self.done
        for signum, handler in self._previous.items():
            # Presses that were meant for this run can still be arriving as it stops (three quick
            # Ctrl-Cs); they must not hit the caller's handler in the middle of reporting the stop.
            signal.signal(signum, ignoring_for(GRACE_SECONDS, handler) if stopped else handler)
        if self._unraisable is not None:
            sys.unraisablehook = self._unraisable
        if self.net is not None:
            self.net.engine.interrupt_check = None
            self.net = None
        self.armed = False

    def _swallowed(self, unraisable: sys.UnraisableHookArgs) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            self.pending = True  # ours, raised inside a finaliser: raise it again where it can land
        else:
            self._unraisable(unraisable)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.done:
            return
        self.signum = signum
        if not self.armed:  # not training yet, or saved already: nothing to finish
            if self._after:
                self.done = True
                raise Interrupted(self._after, signum, **self._after_steps)
            raise KeyboardInterrupt
        self.count += 1
        if self.count == 1:
            log.info("finishing the current step, then saving and stopping (press Ctrl-C again to abandon "
                     "the step)")
        elif self.count == 2 and self.net is not None and self.net.writing:
            log.info(f"step {self.net.step + 1} is being written into {self.net.file.path}; abandoning it now "
                     f"would leave a torn step, so it is finishing (Ctrl-C once more to abandon it anyway)")
        else:
            # From the abandoning signal on, further signals are ignored: one arriving while this
            # KeyboardInterrupt is being handled would otherwise escape the handler that reports it.
            self.done = True
            raise KeyboardInterrupt
