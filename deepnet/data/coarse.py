"""Coarse-grained byte inputs: each k x k cell of an 8-bit image becomes two bytes, its maximum and a ratio.

Cells. An image side of length H is cut into ``ceil(H/k)`` cells, starting at pixel 0; when k does not
divide H the last cell along that side is partial (28 with k=3: nine cells of 3 pixels and a last one of
1 pixel). A partial cell's maximum and average are over the pixels it actually covers: there is no padding.

The two bytes of a cell. With s the sum of the cell's pixels, c their number and m their maximum:

- MAX  = m;
- VAL2 = ``(2*255*s + c*m) // (2*c*m)``, and 0 when m == 0. This is the integer nearest to
  ``r = 255*avg/m`` (avg = s/c), ties rounded up, computed exactly in integers:
  ``floor(r + 1/2) = floor((2*255*s + c*m) / (2*c*m))``. Since 0 <= avg <= m, 0 <= r <= 255, hence
  0 <= VAL2 <= floor(255.5) = 255.

The approximate average is ``m*VAL2/255``. Bound: ``|m*VAL2/255 - avg| <= m/510 <= 0.5`` pixel levels
(1/510 on the [0, 1] scale). Proof: ``m*VAL2/255 - avg = (m/255) * (VAL2 - r)`` and rounding to the
nearest integer gives ``|VAL2 - r| <= 1/2``, so the error is at most ``(m/255) * (1/2) = m/510 <= 255/510``.

Feature layout. :func:`coarsen` gives ``uint8 (n, ceil(H/k), ceil(W/k), 2)``: the cells in row-major
order, each ``[MAX, VAL2]``. :func:`decode` flattens that to float32 ``(n, cells_h*cells_w*2)`` with the
two values of a cell side by side. With k=4 a 28x28 MNIST image becomes 7*7*2 = 98 inputs instead of 784.

The coarse file (``mnist-coarse.bin`` beside the MNIST IDX files) holds several k for both splits.
Integers are little-endian uint32; the header is::

    offset  size  field
    0       8     magic b"DNCOARSE"
    8       4     format version (1)
    12      4     image height H
    16      4     image width W
    20      4     K, the number of ks
    24      4     train image count
    28      4     test image count
    32      32    sha256 of the train source images (raw digest, see :func:`images_sha256`)
    64      32    sha256 of the test source images
    96      4*K   the ks, strictly increasing, each in 2..max(H, W)

The data follows at ``96 + 4*K``: for each k in header order, then for each split (train, test), the
uint8 array ``(count, ceil(H/k), ceil(W/k), 2)`` in C order, with nothing in between and nothing after,
so a block's offset is the header length plus the sizes of the blocks before it
(:func:`coarse_file_info` gives every offset). Labels are not stored: they stay in the IDX label files.
Beside the file, ``<name>.sha256`` holds its sha256 as ``sha256sum`` writes it (``<hex>  <name>``);
:func:`read_coarse` checks it once per process for each version of the file (device, inode, size, mtime).
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np

from deepnet.data.mnist import ensure_mnist
from deepnet.errors import ConfigError, DataError
from deepnet.formats.atomic import atomic_path
from deepnet.formats.idx import IMAGES_MAGIC, load_mnist, open_data_file
from deepnet.formats.values import check_int, is_int, one_line, os_reason, show

PathLike = Union[str, "os.PathLike[str]"]

DECODINGS = ("ratio", "raw")
SPLITS = ("train", "test")
MAGIC = b"DNCOARSE"
VERSION = 1
COARSE_MNIST_NAME = "mnist-coarse.bin"
MNIST_SIDE = 28
_FIXED = struct.Struct("<8s6I32s32s")  # magic, version, H, W, K, train count, test count, two digests
_HASH_BLOCK = 1 << 20
_SIDECAR_LINE = re.compile(r"^([0-9a-fA-F]{64}) [ *](.+)$")
# Digest of each file version already hashed by this process: (device, inode, size, mtime_ns) -> hex.
_VERIFIED: dict[tuple[int, int, int, int], str] = {}


# ----------------------------------------------------------------------------------------------------
# Encoding


def cells(side: int, k: int) -> int:
    """The number of k-pixel cells along an image side of ``side`` pixels: ceil(side / k)."""
    side = check_int("image side", side, minimum=0)
    k = check_int("k", k, minimum=1)
    return -(-side // k)


def _fold(a: np.ndarray, k: int, axis: int, op: Callable, dtype: type) -> np.ndarray:
    """Combine each run of k consecutive entries along ``axis`` with ``op`` (the last run may be shorter).

    Strided slices ``j::k`` combined element-wise: far faster than a reduction over a reshaped small axis,
    and it needs no padding, so a partial cell is reduced over its own pixels only.
    """
    def part(j: int) -> np.ndarray:
        return a[(slice(None),) * axis + (slice(j, None, k),)]

    out = part(0).astype(dtype)
    for j in range(1, min(k, a.shape[axis])):
        piece = part(j)
        head = out[(slice(None),) * axis + (slice(0, piece.shape[axis]),)]
        op(head, piece, out=head)
    return out


def _sum_dtype(pixels: int) -> type:
    """The smallest unsigned dtype that holds the sum of ``pixels`` bytes."""
    for dtype in (np.uint16, np.uint32):
        if pixels * 255 <= np.iinfo(dtype).max:
            return dtype
    return np.uint64


def _cell_sizes(side: int, k: int) -> np.ndarray:
    """Pixels covered by each cell along a side (k, except a shorter last cell)."""
    starts = np.arange(cells(side, k), dtype=np.int64) * k
    return np.minimum(k, side - starts)


def _check_images(images: np.ndarray) -> None:
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8:
        raise ConfigError(f"images must be a uint8 array, got {getattr(images, 'dtype', type(images).__name__)}")
    if images.ndim != 3:
        raise ConfigError(f"images must have shape (n, height, width), got {images.ndim} dimensions")


def coarsen(images: np.ndarray, k: int) -> np.ndarray:
    """Images uint8 (n, H, W) -> uint8 (n, ceil(H/k), ceil(W/k), 2): per cell [max, VAL2] (module docstring).

    k == 1 is allowed (each pixel a cell: max = pixel, VAL2 = 255 if pixel > 0 else 0). Raises
    ConfigError for images that are not a 3-dimensional uint8 array or a k below 1.
    """
    _check_images(images)
    k = check_int("k", k, minimum=1)
    n, height, width = images.shape
    peak = _fold(_fold(images, k, 2, np.maximum, np.uint8), k, 1, np.maximum, np.uint8)
    total = _fold(_fold(images, k, 2, np.add, _sum_dtype(k)), k, 1, np.add, _sum_dtype(k * k))
    out = np.empty(peak.shape + (2,), dtype=np.uint8)
    out[..., 0] = peak
    out[..., 1] = _ratio(peak, total, np.outer(_cell_sizes(height, k), _cell_sizes(width, k)))
    return out


def _ratio(peak: np.ndarray, total: np.ndarray, count: np.ndarray) -> np.ndarray:
    """VAL2 = (2*255*s + c*m) // (2*c*m) per cell, from the maxima m, sums s and pixel counts c."""
    # The numerator is at most 511*255*c: uint32 holds it for cells of up to 32,960 pixels, and 32-bit
    # division is several times faster than 64-bit.
    wide = np.uint32 if 511 * 255 * int(count.max(initial=0)) <= np.iinfo(np.uint32).max else np.uint64
    cm = count.astype(wide) * peak.astype(wide)
    num = total.astype(wide)
    num *= 2 * 255
    num += cm
    cm *= 2
    # m == 0 means s == 0, so the numerator is 0 and any positive denominator gives VAL2 = 0.
    np.maximum(cm, 1, out=cm)
    num //= cm
    return num


