"""The IDX reader and writer: round trips, the real MNIST files, and every kind of malformed file."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepnet.errors import DataError
from deepnet.formats import idx
from deepnet.formats.idx import load_mnist, read_idx, read_images, read_labels, write_idx

TRAIN_LABEL_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def header(dims, dtype_code=0x08, zeros=b"\x00\x00") -> bytes:
    return zeros + bytes([dtype_code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


def put(path: Path, data: bytes, compress: bool = False) -> Path:
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def expect_error(path: Path, phrase: str, reader=read_idx) -> str:
    """Read ``path`` and check the DataError: one line, names the file, contains ``phrase``."""
    with pytest.raises(DataError) as info:
        reader(path)
    message = str(info.value)
    assert "\n" not in message
    assert path.name in message
    assert phrase in message, message
    return message


# ---------------------------------------------------------------------------------------------------
# Round trips


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (4, 2, 3), (1,), (1, 1, 1)])
def test_round_trip(tmp_path, shape, compress):
    array = np.random.default_rng(0).integers(0, 256, size=shape, dtype=np.uint8)
    path = tmp_path / "a.idx"
    write_idx(path, array, gzip=compress)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == compress
    back = read_idx(path)
    assert back.dtype == np.uint8 and back.shape == shape
    np.testing.assert_array_equal(back, array)
    assert back.flags.writeable and back.flags.c_contiguous


def test_gzip_detected_by_magic_not_name(tmp_path):
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    write_idx(tmp_path / "looks-raw", array, gzip=True)
    write_idx(tmp_path / "looks.gz", array, gzip=False)
    np.testing.assert_array_equal(read_idx(tmp_path / "looks-raw"), array)
    np.testing.assert_array_equal(read_idx(tmp_path / "looks.gz"), array)


def test_gzip_output_is_deterministic(tmp_path):
    array = np.arange(100, dtype=np.uint8)
    write_idx(tmp_path / "a", array, gzip=True)
    write_idx(tmp_path / "b", array, gzip=True)
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()


@pytest.mark.parametrize(
    "array",
    [np.zeros(3, np.float32), np.zeros((1, 1, 1, 1), np.uint8), np.zeros((0,), np.uint8), np.uint8(3)],
)
def test_writer_refuses_what_idx_cannot_hold(tmp_path, array):
    with pytest.raises(ValueError):
        write_idx(tmp_path / "x", array)
    assert list(tmp_path.iterdir()) == []


def test_images_and_labels_readers(tmp_path):
    images = np.random.default_rng(1).integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1], np.uint8)
    write_idx(tmp_path / "img", images)
    write_idx(tmp_path / "lab", labels, gzip=True)
    np.testing.assert_array_equal(read_images(tmp_path / "img"), images)
    np.testing.assert_array_equal(read_labels(tmp_path / "lab"), labels)


# ---------------------------------------------------------------------------------------------------
# The real files


def real_data_dir() -> Path | None:
    for candidate in (os.environ.get("DEEPNET_DATA"),):
        if candidate and all(
            idx.find_idx_file(candidate, name) is not None
            for split in ("train", "test")
            for name in idx.mnist_file_names(split)
        ):
            return Path(candidate)
    return None


@pytest.mark.skipif(real_data_dir() is None, reason="MNIST files not available")
@pytest.mark.parametrize("split, counts", [("train", TRAIN_LABEL_COUNTS), ("test", TEST_LABEL_COUNTS)])
def test_real_mnist(split, counts):
    images, labels = load_mnist(real_data_dir(), split)
    n = sum(counts)
    assert images.shape == (n, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (n,) and labels.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == counts
    assert images.max() == 255 and images.min() == 0


def test_load_mnist_raw_and_gz(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((3, 28, 28), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([1, 2, 3], np.uint8), gzip=True)
    images, labels = load_mnist(tmp_path, "test")
    assert images.shape == (3, 28, 28) and labels.tolist() == [1, 2, 3]
    with pytest.raises(ValueError):
        load_mnist(tmp_path, "valid")


# ---------------------------------------------------------------------------------------------------
# Malformed files: each gives a one-line DataError naming the file


@pytest.mark.parametrize("compress", [False, True])
def test_bad_magic(tmp_path, compress):
    expect_error(put(tmp_path / "f", header([3], zeros=b"\x01\x00") + b"abc", compress), "bad magic")


def test_images_reader_refuses_labels_file(tmp_path):
    write_idx(tmp_path / "labels", np.array([1, 2], np.uint8))
    expect_error(tmp_path / "labels", "bad magic 2049", reader=read_images)
    write_idx(tmp_path / "images", np.zeros((1, 28, 28), np.uint8))
    expect_error(tmp_path / "images", "bad magic 2051", reader=read_labels)


@pytest.mark.parametrize("code", [0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x00, 0xFF])
def test_wrong_dtype_code(tmp_path, code):
    expect_error(put(tmp_path / "f", header([2], dtype_code=code) + b"ab"), "dtype code")


@pytest.mark.parametrize("ndim", [0, 4, 255])
def test_bad_ndim(tmp_path, ndim):
    expect_error(put(tmp_path / "f", b"\x00\x00\x08" + bytes([ndim]) + b"\x00" * 64), "dimensions")


def test_zero_dimension(tmp_path):
    expect_error(put(tmp_path / "f", header([2, 0])), "is 0")


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_payload(tmp_path, compress):
    message = expect_error(put(tmp_path / "f", header([4, 5]) + b"x" * 15, compress), "truncated")
    assert "header says 20 bytes of data, file has 15" in message


@pytest.mark.parametrize("compress", [False, True])
def test_truncated_header(tmp_path, compress):
    expect_error(put(tmp_path / "f", header([4, 5])[:9], compress), "truncated header")


@pytest.mark.parametrize("compress", [False, True])
def test_extra_bytes(tmp_path, compress):
    expect_error(put(tmp_path / "f", header([4]) + b"abcdE", compress), "extra bytes")


@pytest.mark.parametrize("compress", [False, True])
def test_absurd_dims_refused_before_allocating(tmp_path, monkeypatch, compress):
    def no_allocation(*args, **kwargs):
        raise AssertionError("allocated for an absurd header")

    monkeypatch.setattr(idx.np, "empty", no_allocation)
    path = put(tmp_path / "f", header([2**31, 2**31]) + b"tiny", compress)
    expect_error(path, "absurd dimensions")
    # Under the absolute cap, but far more than this small file could hold.
    path = put(tmp_path / "g", header([2**15, 2**15]) + b"tiny", compress)
    expect_error(path, "absurd dimensions" if compress else "truncated")


def test_gzip_bomb_is_not_fully_decompressed(tmp_path):
    # 64 MiB of zeros behind a header promising 10 bytes: refused after reading 11.
    path = tmp_path / "bomb"
    with gzip.open(path, "wb") as f:
        f.write(header([10]))
        f.write(bytes(64 << 20))
    expect_error(path, "extra bytes")


def test_corrupt_gzip(tmp_path):
    good = gzip.compress(header([1000]) + bytes(range(250)) * 4)
    data = bytearray(gzip.compress(header([1000]) + os.urandom(1000)))
    data[30:40] = b"\xff" * 10
    expect_error(put(tmp_path / "f", bytes(data)), "corrupt gzip")
    # A stream cut short, a broken CRC, and garbage after the stream.
    expect_error(put(tmp_path / "g", good[: len(good) // 2]), "gzip")
    crc = bytearray(good)
    crc[-8] ^= 0xFF
    expect_error(put(tmp_path / "h", bytes(crc)), "corrupt gzip")
    expect_error(put(tmp_path / "i", good + b"garbage"), "corrupt gzip")


def test_label_out_of_range(tmp_path):
    write_idx(tmp_path / "labels", np.array([0, 9, 3, 10, 200], np.uint8))
    message = expect_error(tmp_path / "labels", "label out of range", reader=read_labels)
    assert "label 3 is 10" in message


def test_missing_file(tmp_path):
    expect_error(tmp_path / "nope", "missing file")


def test_directory_instead_of_file(tmp_path):
    (tmp_path / "d").mkdir()
    expect_error(tmp_path / "d", "directory")


@pytest.mark.parametrize("compress", [False, True])
def test_empty_file(tmp_path, compress):
    expect_error(put(tmp_path / "f", b"", compress), "empty file")


def test_count_mismatch(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((3, 28, 28), np.uint8), gzip=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.array([1, 2], np.uint8))
    message = expect_error(tmp_path / "train-images-idx3-ubyte.gz", "count mismatch", reader=lambda _: load_mnist(tmp_path, "train"))
    assert "train-labels-idx1-ubyte" in message and "3 images" in message and "2 labels" in message


def test_images_not_28x28(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 28, 27), np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([1, 2], np.uint8))
    expect_error(tmp_path / "t10k-images-idx3-ubyte", "28x28", reader=lambda _: load_mnist(tmp_path, "test"))


def test_load_mnist_missing_file(tmp_path):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8))
    expect_error(tmp_path / "t10k-labels-idx1-ubyte", "missing file", reader=lambda _: load_mnist(tmp_path, "test"))


# ---------------------------------------------------------------------------------------------------
# Properties: any bytes either read as an array that matches its header, or raise DataError


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    # Module-scoped: hypothesis reruns a test body many times, so one directory serves every example.
    return tmp_path_factory.mktemp("idx-property")


def check_any_bytes(scratch: Path, data: bytes) -> None:
    path = scratch / "f"
    path.write_bytes(data)
    try:
        array = read_idx(path)
    except DataError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
        return
    plain = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
    ndim = plain[3]
    dims = struct.unpack(f">{ndim}I", plain[4 : 4 + 4 * ndim])
    assert plain[:3] == b"\x00\x00\x08"
    assert array.dtype == np.uint8 and array.shape == dims
    assert array.tobytes() == plain[4 + 4 * ndim :]


def small_idx_bytes() -> st.SearchStrategy[bytes]:
    shapes = st.lists(st.integers(1, 4), min_size=1, max_size=3)
    return shapes.flatmap(
        lambda shape: st.binary(min_size=int(np.prod(shape)), max_size=int(np.prod(shape))).map(
            lambda payload: header(shape) + payload
        )
    )


@st.composite
def mutated_idx(draw) -> bytes:
    data = bytearray(draw(small_idx_bytes()))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "append", "insert"]))
        if kind == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))) :]
        elif kind == "append":
            data += draw(st.binary(min_size=1, max_size=8))
        else:
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=4))
    if draw(st.booleans()):
        packed = bytearray(gzip.compress(bytes(data)))
        if draw(st.booleans()) and packed:  # corrupt the compressed stream too
            i = draw(st.integers(0, len(packed) - 1))
            packed[i] = draw(st.integers(0, 255))
        data = packed
    return bytes(data)


_settings = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_settings
@given(st.binary(max_size=64))
def test_property_random_bytes(scratch, data):
    check_any_bytes(scratch, data)


@_settings
@given(st.binary(max_size=64))
def test_property_random_bytes_behind_gzip_magic(scratch, data):
    check_any_bytes(scratch, b"\x1f\x8b" + data)


@_settings
@given(small_idx_bytes())
def test_property_valid_files_read_back(scratch, data):
    check_any_bytes(scratch, data)
    assert read_idx(scratch / "f").tobytes() == data[4 + 4 * data[3] :]


@_settings
@given(mutated_idx())
def test_property_mutated_files(scratch, data):
    check_any_bytes(scratch, data)


# ---------------------------------------------------------------------------------------------------
# More properties (issue 6): headers claiming anything, and mutated MNIST splits through load_mnist


@st.composite
def wild_headers(draw) -> bytes:
    """A well-formed magic number with dimensions anywhere in uint32 (up to terabytes of claimed data)
    and a small payload, raw or gzip-compressed."""
    ndim = draw(st.integers(1, 3))
    dims = draw(st.lists(st.one_of(st.integers(0, 8), st.integers(0, 2**32 - 1)), min_size=ndim, max_size=ndim))
    data = header(dims) + draw(st.binary(max_size=64))
    return gzip.compress(data) if draw(st.booleans()) else data


@_settings
@given(wild_headers())
def test_property_wild_headers_never_allocate_what_the_file_cannot_hold(scratch, data):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(idx.np, "empty", _bounded_empty(len(data)))
        check_any_bytes(scratch, data)


def _bounded_empty(file_bytes: int):
    real = np.empty

    def empty(shape, dtype=float, *args, **kwargs):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        # Raw: exactly the file's payload; gzip: at most what deflate could expand the file to.
        assert n <= max(file_bytes, 1) * idx.MAX_GZIP_RATIO, f"allocated {n} bytes for a {file_bytes}-byte file"
        return real(shape, dtype, *args, **kwargs)

    return empty


def mnist_split_bytes(draw, n: int) -> tuple[bytes, bytes]:
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    images = struct.pack(">I3I", idx.IMAGES_MAGIC, n, 28, 28) + rng.integers(0, 256, n * 784, dtype=np.uint8).tobytes()
    labels = struct.pack(">II", idx.LABELS_MAGIC, n) + rng.integers(0, 10, n, dtype=np.uint8).tobytes()
    return images, labels


def mutate(draw, data: bytes) -> bytes:
    data = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["flip", "header", "truncate", "append", "insert", "label"]))
        if kind == "flip" and data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        elif kind == "header" and data:  # a byte of the magic number or the dimensions
            data[draw(st.integers(0, min(15, len(data) - 1)))] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[draw(st.integers(0, len(data))):]
        elif kind == "append":
            data += draw(st.binary(min_size=1, max_size=8))
        elif kind == "insert":
            i = draw(st.integers(0, len(data)))
            data[i:i] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "label" and len(data) > 8:
            data[draw(st.integers(8, len(data) - 1))] = draw(st.integers(10, 255))
    return bytes(data)


@st.composite
def mutated_mnist_split(draw) -> tuple[bytes, bytes]:
    images, labels = mnist_split_bytes(draw, draw(st.integers(1, 3)))
    which = draw(st.sampled_from(["images", "labels", "both"]))
    if which in ("images", "both"):
        images = mutate(draw, images)
    if which in ("labels", "both"):
        labels = mutate(draw, labels)
    if draw(st.booleans()):
        images = gzip.compress(images)
    if draw(st.booleans()):
        labels = gzip.compress(labels)
    return images, labels


def check_mnist_split(directory: Path, images: bytes, labels: bytes) -> None:
    """load_mnist either returns a consistent split or raises a one-line DataError naming a file."""
    for old in directory.glob("t10k-*"):
        old.unlink()
    names = idx.mnist_file_names("test")
    (directory / names[0]).write_bytes(images)
    (directory / names[1]).write_bytes(labels)
    try:
        x, y = load_mnist(directory, "test")
    except DataError as exc:
        message = str(exc)
        assert "\n" not in message and str(directory) in message
        return
    assert x.dtype == np.uint8 and x.ndim == 3 and x.shape[1:] == (28, 28)
    assert y.dtype == np.uint8 and y.shape == (x.shape[0],) and int(y.max()) <= 9


@_settings
@given(mutated_mnist_split())
def test_property_mutated_mnist_splits(scratch, split):
    check_mnist_split(scratch, *split)
