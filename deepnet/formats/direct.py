"""Byte spans of a large file read and written past the page cache (O_DIRECT), for streaming a core
larger than the RAM.

Through the page cache every byte is copied by the kernel, read-ahead and write-back compete for the
CPU the kernels need, and a dirty core is written back late and slowly; O_DIRECT moves the data
between the disk and the buffer alone (bench/README.md, "The billion-layer step"). O_DIRECT needs the
file offset, the length and the buffer aligned (ALIGN covers every common block size): a span is read
as the aligned span around it, and written as its aligned middle with O_DIRECT and its unaligned ends
(under a block each, shared with the neighbouring bytes) through the page cache, so no byte outside
the span is ever written. The kernel keeps the two coherent: an O_DIRECT read first writes back any
cached dirty page it covers. Where O_DIRECT is refused (tmpfs, some network file systems), everything
goes through the page cache, the written spans' write-back started at once and their pages dropped a
few spans later (posix_fadvise DONTNEED).
"""

from __future__ import annotations

import collections
import errno
import mmap
import os

#: Alignment of O_DIRECT offsets, lengths and buffers.
ALIGN = 4096
#: Spans written through the page cache and not yet dropped from it.
DROP_LAG = 4


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """A zeroed, page-aligned buffer of at least ``nbytes`` (an anonymous map) for :meth:`SpanIO.read`:
    a span of n bytes needs n + 2 * ALIGN."""
    return mmap.mmap(-1, max(ALIGN, -(-nbytes // ALIGN) * ALIGN))


def span_buffer_bytes(length: int) -> int:
    """The buffer a span of ``length`` bytes is read into."""
    return length + 2 * ALIGN


def _read_full(fd: int, buf: memoryview, offset: int, need: int) -> None:
    done = 0
    while done < need:
        n = os.preadv(fd, [buf[done:]], offset + done)
        if n <= 0:
            raise OSError(errno.EIO, f"the file ended at byte {offset + done}, inside the core")
        done += n


def _write_full(fd: int, buf: memoryview, offset: int) -> None:
    done = 0
    while done < len(buf):
        done += os.pwrite(fd, buf[done:], offset + done)


class SpanIO:
    """Reads and writes of byte spans of one file: O_DIRECT where the file system allows it."""

    def __init__(self, path: str, *, writable: bool, direct: bool = True) -> None:
        flags = os.O_RDWR if writable else os.O_RDONLY
        self.fd = os.open(path, flags)
        self.direct_fd: int | None = None
        if direct and hasattr(os, "O_DIRECT"):
            try:
                self.direct_fd = os.open(path, flags | os.O_DIRECT)
            except OSError:
                self.direct_fd = None
        self._written: collections.deque[tuple[int, int]] = collections.deque()

    @property
    def direct(self) -> bool:
        """Whether spans go past the page cache."""
        return self.direct_fd is not None

    def _no_direct(self) -> None:
        if self.direct_fd is not None:
            os.close(self.direct_fd)
            self.direct_fd = None

    def read(self, buf: mmap.mmap, first: int, length: int) -> int:
        """Bytes [first, first + length) of the file into ``buf`` (from :func:`aligned_buffer`, at least
        :func:`span_buffer_bytes`); returns where in ``buf`` they start."""
        view = memoryview(buf)
        if self.direct_fd is not None:
            lo = first // ALIGN * ALIGN
            hi = -(-(first + length) // ALIGN) * ALIGN
            try:
                _read_full(self.direct_fd, view[: hi - lo], lo, first + length - lo)
                return first - lo
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                self._no_direct()   # the file system takes no O_DIRECT after all: through the page cache
        _read_full(self.fd, view[:length], first, length)
        return 0

    def write(self, buf: mmap.mmap, at: int, first: int, length: int) -> None:
        """Write ``buf[at : at + length]`` (``at`` as :meth:`read` returned) at byte ``first``."""
        view = memoryview(buf)
        if self.direct_fd is not None:
            a = -(-first // ALIGN) * ALIGN                   # the aligned middle [a, b)
            b = (first + length) // ALIGN * ALIGN
            if b > a and (at + a - first) % ALIGN == 0:
                try:
                    _write_full(self.direct_fd, view[at + a - first: at + b - first], a)
                except OSError as exc:
                    if exc.errno != errno.EINVAL:
                        raise
                    self._no_direct()
                else:
                    _write_full(self.fd, view[at: at + a - first], first)            # the ends
                    _write_full(self.fd, view[at + b - first: at + length], b)
                    return
        _write_full(self.fd, view[at: at + length], first)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.fd, first, length, os.POSIX_FADV_DONTNEED)   # starts the write-back
            self._written.append((first, length))
            while len(self._written) > DROP_LAG:   # written by now: dropped from the page cache
                os.posix_fadvise(self.fd, *self._written.popleft(), os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        self._no_direct()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