def decode(coarse: np.ndarray, how: str = "ratio") -> np.ndarray:
    """Coarse bytes uint8 (n, ch, cw, 2) -> float32 inputs (n, ch*cw*2), each cell's two values side by side.

    ``how="ratio"``: [max/255, max*VAL2/65025] (the cell's approximate average on the [0, 1] scale);
    ``how="raw"``: [max/255, VAL2/255]. Each value is the float32 nearest to the exact quotient.
    Raises ConfigError for another ``how`` or an array of another dtype or shape.
    """
    if how not in DECODINGS:
        raise ConfigError(f"decoding must be one of {', '.join(DECODINGS)}, got {show(how)}")
    if not isinstance(coarse, np.ndarray) or coarse.dtype != np.uint8 or coarse.ndim != 4 or coarse.shape[3] != 2:
        raise ConfigError(f"coarse inputs must be a uint8 array of shape (n, cells_h, cells_w, 2), got "
                          f"{getattr(coarse, 'dtype', type(coarse).__name__)} {getattr(coarse, 'shape', '')}")
    peak, val2 = coarse[..., 0], coarse[..., 1]
    out = np.empty(coarse.shape, dtype=np.float32)
    out[..., 0] = peak.astype(np.float32) / np.float32(255)
    if how == "ratio":
        # m * VAL2 <= 65025 is exact in uint16 and float32, so one division rounds once.
        out[..., 1] = (peak.astype(np.uint16) * val2).astype(np.float32) / np.float32(255 * 255)
    else:
        out[..., 1] = val2.astype(np.float32) / np.float32(255)
    return out.reshape(coarse.shape[0], -1)


