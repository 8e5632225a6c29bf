"""The one-writer rule of a model file (docs/DESIGN.md, "Files").

The lock is a non-blocking flock on the file itself, so it belongs to the file (its inode), not to the
path: a second path or a symlink to the same file meets the same lock. HDF5 takes it while a file is
open (exclusive for writing), so a second writer, or a reader during training, is refused; where HDF5's
locking is switched off (``HDF5_USE_FILE_LOCKING=FALSE``, as on some network file systems) deepnet takes
the same flock itself. Every command that replaces a file whole takes it on the file being replaced
(:func:`lock_target`, from :func:`deepnet.formats.atomic.atomic_path`) and holds it until the new file is
in place, so a training run can neither be replaced nor start on a file that is about to be.
"""

from __future__ import annotations

import fcntl
import os
import stat

from deepnet.errors import ModelFileError

# A file replaced by rename between our open and our flock is retried this many times.
_LOCK_ATTEMPTS = 5


def hdf5_locking_disabled() -> bool:
    """True when HDF5 will not lock files (then deepnet takes the same flock itself)."""
    return os.environ.get("HDF5_USE_FILE_LOCKING", "").strip().upper() in ("FALSE", "0")


def flock(path: str, exclusive: bool) -> int:
    """Take the lock HDF5 would take (a non-blocking flock on the file); return the descriptor holding it.

    Raises BlockingIOError if another process holds a conflicting lock.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return fd


def same_file(fd: int, path: str) -> bool:
    """Whether the open descriptor `fd` is the file `path` names now (it was not replaced by a rename)."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    held = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (held.st_dev, held.st_ino)


def in_use_error(path: str) -> ModelFileError:
    """The one-line refusal of replacing `path` (named as given; a symlink also names its target)."""
    real = os.path.realpath(path)
    shown = path if os.path.abspath(path) == real else f"{path} (-> {real})"
    return ModelFileError(f"cannot replace {shown}: another process has it open (a training run?)")


def lock_target(path: str) -> int | None:
    """Take the one-writer lock of the regular file at `path` (symlinks followed) for replacing it: an
    exclusive flock, checked to still be the file `path` names once taken. Returns the descriptor holding
    it (close it to release), or None when there is no regular file to lock. Refuses, with
    :func:`in_use_error`, a file another process (or another open file of this one) holds."""
    for _ in range(_LOCK_ATTEMPTS):
        try:
            # O_NONBLOCK: opening a FIFO someone named as the output must not hang.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None  # nothing there, or unreadable: nobody can be training it
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                return None
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise in_use_error(path) from None
        except OSError:  # a file system without flock: the rename alone keeps readers whole
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        if same_file(fd, path):
            return fd
        os.close(fd)  # replaced between open and flock: lock the new file instead
    raise in_use_error(path)


def locked_error(path: str, mode: str) -> ModelFileError:
    """The one-line refusal of opening `path` while another process holds its lock."""
    return ModelFileError(f"could not open {path} in mode {mode!r}: it is locked by another process (a training run?)")


def is_lock_conflict(exc: BaseException) -> bool:
    """Whether an error of HDF5's open says another process holds the file's lock."""
    return "unable to lock file" in str(exc)


class WriterLock:
    """The one-writer lock of a file that one run replaces again and again (train-mlp saves its model whole
    at every report): taken on the file at `path`, if there is one, for the whole run, and handed to each
    new version by :func:`deepnet.formats.atomic.atomic_path` (``lock=this``) before it is renamed into
    place, so at no instant is the file at `path` unlocked while the run lasts."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        self.fd: int | None = lock_target(self.path)

    def hand_over(self, fd: int) -> None:
        """Hold the lock through `fd` (the new version's, already locked) and release the old file's."""
        old, self.fd = self.fd, fd
        if old is not None:
            os.close(old)

    def close(self) -> None:
        """Release the lock (idempotent)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "WriterLock":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def refuse_if_in_use(path: str) -> None:
    """Refuse to replace a file another process has open for training (it holds the lock)."""
    fd = lock_target(path)
    if fd is not None:
        os.close(fd)
