"""MPI through mpi4py: whether this process is one of several ranks, and messages that cannot hang forever.

A process started by ``mpiexec -n P`` (MPICH's or Open MPI's, or Slurm's ``srun``) finds its rank and
the rank count in its environment before anything imports mpi4py, so a plain ``deepnet`` command never
loads MPI. Every wait for another rank has a deadline: a rank that died or hangs ends the job with an
error naming it instead of blocking the others forever (``RankLost``).
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
import sys
import termios
import time
from typing import Any

import numpy as np

from deepnet.distributed.launch import (RANK_VARIABLES, SIZE_VARIABLES, hold_signals, launched_rank,
                                        launched_size, release_signals)
from deepnet.errors import ConfigError, DeepnetError

#: The tags of the step's sum (gathered on rank 0, then sent back): above the pipeline's tags.
TAG_SUM = 3 << 20

#: How long a rank waits for a message from another before it gives up on it (seconds), by default.
DEFAULT_TIMEOUT = 300.0

#: The longest pause between two looks at a pending message: short against a step, long enough that a
#: waiting rank leaves the core to the rank it waits for.
MAX_POLL_PAUSE = 0.0005

#: How long an aborting rank waits for the launcher to read what it printed (seconds), at most.
DRAIN_TIMEOUT = 2.0


class RankLost(DeepnetError):
    """Another rank did not answer in time (it died or hangs): the job must end."""


class Ranks:
    """The ranks of one job: this one's number, the count, and messages with deadlines.

    Counts what it waited and what it sent, for the figures of a run (``waited``, ``sent_bytes``).
    """

    def __init__(self, comm: Any, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.timeout = timeout
        self.waited = 0.0
        self.sent_bytes = 0

    # -------------------------------------------------------------- waiting

    def wait_for(self, test: Any, peer: int | None, what: str, between: Any = None) -> Any:
        """Poll ``test()`` (returns (done, value)) until done or the deadline, calling ``between()`` (if
        given) between two looks; the time counts as waited, however the wait ends."""
        started = time.perf_counter()
        deadline = started + self.timeout
        pause = 1e-5
        try:
            while True:
                done, value = test()
                if done:
                    return value
                if between is not None:
                    between()
                if time.perf_counter() > deadline:
                    who = "the other ranks" if peer is None else f"rank {peer}"
                    raise RankLost(f"rank {self.rank} waited {self.timeout:g} s for {what} from {who}, which died "
                                   "or hangs (see --rank-timeout)")
                time.sleep(pause)
                pause = min(MAX_POLL_PAUSE, pause * 2)
        finally:
            self.waited += time.perf_counter() - started

    # -------------------------------------------------------------- arrays

    def send(self, array: np.ndarray, dest: int, tag: int) -> None:
        """Send a C-contiguous float32 array (returns once it may be reused)."""
        array = np.ascontiguousarray(array, dtype=np.float32)
        request = self.comm.Isend(array, dest=dest, tag=tag)
        self.wait_for(lambda: (request.Test(), None), dest, "its receive")
        self.sent_bytes += array.nbytes

    def recv(self, shape: tuple[int, ...], source: int, tag: int) -> np.ndarray:
        """Receive a float32 array of ``shape``."""
        out = np.empty(shape, np.float32)
        request = self.comm.Irecv(out, source=source, tag=tag)
        self.wait_for(lambda: (request.Test(), None), source, "a message")
        return out

    # -------------------------------------------------------------- Python objects

    def send_obj(self, obj: Any, dest: int, tag: int) -> None:
        request = self.comm.isend(obj, dest=dest, tag=tag)
        self.wait_for(lambda: (request.test()[0], None), dest, "its receive")

    def recv_obj(self, source: int, tag: int) -> Any:
        request = self.comm.irecv(source=source, tag=tag)
        return self.wait_for(request.test, source, "a message")

    def bcast_obj(self, obj: Any, tag: int) -> Any:
        """Rank 0's ``obj`` on every rank (point to point, so each wait has its deadline)."""
        if self.rank == 0:
            for dest in range(1, self.size):
                self.send_obj(obj, dest, tag)
            return obj
        return self.recv_obj(0, tag)

    def gather_obj(self, obj: Any, tag: int) -> list[Any] | None:
        """Every rank's ``obj`` on rank 0 (in rank order); None elsewhere."""
        if self.rank != 0:
            self.send_obj(obj, 0, tag)
            return None
        return [obj] + [self.recv_obj(source, tag) for source in range(1, self.size)]

    def sum(self, values: np.ndarray) -> np.ndarray:
        """The element-wise sum of every rank's ``values`` (float64, added in rank order), on every rank.

        Gathered on rank 0 and sent back, point to point rather than as an MPI collective, so that a
        rank that does not take part is named when the deadline passes."""
        send = np.ascontiguousarray(values, dtype=np.float64)
        if self.rank != 0:
            request = self.comm.Isend(send, dest=0, tag=TAG_SUM)
            self.wait_for(lambda: (request.Test(), None), 0, "its receive")
            out = np.empty_like(send)
            request = self.comm.Irecv(out, source=0, tag=TAG_SUM + 1)
            self.wait_for(lambda: (request.Test(), None), 0, "the step's figures")
            return out
        parts = {source: np.empty_like(send) for source in range(1, self.size)}
        pending = {source: self.comm.Irecv(buf, source=source, tag=TAG_SUM) for source, buf in parts.items()}
        self._wait_all(pending, "the step's figures")
        total = send.copy()
        for source in range(1, self.size):
            total += parts[source]
        pending = {dest: self.comm.Isend(total, dest=dest, tag=TAG_SUM + 1) for dest in range(1, self.size)}
        self._wait_all(pending, "its receive")
        return total

    def _wait_all(self, pending: dict[int, Any], what: str) -> None:
        """Wait for every request of ``pending`` (peer -> request); at the deadline, name a peer still missing."""
        def test() -> tuple[bool, None]:
            for peer in [p for p, request in pending.items() if request.Test()]:
                del pending[peer]
            return not pending, None

        try:
            self.wait_for(test, None, what)
        except RankLost:
            raise RankLost(f"rank {self.rank} waited {self.timeout:g} s for {what} from rank {min(pending)}, which "
                           "died or hangs (see --rank-timeout)") from None

    def any(self, flag: bool, tag: int) -> bool:
        """Whether any rank's ``flag`` is set (every rank learns the same answer)."""
        flags = self.gather_obj(bool(flag), tag)
        return bool(self.bcast_obj(None if flags is None else any(flags), tag))

    def abort(self, status: int) -> None:
        """End every rank of the job now, once the launcher has read this rank's error line.

        MPI_Abort makes the launcher end the job at once; MPICH's Hydra may then drop output still in
        the rank's pipe, the one line that says why the job ended."""
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        wait_until_read((1, 2), DRAIN_TIMEOUT)
        self.comm.Abort(status)


