"""MNIST IDX files: read and write them, gzip-compressed or raw, as NumPy ``uint8`` arrays.

An IDX file is a 4-byte magic number -- two zero bytes, a dtype code, the number of dimensions -- then
one big-endian uint32 per dimension, then the data in C order. Only dtype code 0x08 (unsigned byte) is
supported, which is all MNIST uses. Whether a file is gzip-compressed is decided by its first two bytes
(1f 8b), never by its name.

A file is untrusted input: every check that can be made on the header (sizes, and that the data fits
the file) is made before anything is allocated, a gzip stream is never decompressed further than the
header says it should go, and every problem comes out as a one-line :class:`~deepnet.errors.DataError`
that names the file.
"""

from __future__ import annotations

import gzip as _gzip
import os
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np

from deepnet.errors import DataError
from deepnet.formats.atomic import atomic_path
from deepnet.formats.values import one_line, os_reason

PathLike = Union[str, "os.PathLike[str]"]

GZIP_MAGIC = b"\x1f\x8b"
IMAGES_MAGIC = 2051  # 0x00000803: uint8, 3 dimensions
LABELS_MAGIC = 2049  # 0x00000801: uint8, 1 dimension
UINT8_CODE = 0x08
MAX_NDIM = 3
# Far above any MNIST-like file (train images are 47 MB) and well below what a header may claim, so a
# lying header is refused before any allocation.
MAX_PAYLOAD_BYTES = 2**31
# Deflate cannot expand data by more than about 1032:1, so a gzip file of c bytes cannot hold more than
# this many times c bytes of data; a header claiming more is refused before decompressing anything.
MAX_GZIP_RATIO = 1100
# Split names -> file stems of the four standard files.
SPLIT_STEMS = {"train": "train", "test": "t10k"}
_READ_CHUNK = 1 << 20


def _err(path: PathLike, what: str) -> DataError:
    """A DataError whose message is one line: the file, then what is wrong with it."""
    return DataError(f"{os.fspath(path)}: {one_line(what)}")


def _read_exact(f: BinaryIO, n: int) -> bytes:
    """Read up to ``n`` bytes, looping because a gzip stream may return fewer than asked."""
    parts = []
    remaining = n
    while remaining > 0:
        chunk = f.read(remaining)
        if not chunk:
            break
        parts.append(chunk)
        remaining -= len(chunk)
    return b"".join(parts)


def _parse_header(path: PathLike, f: BinaryIO, expected_magic: int | None) -> tuple[int, tuple[int, ...]]:
    """Read and validate the magic number and dimensions; return (header length, dims)."""
    magic_bytes = _read_exact(f, 4)
    if len(magic_bytes) == 0:
        raise _err(path, "empty file: no IDX header")
    if len(magic_bytes) < 4:
        raise _err(path, f"truncated header: {len(magic_bytes)} bytes, an IDX magic number needs 4")
    (magic,) = struct.unpack(">I", magic_bytes)
    if magic_bytes[0] != 0 or magic_bytes[1] != 0:
        raise _err(path, f"bad magic 0x{magic:08x}: an IDX file starts with two zero bytes")
    dtype_code, ndim = magic_bytes[2], magic_bytes[3]
    if dtype_code != UINT8_CODE:
        raise _err(path, f"unsupported dtype code 0x{dtype_code:02x} (only 0x08 = uint8 is supported)")
    if not 1 <= ndim <= MAX_NDIM:
        raise _err(path, f"bad number of dimensions {ndim} in magic 0x{magic:08x} (supported: 1..{MAX_NDIM})")
    if expected_magic is not None and magic != expected_magic:
        raise _err(path, f"bad magic {magic} (0x{magic:08x}), expected {expected_magic} (0x{expected_magic:08x})")
    dim_bytes = _read_exact(f, 4 * ndim)
    if len(dim_bytes) < 4 * ndim:
        raise _err(path, f"truncated header: {ndim} dimensions need {4 * ndim} bytes, file has {len(dim_bytes)}")
    dims = struct.unpack(f">{ndim}I", dim_bytes)
    for axis, size in enumerate(dims):
        if size == 0:
            raise _err(path, f"dimension {axis} is 0 in the header (dims {list(dims)})")
    return 4 + 4 * ndim, dims


