"""A Mach section's messages over MPI: pickled states and gradients with non-blocking sends, picked up
between steps, and the waits of the synchronous configurations (counted as blocked time).
"""

from __future__ import annotations

from typing import Any, Callable

from deepnet.distributed.mpi import Ranks

#: Message tags (above the exact pipeline's): states up, gradients down, control (any rank to any rank).
TAG_UP, TAG_DOWN, TAG_CONTROL = 4 << 20, 5 << 20, 6 << 20

#: The longest pause of a rank that waits at the end of a run (between two looks at its messages).
MAX_PAUSE = 0.0005


class Abandon(Exception):
    """A step that waited for a message that cannot come: the run ends before it (see deepnet.mach.run)."""


class MpiSectionLink:
    """A section's neighbours over MPI: pickled messages, non-blocking sends, waits that keep answering
    the control messages and count as blocked time."""

    def __init__(self, ranks: Ranks) -> None:
        self.ranks, self.comm = ranks, ranks.comm
        #: Called between two looks while waiting; returns True when the wait is to be abandoned (the run
        #: ends before the step that waits). The run sets it: it answers the control messages.
        self.while_waiting: Callable[[], bool] = lambda: False
        self.rank, self.size = ranks.rank, ranks.size
        self.pending: list[Any] = []
        self.blocked = 0.0
        self.sent_bytes = 0
        self.gradients: list[dict] = []

    def isend(self, obj: Any, dest: int, tag: int) -> None:
        self.pending.append(self.comm.isend(obj, dest=dest, tag=tag))
        if len(self.pending) > 64:
            self.pending = [r for r in self.pending if not r.test()[0]]

    def sends_done(self) -> bool:
        self.pending = [r for r in self.pending if not r.test()[0]]
        return not self.pending

    def send_up(self, message: dict) -> None:
        self.sent_bytes += message["h"].nbytes + message["idx"].nbytes
        self.isend(message, self.rank + 1, TAG_UP)

    def send_down(self, message: dict) -> None:
        self.sent_bytes += message["g"].nbytes
        self.isend(message, self.rank - 1, TAG_DOWN)

    def drain(self, source: int, tag: int) -> list[dict]:
        out = []
        while self.comm.iprobe(source=source, tag=tag):
            out.append(self.comm.recv(source=source, tag=tag))
        return out

    def take_inputs(self, wait: bool) -> list[dict]:
        out = self.drain(self.rank - 1, TAG_UP)
        if wait and not out:
            self._wait(lambda: self.comm.iprobe(source=self.rank - 1, tag=TAG_UP), self.rank - 1, "an input")
            out = self.drain(self.rank - 1, TAG_UP)
        return out

    def take_gradients(self) -> list[dict]:
        return self.drain(self.rank + 1, TAG_DOWN)

    def wait_gradient(self, minibatch: int) -> list[dict]:
        out = self.take_gradients()
        while not any(m["id"] == minibatch for m in out):
            self._wait(lambda: self.comm.iprobe(source=self.rank + 1, tag=TAG_DOWN), self.rank + 1, "a gradient")
            out += self.take_gradients()
        return out

    def _wait(self, ready: Callable[[], bool], peer: int, what: str) -> None:
        """Wait for ``ready()`` with the run's deadline, answering control messages meanwhile; the time
        counts as blocked."""
        def between() -> None:
            if self.while_waiting():
                raise Abandon()

        waited = self.ranks.waited
        try:
            self.ranks.wait_for(lambda: (ready(), None), peer, what, between)
        finally:
            self.blocked += self.ranks.waited - waited
