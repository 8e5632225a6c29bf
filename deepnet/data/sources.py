"""The data a model learns from, behind one interface, and the record of it a model file keeps.

``--data`` names the source:

    mnist          MNIST in the data directory ($DEEPNET_DATA, else a per-user cache; fetched if missing)
    idx:DIR        the four IDX files of any dataset laid out as MNIST is (train-images-idx3-ubyte,
                   train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, each raw or
                   .gz), e.g. Fashion-MNIST; any image size and class count
    npz:FILE       arrays x (n, ...) and y (n,) of integer labels, and optionally x_test and y_test; x of
                   uint8 is scaled by 1/255 (pixels), x of floats is taken as it is
    teacher:FILE   Gaussian inputs labelled by a teacher network (deepnet.data.teacher), fresh every step

``--coarsen K`` (K >= 2; images only) turns each K x K cell of an image into two bytes, its maximum and
the ratio byte VAL2 (deepnet.data.coarse), decoded into two inputs per cell. The classes are 0..max
label; the input dimension is what the transform makes of one sample. A model records its source,
transform and loss when it is created (deepnet.formats.data_record); a run on an existing model takes
the transform and loss from the file (a flag that disagrees is refused) and its source unless --data
names another of the same input dimension and classes.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from deepnet.data import coarse
from deepnet.data.dataset import ArrayDataset, Dataset, pixels
from deepnet.data.mnist import ensure_mnist
from deepnet.data.teacher import TeacherDataset
from deepnet.errors import ConfigError, DataError
from deepnet.formats.data_record import LOSSES, DataRecord
from deepnet.formats.idx import find_idx_file, load_idx_split, load_mnist, mnist_file_names, read_labels

SOURCE_KINDS = ("mnist", "idx", "npz", "teacher")
SOURCE_FORMS = "mnist, idx:DIR, npz:FILE or teacher:FILE"
_NPZ_KEYS = ("x", "y", "x_test", "y_test")
_MAX_NPZ_CLASSES = 1 << 16


def parse_source(text: str | None) -> str:
    """The canonical form of a ``--data`` value (a path made absolute); a malformed value, or a path that
    is not there, is a one-line ConfigError."""
    if text is None or str(text).strip() == "":
        return "mnist"
    text = str(text).strip()
    kind, sep, where = text.partition(":")
    if kind == "mnist" and not sep:
        return "mnist"
    if kind not in SOURCE_KINDS[1:] or not sep or not where:
        raise ConfigError(f"--data must be {SOURCE_FORMS}, got {text!r}")
    path = Path(where).expanduser()
    if kind == "idx" and not path.is_dir():
        raise ConfigError(f"--data {text}: {where} is not a directory")
    if kind != "idx" and not path.is_file():
        raise ConfigError(f"--data {text}: {where} is not a file")
    return f"{kind}:{path.resolve()}"


def source_kind(source: str) -> str:
    """"mnist", "idx", "npz" or "teacher"."""
    return source.partition(":")[0]


def check_coarsen(k: int) -> int:
    """``--coarsen K``: an integer >= 1 (1: the pixels as they are)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"--coarsen must be an integer >= 1 (1: no coarsening), got {k!r}")
    return int(k)


def new_record(*, source: str | None, coarsen: int | None, decode: str | None, loss: str | None) -> DataRecord:
    """The data record of a model created from these flags (None: the default)."""
    canonical = parse_source(source)
    record = DataRecord(source=canonical, coarsen=1 if coarsen is None else check_coarsen(coarsen),
                        decode=coarse.DECODINGS[0] if decode is None else _check_decode(decode),
                        loss=("mse" if source_kind(canonical) == "teacher" else "xent") if loss is None
                        else _check_loss(loss))
    if record.coarsen > 1 and source_kind(canonical) == "teacher":
        raise ConfigError("--coarsen applies to image data, not to a teacher's Gaussian inputs")
    if record.loss == "mse" and source_kind(canonical) != "teacher":
        raise ConfigError(f"--loss mse needs target vectors: use --data teacher:FILE ({canonical} has labels)")
    return record


def run_record(stored: DataRecord, path: object, *, source: str | None, coarsen: int | None,
               decode: str | None, loss: str | None) -> DataRecord:
    """The record a run on the existing model at ``path`` (recording ``stored``) uses: its transform and
    loss (a flag asking for another is refused), and the source given, else its own."""
    if coarsen is not None and check_coarsen(coarsen) != stored.coarsen:
        raise ConfigError(f"{path} takes {stored.transform} inputs; --coarsen {coarsen} would feed it other "
                          f"inputs (the transform is chosen when a model is created)")
    if decode is not None and _check_decode(decode) != stored.decode and stored.coarsen > 1:
        raise ConfigError(f"{path} decodes its coarse cells as {stored.decode!r}, not {decode!r}")
    if loss is not None and _check_loss(loss) != stored.loss:
        raise ConfigError(f"{path} was created to train with --loss {stored.loss}, not {loss}")
    return stored if source is None else stored.with_(source=parse_source(source))


def _check_decode(decode: str) -> str:
    if decode not in coarse.DECODINGS:
        raise ConfigError(f"--decode must be one of {', '.join(coarse.DECODINGS)}, got {decode!r}")
    return decode


