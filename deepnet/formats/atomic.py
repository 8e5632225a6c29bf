"""Atomic file replacement: write a temporary beside the target, fsync it, rename it into place.

Every file deepnet writes whole (a new model, a checkpoint, an MLP file, raw exports, IDX files,
fetched MNIST files, plots) goes through :func:`atomic_path`, so a reader never sees a half-written
file, a writer interrupted by an exception (Ctrl-C, SIGTERM turned into :class:`~deepnet.errors.Terminated`)
leaves nothing behind, and a killed one leaves only a hidden temporary that :func:`stale_temporaries`
recognises. It also takes the one-writer lock of the file it replaces (:mod:`deepnet.formats.locking`)
and refuses, before anything is written, a file that would not fit in the free space.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager

from deepnet.errors import ModelFileError
from deepnet.formats import interrupts
from deepnet.formats.locking import WriterLock, flock, lock_target

# ".<name>.tmp-<pid>" (older writers) or ".<name>.tmp-<pid>-<hex>": the pid tells a dead writer's
# leftover from a live one's work in progress.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)(?:-[0-9a-f]+)?$")


def temporary_name(path: str | os.PathLike) -> str:
    """A fresh hidden name in `path`'s directory for a new version of `path` (same file system, so the
    rename is atomic; the random part keeps two writers of one process apart)."""
    path = os.path.abspath(os.fspath(path))
    directory, base = os.path.split(path)
    return os.path.join(directory, f".{base}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def fsync_file(path: str | os.PathLike) -> None:
    """fsync the file at `path` (errors propagate: data that did not reach the disk is a failed write)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: str | os.PathLike) -> None:
    """fsync a directory, so a rename inside it survives power loss (best effort: some filesystems refuse)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _exists_error(path: str) -> ModelFileError:
    return ModelFileError(f"{path} already exists (pass overwrite=True / --overwrite to replace it)")


def place(tmp: str, target: str, *, overwrite: bool, shown: str | None = None) -> None:
    """Rename the finished `tmp` onto `target`; without `overwrite`, refuse if `target` exists.

    The refusal is atomic where the file system allows hard links (a link fails if the name appeared
    meanwhile); elsewhere it is a check just before the rename. `shown` is the path named in errors.
    """
    if overwrite:
        os.replace(tmp, target)
        return
    try:
        os.link(tmp, target)
    except FileExistsError:
        raise _exists_error(shown or target) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        if os.path.lexists(target):
            raise _exists_error(shown or target) from None
        os.replace(tmp, target)
        return
    os.unlink(tmp)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def format_bytes(n: int) -> str:
    """A byte count for a one-line message: 1.5 GB, 12 MB, 300 bytes (decimal units, as df -H)."""
    for unit, size in (("EB", 10**18), ("PB", 10**15), ("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} bytes"


def free_bytes(directory: str | os.PathLike) -> int | None:
    """Bytes an unprivileged writer may still use on `directory`'s file system (None if unknown)."""
    try:
        st = os.statvfs(directory)
    except (OSError, AttributeError):
        return None
    return st.f_bavail * st.f_frsize


def space_shortfall(path: str | os.PathLike, nbytes: int) -> str | None:
    """Why a file of `nbytes` will not fit beside `path` (how much it needs and how much is free), or None
    if it fits. The old file stays until the new one is renamed over it, so its space does not count."""
    directory = os.path.dirname(os.path.realpath(os.fspath(path)))
    free = free_bytes(directory)
    if free is None or nbytes <= free:
        return None
    return (f"it needs {format_bytes(nbytes)} ({nbytes:,} bytes) but the file system of {directory} has "
            f"{format_bytes(free)} free")


