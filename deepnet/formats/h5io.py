"""Low-level HDF5 I/O of the model files: opening with deepnet's access properties, attributes that can be
rewritten in place, block writes, and raw writes that never touch HDF5 metadata.

Why the access properties (docs/DESIGN.md, "Files"): no chunk cache, because chunks are read and
written whole and sequentially and the OS page cache already holds recent ones; and no data sieve
buffer, because with one a small raw write (a ``chunk_step`` mark) could sit in HDF5's buffer while a
later, larger one (the rows it guards) went straight to the file, reversing the order a kill must see.
The crash-safety argument depends on the latter, so a failure to set it is an error, never a fallback.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import h5py
import numpy as np

from deepnet.formats import interrupts

#: Target size in bytes of one block written or read at a time by create(), write_core() and read_core().
WRITE_BLOCK_BYTES = 4 << 20

# Fixed-length ASCII attributes rewritten during training (see set_fixed_ascii_attr).
TIME_ATTR_LEN = 32
RNG_ATTR_QUANTUM = 512


class WriteBehind:
    """Writing a large file sequentially (at its end) without leaving it dirty in the page cache: after
    each write, the write-back of what was appended since is started and what was appended LAG writes
    before is dropped from the page cache (posix_fadvise DONTNEED starts the write-back of dirty pages
    and drops clean ones). Only for a file of at least ``MIN_BYTES``: the kernel's own write-back of a
    large dirty file is slow and throttles the writer (bench/README.md, "The billion-layer step")."""

    MIN_BYTES = 1 << 30
    LAG = 8

    def __init__(self, path: str, expected_bytes: int) -> None:
        on = expected_bytes >= self.MIN_BYTES and hasattr(os, "posix_fadvise")
        self._fd = os.open(path, os.O_RDONLY) if on else None
        self._marks = [0]

    def wrote(self) -> None:
        """Called after each write at the end of the file."""
        if self._fd is None:
            return
        end = os.fstat(self._fd).st_size
        os.posix_fadvise(self._fd, self._marks[-1], end - self._marks[-1], os.POSIX_FADV_DONTNEED)
        self._marks.append(end)
        if len(self._marks) > self.LAG + 1:
            old = self._marks.pop(0)
            os.posix_fadvise(self._fd, old, self._marks[0] - old, os.POSIX_FADV_DONTNEED)

    def __enter__(self) -> "WriteBehind":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def file_access() -> h5py.h5p.PropFAID:
    """A file-access property list: HDF5's defaults as h5py sets them, no chunk cache, no sieve buffer."""
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    # The bounds and alignment h5py.File would use, so files are laid out exactly as before.
    fapl.set_libver_bounds(h5py.h5f.LIBVER_EARLIEST, h5py.h5f.LIBVER_LATEST)
    fapl.set_alignment(1, 1)
    mdc_nelmts, rdcc_nslots, _, rdcc_w0 = fapl.get_cache()
    fapl.set_cache(mdc_nelmts, rdcc_nslots, 0, rdcc_w0)
    fapl.set_sieve_buf_size(0)
    return fapl


def open_h5(path: str, mode: str) -> h5py.File:
    """Open ("r", "r+") or create ("w", truncating) an HDF5 file with deepnet's access properties."""
    fapl = file_access()
    name = os.fsencode(path)
    if mode == "r":
        fid = h5py.h5f.open(name, h5py.h5f.ACC_RDONLY, fapl=fapl)
    elif mode == "r+":
        fid = h5py.h5f.open(name, h5py.h5f.ACC_RDWR, fapl=fapl)
    elif mode == "w":
        fid = h5py.h5f.create(name, h5py.h5f.ACC_TRUNC, fapl=fapl)
    else:
        raise ValueError(f"mode {mode!r}")
    return h5py.File(fid)


def set_attrs(obj: h5py.HLObject, values: Mapping[str, Any]) -> None:
    """Set attributes of a new `obj` from `values`, in order (numpy scalars keep their type)."""
    for name, value in values.items():
        obj.attrs[name] = value