def _check_loss(loss: str) -> str:
    if loss not in LOSSES:
        raise ConfigError(f"--loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    return loss


def coarse_dir(data_dir: Path) -> Path:
    """Where MNIST's coarse file goes: beside MNIST, or in the per-user cache if that directory is not
    writable (a shared, read-only copy of MNIST)."""
    if os.access(data_dir, os.W_OK | os.X_OK):
        return data_dir
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "deepnet" / "coarse"
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def open_dataset(record: DataRecord, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Open the source ``record`` names with its transform (MNIST fetched into ``data_dir`` if missing;
    its coarse cells written once beside it, deepnet.data.coarse)."""
    kind = source_kind(record.source)
    if kind == "teacher":
        return TeacherDataset(record)
    where = record.source.partition(":")[2]
    decode = _check_decode(record.decode)
    if kind == "mnist":
        directory = ensure_mnist(data_dir)
        if record.coarsen == 1:
            return ArrayDataset(record, "MNIST", lambda: load_mnist(directory, "train"),
                                lambda: load_mnist(directory, "test"), pixels, 10)
        path = coarse.ensure_coarse_mnist(directory, [record.coarsen], out_dir=coarse_dir(directory))

        def split(name: str) -> tuple[np.ndarray, np.ndarray]:
            labels = find_idx_file(directory, mnist_file_names(name)[1])  # the labels alone: no pixels decoded
            if labels is None:
                raise DataError(f"{directory}: no {mnist_file_names(name)[1]} (raw or .gz)")
            return coarse.read_coarse(path, record.coarsen, name), read_labels(labels)

        return ArrayDataset(record, f"MNIST coarsened {record.coarsen}x{record.coarsen}", lambda: split("train"),
                            lambda: split("test"), lambda b: coarse.decode(b, decode), 10)
    if kind == "idx":
        train, test = load_idx_split(where, "train"), load_idx_split(where, "test")
        name = f"idx:{where}"
    elif kind == "npz":
        train, test = _load_npz(Path(where))
        name = f"npz:{where}"
    else:
        raise ConfigError(f"--data must be {SOURCE_FORMS}, got {record.source!r}")
    n_classes = max(int(train[1].max()), -1 if test is None else int(test[1].max())) + 1
    if n_classes < 2:
        raise DataError(f"{name}: its labels have a single class (0); a classifier needs at least 2")
    if record.coarsen == 1:
        to_inputs = pixels if train[0].dtype == np.uint8 else _floats
        return ArrayDataset(record, name, train, test, to_inputs, n_classes)
    if train[0].dtype != np.uint8 or train[0].ndim != 3:
        raise ConfigError(f"--coarsen needs images of bytes (n, rows, cols); {name} has x of "
                          f"{train[0].dtype} {train[0].shape[1:]}")
    k = record.coarsen
    if k > min(train[0].shape[1:]):
        raise ConfigError(f"--coarsen {k} is larger than {name}'s images ({train[0].shape[1]}x{train[0].shape[2]})")
    train = (coarse.coarsen(train[0], k), train[1])
    test = None if test is None else (coarse.coarsen(test[0], k), test[1])
    return ArrayDataset(record, f"{name} coarsened {k}x{k}", train, test, lambda b: coarse.decode(b, decode),
                        n_classes)


def _floats(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.reshape(x.shape[0], -1), dtype=np.float32)


def _load_npz(path: Path) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray] | None]:
    """The train and test arrays of an NPZ file, checked (one-line DataError naming the file)."""
    try:  # each member read by numpy's .npy reader, which refuses object arrays (no pickle)
        with zipfile.ZipFile(path) as archive:
            members = {name[:-4]: name for name in archive.namelist() if name.endswith(".npy")}
            arrays = {}
            for key in _NPZ_KEYS:
                if key in members:
                    with archive.open(members[key]) as member:
                        arrays[key] = np.lib.format.read_array(member)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from None
    for key in ("x", "y"):
        if key not in arrays:
            raise DataError(f"{path}: has no array {key!r} (an npz dataset holds x, y and optionally x_test, y_test)")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{path}: has {'x_test' if 'x_test' in arrays else 'y_test'} without its partner")
    train = _checked_pair(path, arrays["x"], arrays["y"], "x", "y")
    test = None
    if "x_test" in arrays:
        test = _checked_pair(path, arrays["x_test"], arrays["y_test"], "x_test", "y_test")
        if test[0].shape[1:] != train[0].shape[1:] or test[0].dtype.kind != train[0].dtype.kind:
            raise DataError(f"{path}: x_test is {test[0].dtype} {test[0].shape[1:]} per sample but x is "
                            f"{train[0].dtype} {train[0].shape[1:]}")
    return train, test


def _checked_pair(path: Path, x: np.ndarray, y: np.ndarray, xn: str, yn: str) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim < 2 or x.shape[0] < 1 or x.size == 0:
        raise DataError(f"{path}: {xn} must have shape (samples >= 1, features...), got {x.shape}")
    if x.dtype != np.uint8 and x.dtype.kind != "f":
        raise DataError(f"{path}: {xn} must be uint8 pixels or floats, got {x.dtype}")
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        raise DataError(f"{path}: {xn} holds values that are not finite")
    if y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise DataError(f"{path}: {yn} must have shape ({x.shape[0]},) (one label per sample of {xn}), got {y.shape}")
    if y.dtype.kind not in "iu":
        raise DataError(f"{path}: {yn} must hold integer labels, got {y.dtype}")
    if y.min() < 0 or y.max() >= _MAX_NPZ_CLASSES:
        raise DataError(f"{path}: {yn} must hold labels in 0..{_MAX_NPZ_CLASSES - 1}, got {y.min()}..{y.max()}")
    return x, y.astype(np.intp)