def _payload_size(path: PathLike, dims: tuple[int, ...]) -> int:
    """The number of data bytes the header promises, refused if absurd (before anything is allocated)."""
    expected = 1
    for size in dims:
        expected *= size  # Python ints: no overflow even for 2**32 x 2**32 x 2**32
    if expected > MAX_PAYLOAD_BYTES:
        raise _err(path, f"absurd dimensions {list(dims)} in the header: {expected} bytes of data, limit is {MAX_PAYLOAD_BYTES}")
    return expected


def _read_raw_payload(path: PathLike, f: BinaryIO, header_len: int, expected: int) -> np.ndarray:
    # The file size is known, so the payload size is checked exactly before allocating.
    actual = os.fstat(f.fileno()).st_size - header_len
    if actual < expected:
        raise _err(path, f"truncated: header says {expected} bytes of data, file has {actual}")
    if actual > expected:
        raise _err(path, f"{actual - expected} extra bytes after the data: header says {expected} bytes of data, file has {actual}")
    out = np.empty(expected, dtype=np.uint8)
    got = f.readinto(memoryview(out))
    if got != expected:  # the file shrank under us
        raise _err(path, f"truncated: header says {expected} bytes of data, file has {got}")
    return out


def _read_gzip_payload(path: PathLike, f: BinaryIO, compressed_size: int, expected: int) -> np.ndarray:
    # The decompressed size is unknown until the stream ends, so bound it by what deflate can achieve,
    # then decompress at most expected + 1 bytes: one extra byte is enough to detect trailing data.
    if expected > compressed_size * MAX_GZIP_RATIO:
        raise _err(path, f"absurd dimensions: header says {expected} bytes of data, more than a {compressed_size}-byte gzip file can hold")
    out = np.empty(expected, dtype=np.uint8)
    view = memoryview(out)
    got = 0
    while got < expected:
        n = f.readinto(view[got : min(expected, got + _READ_CHUNK)])
        if not n:
            raise _err(path, f"truncated: header says {expected} bytes of data, file has {got}")
        got += n
    # Reading to the end of the stream also makes gzip check the CRC and length of every member. More
    # data than the header says is usually a corrupt stream decoding to garbage, so read on (discarding,
    # and bounded by the deflate ratio) until the CRC says which it is: a CRC failure is corrupt data.
    extra = len(f.read(1))
    while extra:
        n = len(f.read(_READ_CHUNK))
        if not n:
            break
        extra += n
    if extra:
        raise _err(path, f"{extra} extra bytes after the data: header says {expected} bytes of data, the stream "
                         f"has {expected + extra}")
    return out


