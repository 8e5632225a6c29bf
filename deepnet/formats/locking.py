"""The one-writer rule of a model file (docs/DESIGN.md, "Files").

HDF5 takes a non-blocking flock on a file while it is open, exclusive for writing, so a second writer,
or a reader during training, is refused. Where HDF5's locking is switched off
(``HDF5_USE_FILE_LOCKING=FALSE``, as on some network file systems) deepnet takes the same flock itself.
"""

from __future__ import annotations

import fcntl
import os

from deepnet.errors import ModelFileError


def hdf5_locking_disabled() -> bool:
    """True when HDF5 will not lock files (then deepnet takes the same flock itself)."""
    return os.environ.get("HDF5_USE_FILE_LOCKING", "").strip().upper() in ("FALSE", "0")


def flock(path: str, exclusive: bool) -> int:
    """Take the lock HDF5 would take (a non-blocking flock on the file); return the descriptor holding it.

    Raises BlockingIOError if another process holds a conflicting lock.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def refuse_if_in_use(path: str) -> None:
    """Refuse to replace a file another process has open for training (it holds HDF5's lock)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ModelFileError(f"cannot replace {path}: another process has it open (a training run?)") from None
    except OSError:
        pass
    finally:
        os.close(fd)
