"""Ctrl-C and SIGTERM for a whole command: one convention, installed before the heavy imports.

Every command stops on SIGINT with exit status 130 and on SIGTERM with 143: 128 + the signal's number,
as shells report a process killed by it. SIGTERM raises ``Terminated``, a KeyboardInterrupt, so the
cleanup Ctrl-C runs (temporary files removed, locks released) runs for it too. Training finishes its
current step first (deepnet.training.signals installs its own handlers for the run). This module
imports nothing heavy: ``python -m deepnet`` installs it before numpy, h5py and fire are loaded.
"""

from __future__ import annotations

import _thread
import signal
import sys
import threading
from types import FrameType
from typing import Callable

from deepnet.errors import Terminated


def signum_of(exc: KeyboardInterrupt) -> int:
    """The signal that stopped the command: the one an exception records, SIGTERM for Terminated, else SIGINT."""
    signum = getattr(exc, "signum", None)
    if signum is None:
        signum = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
    return int(signum)


def exit_status(exc: KeyboardInterrupt) -> int:
    """128 + the signal's number: 130 for Ctrl-C, 143 for SIGTERM."""
    return 128 + signum_of(exc)


def stop_line(exc: KeyboardInterrupt) -> str:
    """The one line a stopped command prints on stderr."""
    word = "terminated" if signum_of(exc) == signal.SIGTERM else "interrupted"
    detail = " ".join(str(exc).split())
    return f"deepnet: {word}{': ' + detail if detail else ''}"


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


#: How long after a stop swallowed by a finaliser it is sent again: long enough for the finaliser (and
#: the hook that saw it) to have returned, since a stop marked while they run would land in them again.
REDELIVER_SECONDS = 0.01


def _send_again(signum: int) -> None:
    timer = threading.Timer(REDELIVER_SECONDS, _thread.interrupt_main, (signum,))
    timer.daemon = True
    timer.start()


def _redeliver(previous: Callable[[object], None]) -> Callable[[object], None]:
    """An unraisablehook that sends again a stop that landed in a finaliser.

    A signal handler's exception raised while the main thread runs a ``__del__`` or a weakref callback
    (h5py closes its objects in these) cannot propagate: Python prints "Exception ignored" and the
    command carries on as if never stopped. The signal is marked as arrived again a moment later, from
    another thread, so that the handler runs where its exception can land; should that again be a
    finaliser, this goes round once more.
    """

    def hook(unraisable: object) -> None:
        exc = getattr(unraisable, "exc_value", None)
        if not isinstance(exc, KeyboardInterrupt):
            previous(unraisable)
            return
        try:
            _send_again(signum_of(exc))
        except KeyboardInterrupt as again:  # a further signal arriving in here: it too must not be lost
            _send_again(signum_of(again))

    return hook


def install() -> Callable[[], None]:
    """Install the convention (SIGTERM raises Terminated; a stop swallowed by a finaliser is sent again);
    returns the function that puts the previous handlers back. Only the main thread can install handlers:
    elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous_term = signal.signal(signal.SIGTERM, _terminate)
    # Also over an inherited "ignore" (a shell script's background job): `kill -INT` must stop every
    # command as it stops training, which installs its own handler regardless.
    previous_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    previous_hook = sys.unraisablehook
    sys.unraisablehook = _redeliver(previous_hook)

    def restore() -> None:
        signal.signal(signal.SIGTERM, previous_term)
        if previous_int is not None:
            signal.signal(signal.SIGINT, previous_int)
        sys.unraisablehook = previous_hook

    return restore


def ignore() -> None:
    """Ignore Ctrl-C and SIGTERM from now on: the command has reported its stop and is exiting.

    Presses can keep arriving (a held-down key, or presses that reach a busy machine late). The
    interpreter's shutdown resets Python-level handlers to the default, which would kill the process
    with the signal instead of letting it exit with its status; an ignored signal stays ignored.
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