def set_fixed_ascii_attr(obj: h5py.HLObject, name: str, text: str, quantum: int) -> None:
    """Write a string attribute of `obj` as fixed-length ASCII, NUL-padded to a multiple of `quantum` bytes.

    Rewriting a variable-length string attribute leaks its old value in the global heap; a fixed-length
    one of the same length reuses its storage, so per-step rewrites do not grow the file.
    """
    length = max(quantum, -(-len(text) // quantum) * quantum)
    dtype = h5py.string_dtype("ascii", length)
    rewrite_attr(obj, name, np.array(text.encode("ascii"), dtype=dtype), dtype)


def rewrite_attr(obj: h5py.HLObject, name: str, data: Any, dtype: Any) -> None:
    """Set an attribute of `obj` (a file or group), in place when one of the same type and shape exists.

    h5py's ``attrs[name] = x`` replaces an existing attribute in three calls (create a temporary, delete,
    rename); a Ctrl-C between them would leave the attribute missing. Writing in place is one call.
    """
    value = np.asarray(data, dtype=dtype)
    attrs = obj.attrs
    if name in attrs:
        attr = h5py.h5a.open(obj.id, name.encode())
        if attr.dtype == value.dtype and attr.shape == value.shape:
            attr.write(value)
            return
    attrs.create(name, value, dtype=dtype)


def write_block(dset: h5py.Dataset, start: int, block: np.ndarray) -> None:
    """Write `block` into rows [start, start + len(block)) of `dset` (every core write goes through here,
    so tests can make it fail); first raises a Ctrl-C a finaliser swallowed (:mod:`~deepnet.formats.interrupts`)."""
    interrupts.check()
    dset.write_direct(block, dest_sel=np.s_[start : start + block.shape[0]])


def block_layers(chunk_layers: int, row_size: int) -> int:
    """Layers per write/read block: a whole number of storage chunks, about WRITE_BLOCK_BYTES."""
    chunk_bytes = 4 * row_size * chunk_layers
    return chunk_layers * max(1, WRITE_BLOCK_BYTES // chunk_bytes)


def write_array_blocks(dset: h5py.Dataset, arr: np.ndarray, layers_per_block: int) -> None:
    """Write the whole (layers, row_size) `arr` into `dset` as float32, `layers_per_block` rows at a time."""
    for start in range(0, arr.shape[0], layers_per_block):
        block = np.ascontiguousarray(arr[start : start + layers_per_block], dtype=np.float32)
        write_block(dset, start, block)


def pwrite_all(fd: int, data: Any, offset: int) -> None:
    """pwrite all of `data`'s bytes at `offset` (looping over short writes)."""
    view = memoryview(data).cast("B")
    while len(view):
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def contiguous_offset(ds: h5py.Dataset) -> int | None:
    """Byte offset of a contiguous, allocated, unfiltered dataset in the file (None otherwise)."""
    if ds.chunks is not None or ds.compression or ds.shuffle or ds.fletcher32 or ds.scaleoffset is not None:
        return None
    try:
        offset = ds.id.get_offset()
    except Exception:  # pragma: no cover - an unallocated dataset
        return None
    return None if offset is None else int(offset)


class RawWriter:
    """Raw writes into the pre-allocated datasets of an open file: a pwrite on HDF5's own descriptor when
    the dataset is contiguous (no HDF5 call at all), else through h5py. Never changes HDF5 metadata."""

    def __init__(self, h5file: h5py.File, writable: bool) -> None:
        self._f = h5file
        self._fd: int | None = None
        if writable and h5file.driver == "sec2":
            try:
                self._fd = int(h5file.id.get_vfd_handle())
            except Exception:  # pragma: no cover - a driver without a plain descriptor
                self._fd = None
        self._offsets: dict[str, int | None] = {}

    def offset(self, name: str) -> int | None:
        """Byte offset of dataset `name` in the file when raw writes bypass HDF5, else None."""
        if name not in self._offsets:
            self._offsets[name] = contiguous_offset(self._f[name]) if self._fd is not None else None
        return self._offsets[name]

    def forget(self, name: str) -> None:
        """Drop the cached offset of `name` (after the dataset was created or replaced)."""
        self._offsets.pop(name, None)

    def write(self, name: str, array: np.ndarray, byte_offset: int = 0) -> None:
        """Write `array`'s bytes into dataset `name` at `byte_offset`."""
        offset = self.offset(name)
        flat = np.ascontiguousarray(array)
        if offset is not None:
            pwrite_all(self._fd, flat, offset + byte_offset)
            return
        ds = self._f[name]
        if byte_offset == 0 and flat.shape == ds.shape:
            ds.write_direct(flat)
            return
        # Only the commit record and chunk_step are written partially; both are 1-byte or 8-byte rows.
        start = byte_offset // ds.dtype.itemsize
        flat = flat.view(ds.dtype).reshape(-1)
        if ds.ndim == 1:
            ds.write_direct(flat, dest_sel=np.s_[start : start + flat.size])
        else:
            row, col = divmod(start, ds.shape[1])
            ds.write_direct(flat, dest_sel=np.s_[row, col : col + flat.size])