def images_sha256(images: np.ndarray) -> str:
    """The sha256 (hex) of the uncompressed IDX image file holding ``images`` (n, H, W) uint8.

    That is the 16-byte IDX header (00 00 08 03, then n, H, W as big-endian uint32) followed by the pixels
    in C order, so for the real MNIST files it equals their published sha256 (SHA256SUMS.uncompressed).
    """
    _check_images(images)
    digest = hashlib.sha256(struct.pack(">I3I", IMAGES_MAGIC, *images.shape))
    digest.update(np.ascontiguousarray(images).data)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------
# The file: header


@dataclass(frozen=True)
class _Header:
    height: int
    width: int
    ks: tuple[int, ...]
    counts: dict[str, int]
    sources: dict[str, str]

    @property
    def length(self) -> int:
        return _FIXED.size + 4 * len(self.ks)

    def shape(self, k: int, split: str) -> tuple[int, int, int, int]:
        return (self.counts[split], cells(self.height, k), cells(self.width, k), 2)

    def blocks(self) -> dict[tuple[int, str], tuple[int, tuple[int, int, int, int]]]:
        """(k, split) -> (offset, shape), in file order."""
        layout, offset = {}, self.length
        for k in self.ks:
            for split in SPLITS:
                shape = self.shape(k, split)
                layout[(k, split)] = (offset, shape)
                offset += int(np.prod(shape))
        return layout

    @property
    def file_size(self) -> int:
        offset, shape = self.blocks()[(self.ks[-1], SPLITS[-1])]
        return offset + int(np.prod(shape))

    def pack(self) -> bytes:
        fixed = _FIXED.pack(MAGIC, VERSION, self.height, self.width, len(self.ks),
                            *(self.counts[s] for s in SPLITS), *(bytes.fromhex(self.sources[s]) for s in SPLITS))
        return fixed + struct.pack(f"<{len(self.ks)}I", *self.ks)


def _err(path: PathLike, what: str) -> DataError:
    """A one-line DataError naming the file."""
    return DataError(f"{os.fspath(path)}: {one_line(what)}")