def unread_bytes(fd: int) -> int:
    """How many bytes written to ``fd`` its reader has not read yet: 0 unless ``fd`` is a pipe."""
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):
            return 0
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]
    except OSError:
        return 0


def wait_until_read(fds: tuple[int, ...], timeout: float) -> bool:
    """Wait (at most ``timeout`` seconds) until the readers of the pipes ``fds`` have read everything
    written to them; whether they did."""
    deadline = time.monotonic() + timeout
    while any(unread_bytes(fd) for fd in fds):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


__all__ = ["RANK_VARIABLES", "SIZE_VARIABLES", "RankLost", "Ranks", "launched_rank", "launched_size", "unread_bytes",
           "wait_until_read", "world"]


def world(timeout: float = DEFAULT_TIMEOUT) -> Ranks | None:
    """The job's ranks when this process is one of several started by an MPI launcher, else None.

    Started as one of several ranks without mpi4py installed: a one-line ConfigError saying what to
    install.
    """
    size = launched_size()
    if size <= 1:
        return None
    hold_signals()  # held since launch (deepnet.__main__); here for callers of the API
    try:
        from mpi4py import MPI  # only under a launcher: a plain command never loads MPI
    except ImportError:
        raise ConfigError(f"this command runs as one of {size} MPI ranks, but mpi4py is not installed "
                          "(pip install -e \".[mpi]\")") from None
    finally:
        release_signals()
    return Ranks(MPI.COMM_WORLD, timeout)
