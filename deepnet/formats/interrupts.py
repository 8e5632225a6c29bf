"""Ctrl-C (and SIGTERM, which the CLI raises as :class:`~deepnet.errors.Terminated`) during a long write.

An interrupt that arrives while a finaliser runs -- a ``__del__`` or a weakref callback, which h5py's
objects trigger at every block written -- cannot be raised there: Python prints "Exception ignored" and
drops it, and the write would run to its end. The long writes of the file modules (a new model file, a
checkpoint, an import, an export) run inside :func:`watching`, which keeps such an interrupt instead of
printing it, and call :func:`check` between blocks, which raises it where it can land (the atomic write
then removes its temporary).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

# Interrupts caught in a finaliser, not yet raised again; non-empty only inside watching().
_pending: list[BaseException] = []
_depth = 0


def _hook(unraisable: "sys.UnraisableHookArgs") -> None:
    if isinstance(unraisable.exc_value, KeyboardInterrupt):
        _pending.append(unraisable.exc_value)
    else:
        _previous(unraisable)


_previous = sys.unraisablehook


@contextmanager
def watching() -> Iterator[None]:
    """Keep interrupts that land in finalisers while the block runs, for :func:`check` to raise; one still
    kept when the block ends is raised then (an interrupt is never lost)."""
    global _depth, _previous
    if _depth == 0:
        _previous, sys.unraisablehook = sys.unraisablehook, _hook
    _depth += 1
    try:
        yield
        check()
    finally:
        _depth -= 1
        if _depth == 0:
            sys.unraisablehook = _previous
            _pending.clear()


def check() -> None:
    """Raise an interrupt a finaliser swallowed since the last check (called between blocks of a write)."""
    if _pending:
        exc = _pending.pop(0)
        _pending.clear()
        raise exc