def _parse_header(path: PathLike, f: BinaryIO, size: int) -> _Header:
    """Read and check the header of an open coarse file of ``size`` bytes (nothing else is read)."""
    fixed = f.read(_FIXED.size)
    if not fixed:
        raise _err(path, "empty file: no coarse-input header")
    if len(fixed) < _FIXED.size:
        raise _err(path, f"truncated header: {len(fixed)} bytes, the fixed header needs {_FIXED.size}")
    magic, version, height, width, nk, n_train, n_test, sha_train, sha_test = _FIXED.unpack(fixed)
    if magic != MAGIC:
        raise _err(path, f"not a coarse-input file: magic {magic!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise _err(path, f"format version {version}, this deepnet reads version {VERSION}")
    if height < 1 or width < 1:
        raise _err(path, f"malformed header: image size {height}x{width}")
    if not 1 <= nk <= max(height, width) - 1:
        raise _err(path, f"malformed header: {nk} ks for {height}x{width} images (1..{max(height, width) - 1} possible)")
    raw_ks = f.read(4 * nk)
    if len(raw_ks) < 4 * nk:
        raise _err(path, f"truncated header: {nk} ks need {4 * nk} bytes after the fixed header, file has {len(raw_ks)}")
    ks = struct.unpack(f"<{nk}I", raw_ks)
    if list(ks) != sorted(set(ks)) or ks[0] < 2 or ks[-1] > max(height, width):
        raise _err(path, f"malformed header: ks {list(ks)} are not strictly increasing in 2..{max(height, width)}")
    header = _Header(height, width, ks, {"train": n_train, "test": n_test},
                     {"train": sha_train.hex(), "test": sha_test.hex()})
    if size < header.file_size:
        raise _err(path, f"truncated: header says {header.file_size} bytes, file has {size}")
    if size > header.file_size:
        raise _err(path, f"{size - header.file_size} extra bytes: header says {header.file_size} bytes, file has {size}")
    return header


def _open(path: PathLike) -> BinaryIO:
    return open_data_file(path, "a coarse-input file")


def coarse_file_info(path: PathLike) -> dict:
    """The header of a coarse file, without reading its arrays or checking its sha256.

    Keys: ``version``, ``height``, ``width``, ``ks`` (list), ``counts`` and ``source_sha256`` (by split),
    ``blocks`` ({(k, split): (offset, shape)}) and ``size``. Raises DataError for a missing, truncated
    or malformed file.
    """
    with _open(path) as f:
        size = os.fstat(f.fileno()).st_size
        header = _parse_header(path, f, size)
    return {"version": VERSION, "height": header.height, "width": header.width, "ks": list(header.ks),
            "counts": dict(header.counts), "source_sha256": dict(header.sources), "blocks": header.blocks(),
            "size": size}


# ----------------------------------------------------------------------------------------------------
# The file: checksum


def sidecar_path(path: PathLike) -> Path:
    """Where the sha256 of the coarse file at ``path`` is kept: ``<path>.sha256``."""
    return Path(os.fspath(path) + ".sha256")


def _file_sha256(f: BinaryIO) -> str:
    """sha256 (hex) of an open file from its start, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    buffer = bytearray(_HASH_BLOCK)
    view = memoryview(buffer)
    f.seek(0)
    while n := f.readinto(buffer):
        digest.update(view[:n])
    return digest.hexdigest()


def _recorded_sha256(path: PathLike) -> str:
    """The digest the sidecar of ``path`` records (DataError if it is missing or malformed)."""
    sidecar = sidecar_path(path)
    try:
        text = sidecar.read_text(encoding="ascii", errors="replace")
    except FileNotFoundError:
        raise _err(path, f"missing checksum file {sidecar.name}: cannot verify it (rebuild the file)") from None
    except OSError as exc:
        raise _err(path, f"cannot read its checksum file {sidecar.name}: {os_reason(exc)}") from None
    match = _SIDECAR_LINE.match(text.strip())
    if not match or match.group(2) != Path(path).name:
        raise _err(path, f"malformed checksum file {sidecar.name}: expected '<sha256>  {Path(path).name}'")
    return match.group(1).lower()


def _verify(path: PathLike, f: BinaryIO) -> None:
    """Check the open file against its sidecar, hashing each version of the file once per process."""
    st = os.fstat(f.fileno())
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    recorded = _recorded_sha256(path)
    if key not in _VERIFIED:
        _VERIFIED[key] = _file_sha256(f)
    actual = _VERIFIED[key]
    if actual != recorded:
        raise _err(path, f"sha256 mismatch: the file has {actual[:12]}..., {sidecar_path(path).name} says "
                         f"{recorded[:12]}... (corrupt or changed; rebuild it)")


def _verified_header(path: PathLike, f: BinaryIO) -> _Header:
    _verify(path, f)
    f.seek(0)
    return _parse_header(path, f, os.fstat(f.fileno()).st_size)


# ----------------------------------------------------------------------------------------------------
# The file: read and write


def read_coarse(path: PathLike, k: int, split: str) -> np.ndarray:
    """The uint8 (n, ceil(H/k), ceil(W/k), 2) block of ``k`` and ``split`` ("train" or "test").

    The whole file is checked against its ``.sha256`` sidecar first (once per process per version of the
    file), then only that block is read. Raises DataError (one line naming the file) for a missing file, a
    missing or mismatching sidecar, a truncated or malformed header, a k the file does not hold (the
    message lists those it holds) or an unknown split.
    """
    if split not in SPLITS:
        raise _err(path, f"unknown split {show(split)} (the file holds {', '.join(SPLITS)})")
    with _open(path) as f:
        header = _verified_header(path, f)
        if not is_int(k) or int(k) not in header.ks:
            hint = " (k=1 is the images themselves)" if is_int(k) and int(k) == 1 else ""
            raise _err(path, f"k={show(k)} is not in the file, which holds k = "
                             f"{', '.join(map(str, header.ks))}{hint}")
        offset, shape = header.blocks()[(int(k), split)]
        out = np.empty(shape, dtype=np.uint8)
        f.seek(offset)
        got = f.readinto(memoryview(out).cast("B"))
    if got != out.nbytes:  # the file was verified, so only a file shrinking meanwhile gets here
        raise _err(path, f"truncated: block k={k} {split} needs {out.nbytes} bytes, read {got}")
    return out


def _check_ks(ks: Iterable[int], largest: int) -> tuple[int, ...]:
    """Distinct ks for a file, sorted; ConfigError unless each is an integer in 2..largest."""
    if isinstance(ks, (str, bytes)) or not isinstance(ks, Iterable):
        raise ConfigError(f"ks must be a list of integers, got {show(ks)}")
    values = [check_int("k", k) for k in ks]
    if not values:
        raise ConfigError("ks must name at least one k")
    bad = [k for k in values if not 2 <= k <= largest]
    if bad:
        raise ConfigError(f"every k of a coarse file must be in 2..{largest} (k=1 is no coarsening), got {bad[0]}")
    return tuple(sorted(set(values)))


def _check_sources(source_sha256: Mapping[str, str]) -> dict[str, str]:
    if not isinstance(source_sha256, Mapping) or set(source_sha256) != set(SPLITS):
        raise ConfigError(f"source_sha256 must map exactly {', '.join(SPLITS)} to a sha256, got {show(source_sha256)}")
    for split, digest in source_sha256.items():
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
            raise ConfigError(f"source_sha256[{split!r}] must be 64 hex digits, got {show(digest)}")
    return {split: source_sha256[split].lower() for split in SPLITS}


def write_coarse_file(path: PathLike, train_images: np.ndarray, test_images: np.ndarray, ks: Iterable[int],
                      source_sha256: Mapping[str, str]) -> str:
    """Write the coarse file for ``ks`` (each in 2..max(H, W); duplicates merged) and its ``.sha256`` sidecar.

    ``source_sha256`` maps "train" and "test" to the sha256 (hex) of the images they came from (see
    :func:`images_sha256`), recorded so a stale file can be recognised. Both files are replaced atomically
    (:func:`~deepnet.formats.atomic.atomic_path`). Returns the file's sha256 (hex). Raises ConfigError for
    bad arguments, DataError if the files cannot be written.
    """
    images = {"train": train_images, "test": test_images}
    for array in images.values():
        _check_images(array)
    if train_images.shape[1:] != test_images.shape[1:]:
        raise ConfigError(f"train and test images differ in size: {train_images.shape[1:]} and {test_images.shape[1:]}")
    height, width = train_images.shape[1:]
    header = _Header(height, width, _check_ks(ks, max(height, width)),
                     {s: len(images[s]) for s in SPLITS}, _check_sources(source_sha256))
    digest = hashlib.sha256()
    try:
        with atomic_path(path, size=header.file_size) as tmp, open(tmp, "xb") as f:
            for chunk in _encoded(header, images):
                digest.update(chunk)
                f.write(chunk)
        line = f"{digest.hexdigest()}  {Path(path).name}\n"
        with atomic_path(sidecar_path(path)) as tmp, open(tmp, "x", encoding="ascii") as f:
            f.write(line)
    except OSError as exc:
        raise _err(path, f"cannot write: {os_reason(exc)}") from None
    return digest.hexdigest()


def _encoded(header: _Header, images: Mapping[str, np.ndarray]) -> Iterable[memoryview | bytes]:
    """The file's bytes in order: the header, then each (k, split) block, computed one at a time."""
    yield header.pack()
    for k in header.ks:
        for split in SPLITS:
            yield memoryview(coarsen(images[split], k)).cast("B")


# ----------------------------------------------------------------------------------------------------
# MNIST


def _held(path: Path) -> _Header | None:
    """The header of a valid coarse file at ``path`` (sidecar checked), or None if absent or unusable."""
    if not path.is_file():
        return None
    try:
        with _open(path) as f:
            return _verified_header(path, f)
    except DataError:
        return None  # a damaged or stale file is simply rebuilt


def ensure_coarse_mnist(data_dir: PathLike | None, ks: Iterable[int], *, out_dir: PathLike | None = None) -> Path:
    """The coarse file of MNIST (``mnist-coarse.bin``) holding every k of ``ks``, built first if needed.

    MNIST is taken from :func:`~deepnet.data.mnist.ensure_mnist` (``data_dir``, None for the default);
    the file goes in ``out_dir`` (default: that data directory). An existing file is returned as it is
    when its sidecar checks, it holds every requested k and its source sha256s equal those of the current
    MNIST images (:func:`images_sha256`); otherwise it is rewritten holding the ks it had (if it was valid)
    and the requested ones. Each k must be an integer in 2..28 (ConfigError, before anything is read).
    """
    wanted = _check_ks(ks, MNIST_SIDE)
    directory = ensure_mnist(data_dir)
    target = Path(out_dir if out_dir is not None else directory) / COARSE_MNIST_NAME
    images = {split: load_mnist(directory, split)[0] for split in SPLITS}
    sources = {split: images_sha256(images[split]) for split in SPLITS}
    header = _held(target)
    if header is not None and header.sources == sources and set(wanted) <= set(header.ks):
        return target
    union = set(wanted) | set(header.ks if header is not None else ())
    write_coarse_file(target, images["train"], images["test"], union, sources)
    return target