def open_data_file(path: PathLike, kind: str) -> BinaryIO:
    """``path`` opened for reading, or a one-line DataError (missing, a directory, unreadable); ``kind``
    names what it should be ("an IDX file")."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise _err(path, "missing file: no such file") from None
    except IsADirectoryError:
        raise _err(path, f"is a directory, not {kind}") from None
    except OSError as exc:
        raise _err(path, f"cannot open: {os_reason(exc)}") from None


def _read(path: PathLike, expected_magic: int | None) -> np.ndarray:
    """Read one IDX file, checking the magic number against ``expected_magic`` if given."""
    with open_data_file(path, "an IDX file") as f:
        try:
            compressed_size = os.fstat(f.fileno()).st_size
            is_gzip = f.read(2) == GZIP_MAGIC
            f.seek(0)
            if is_gzip:
                with _gzip.GzipFile(fileobj=f, mode="rb") as gz:
                    _, dims = _parse_header(path, gz, expected_magic)
                    expected = _payload_size(path, dims)
                    flat = _read_gzip_payload(path, gz, compressed_size, expected)
            else:
                header_len, dims = _parse_header(path, f, expected_magic)
                expected = _payload_size(path, dims)
                flat = _read_raw_payload(path, f, header_len, expected)
        except DataError:
            raise
        except (EOFError, zlib.error, _gzip.BadGzipFile) as exc:
            raise _err(path, f"corrupt gzip data ({os_reason(exc)})") from None
        except (OSError, struct.error, ValueError) as exc:
            raise _err(path, f"cannot read: {exc}") from None
    return flat.reshape(dims)


def read_idx(path: PathLike) -> np.ndarray:
    """Read an IDX file (gzip or raw) of dtype uint8 and 1 to 3 dimensions.

    Returns a writable C-contiguous ``uint8`` array whose shape is the header's dimensions.
    Raises :class:`DataError` naming the file for anything wrong with it.
    """
    return _read(path, None)


def read_images(path: PathLike) -> np.ndarray:
    """Read an IDX images file (magic 2051): a ``uint8`` array of shape (n, rows, cols)."""
    return _read(path, IMAGES_MAGIC)


def read_labels(path: PathLike, max_label: int = 9) -> np.ndarray:
    """Read an IDX labels file (magic 2049): a ``uint8`` array of shape (n,), every label in 0..max_label."""
    labels = _read(path, LABELS_MAGIC)
    bad = np.flatnonzero(labels > max_label)
    if bad.size:
        i = int(bad[0])
        raise _err(path, f"label out of range: label {i} is {int(labels[i])}, expected 0..{max_label} "
                         f"({bad.size} bad labels)")
    return labels


def encode_idx(array: np.ndarray) -> bytes:
    """The uncompressed IDX bytes of a uint8 array of 1 to 3 dimensions (header then data)."""
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise ValueError(f"IDX writer supports uint8 only, got {array.dtype}")
    if not 1 <= array.ndim <= MAX_NDIM:
        raise ValueError(f"IDX writer supports 1..{MAX_NDIM} dimensions, got {array.ndim}")
    if any(size == 0 or size >= 2**32 for size in array.shape):
        raise ValueError(f"every IDX dimension must be in 1..2**32-1, got shape {array.shape}")
    header = struct.pack(f">BBBB{array.ndim}I", 0, 0, UINT8_CODE, array.ndim, *array.shape)
    return header + np.ascontiguousarray(array).tobytes()


def write_idx(path: PathLike, array: np.ndarray, gzip: bool = False) -> None:
    """Write a uint8 array of 1 to 3 dimensions as an IDX file, gzip-compressed if ``gzip``.

    The file is written under a temporary name and renamed into place (:func:`atomic_path`), so a reader
    never sees a half written file. The gzip header carries no name or time, so the same array always gives the same bytes.
    Raises ValueError for an array IDX cannot hold (a programming error, not a data error).
    """
    data = encode_idx(array)
    with atomic_path(path) as tmp, open(tmp, "xb") as f:
        if gzip:
            with _gzip.GzipFile(filename="", mode="wb", fileobj=f, compresslevel=6, mtime=0) as gz:
                gz.write(data)
        else:
            f.write(data)


def find_idx_file(data_dir: PathLike, name: str) -> Path | None:
    """The file ``name`` in ``data_dir``, raw or with ``.gz``; the raw one if both exist, None if neither."""
    for candidate in (Path(data_dir) / name, Path(data_dir) / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def mnist_file_names(split: str) -> tuple[str, str]:
    """The (images, labels) file names of an MNIST split, "train" or "test", without ``.gz``."""
    if split not in SPLIT_STEMS:
        raise ValueError(f"split must be one of {sorted(SPLIT_STEMS)}, got {split!r}")
    stem = SPLIT_STEMS[split]
    return f"{stem}-images-idx3-ubyte", f"{stem}-labels-idx1-ubyte"


def load_idx_split(data_dir: PathLike, split: str, *, max_label: int = 255) -> tuple[np.ndarray, np.ndarray]:
    """Load a split of any dataset laid out as MNIST is (the four files of :func:`mnist_file_names`, raw
    or ``.gz``, in ``data_dir``): images uint8 (n, rows, cols) and labels uint8 (n,). A missing file,
    a malformed one, or image and label counts that differ are a one-line :class:`DataError`."""
    images_name, labels_name = mnist_file_names(split)
    paths = []
    for name in (images_name, labels_name):
        found = find_idx_file(data_dir, name)
        if found is None:
            raise _err(Path(data_dir) / name, f"missing file: neither {name} nor {name}.gz in {os.fspath(data_dir)}")
        paths.append(found)
    images_path, labels_path = paths
    images = read_images(images_path)
    labels = read_labels(labels_path, max_label)
    if len(images) != len(labels):
        raise _err(
            images_path,
            f"count mismatch: {len(images)} images but {os.fspath(labels_path)} has {len(labels)} labels",
        )
    return images, labels


def load_mnist(data_dir: PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Load an MNIST split from ``data_dir``: images uint8 (n, 28, 28) and labels uint8 (n,).

    Each file may be raw or gzip-compressed (``.gz``). Raises :class:`DataError` if a file is missing or
    malformed, the images are not 28x28, or the image and label counts differ.
    """
    images, labels = load_idx_split(data_dir, split, max_label=9)
    if images.shape[1:] != (28, 28):
        images_path = find_idx_file(data_dir, mnist_file_names(split)[0])
        raise _err(images_path, f"MNIST images must be 28x28, header says {images.shape[1]}x{images.shape[2]}")
    return images, labels