@contextmanager
def atomic_path(path: str | os.PathLike, *, overwrite: bool = True, size: int | None = None,
                lock: bool | WriterLock = True) -> Iterator[str]:
    """Yield a temporary path beside `path`; on normal exit fsync it, rename it onto `path`, fsync the
    directory. On any exception, Ctrl-C and SIGTERM included (or a refused rename), the temporary is
    removed and nothing is placed.

    A symlink at `path` stays: its target is replaced. Without `overwrite`, an existing `path` is
    refused with :class:`ModelFileError`. With `lock` (the default) the file being replaced is locked
    from before the temporary is made until after the rename (:func:`lock_target`: a file in use by a
    training run is refused); a caller that already holds the file's lock (a checkpoint of the run
    itself) passes ``lock=False``, or its :class:`WriterLock`, which the new file takes over before it is
    renamed into place. With `size`, a file that would not fit is refused first.
    """
    shown = os.fspath(path)
    target = os.path.realpath(shown)
    short = None if size is None else space_shortfall(target, size)
    if short:
        raise ModelFileError(f"cannot write {shown}: {short}")
    handover = lock if isinstance(lock, WriterLock) else None
    # A run whose file did not exist when it started holds no lock yet: its first save must not replace a
    # file another run has placed (and locked) meanwhile.
    held = lock_target(shown) if lock is True or (handover is not None and handover.fd is None) else None
    try:
        tmp = temporary_name(target)
        new_lock = None
        try:
            with interrupts.watching():  # a Ctrl-C a finaliser swallowed still stops the write
                yield tmp
            fsync_file(tmp)
            if handover is not None:
                new_lock = flock(tmp, exclusive=True)
            place(tmp, target, overwrite=overwrite, shown=shown)
        except BaseException:
            if new_lock is not None:
                os.close(new_lock)
            _unlink(tmp)
            raise
        if new_lock is not None:
            handover.hand_over(new_lock)
        fsync_dir(os.path.dirname(target))
    finally:
        if held is not None:
            os.close(held)


def stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Temporary files beside `path` (or beside its symlink's target) left by a process that no longer
    runs (a killed init or checkpoint): safe to remove, never mistaken for the model."""
    shown = os.path.abspath(os.fspath(path))
    places = {os.path.split(shown), os.path.split(os.path.realpath(shown))}
    found = []
    for directory, base in places:
        try:
            names = os.listdir(directory)
        except OSError:
            continue
        for name in names:
            m = _TEMPORARY.match(name)
            if m and m.group("name") == base and not writer_alive(int(m.group("pid"))):
                found.append(os.path.join(directory, name))
    return sorted(found)


def writer_alive(pid: int) -> bool:
    """Whether the process `pid` (a temporary's writer) may still be running."""
    if pid == os.getpid():
        return True  # this process: perhaps writing it right now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_stale_temporaries(path: str | os.PathLike) -> list[str]:
    """Remove :func:`stale_temporaries` of `path`; returns what was removed."""
    removed = []
    for tmp in stale_temporaries(path):
        try:
            os.unlink(tmp)
            removed.append(tmp)
        except OSError:
            pass
    return removed


def check_output(path: str, *, overwrite: bool, flag: str | None = None) -> None:
    """Refuse an output path that would fail or clobber something, before anything is written: a
    directory, an existing file (unless ``overwrite``), a missing or unwritable directory. ``flag`` names
    the command-line flag the path came from (messages then say ``--flag PATH``)."""
    directory = os.path.dirname(os.path.abspath(path))
    what, action = (f"--{flag} {path}", f"cannot write --{flag} {path}") if flag else (path, f"cannot create {path}")
    if os.path.isdir(path):
        raise ModelFileError(f"{what} is a directory" if flag else f"{action}: it is a directory")
    if os.path.lexists(path) and not overwrite:
        hint = "pass --overwrite to replace it" if flag else "pass overwrite=True / --overwrite to replace it"
        raise ModelFileError(f"{what} already exists ({hint})")
    if not os.path.isdir(directory):
        raise ModelFileError(f"{action}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ModelFileError(f"{action}: directory {directory} is not writable")
