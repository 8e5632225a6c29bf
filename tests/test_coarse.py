"""Coarse-grained byte inputs: the encoding against a plain loop, its error bound, decoding, the
multi-k file and its checks, and building it from the real MNIST ($DEEPNET_DATA, never written to)."""

from __future__ import annotations

import hashlib
import math
import os
import struct
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepnet.data import coarse
from deepnet.data.coarse import (DECODINGS, cells, coarse_file_info, coarsen, decode, ensure_coarse_mnist,
                                 images_sha256, read_coarse, write_coarse_file)
from deepnet.data.mnist import MNIST_FILES
from deepnet.errors import ConfigError, DataError
from deepnet.formats.idx import load_mnist
from helpers import MNIST_DIR, have_mnist

needs_mnist = pytest.mark.skipif(not have_mnist(), reason=f"MNIST is not in {MNIST_DIR}")
FAKE_SHA = {"train": "ab" * 32, "test": "cd" * 32}


# ---------------------------------------------------------------------------------------------------
# A plain reference: one image, one cell at a time, exact rationals


def reference_cell(pixels: list[int]) -> tuple[int, int]:
    """[max, VAL2] of one cell from the definition: VAL2 = nearest integer to 255*avg/max, ties up."""
    m = max(pixels)
    if m == 0:
        return 0, 0
    ratio = Fraction(255 * sum(pixels), len(pixels) * m)
    return m, math.floor(ratio + Fraction(1, 2))


def reference_coarsen(images: np.ndarray, k: int) -> np.ndarray:
    n, height, width = images.shape
    ch, cw = -(-height // k), -(-width // k)
    out = np.zeros((n, ch, cw, 2), dtype=np.int64)
    for i in range(n):
        for r in range(ch):
            for c in range(cw):
                block = images[i, r * k:(r + 1) * k, c * k:(c + 1) * k]
                out[i, r, c] = reference_cell([int(v) for v in block.ravel()])
    return out


def tricky_images(rng: np.random.Generator, n: int, height: int, width: int, k: int) -> np.ndarray:
    """Random images whose cells include all-zero, all-255 and single-non-zero-pixel cells."""
    images = rng.integers(0, 256, size=(n, height, width), dtype=np.uint8)
    images[1::4] *= (rng.random((len(images[1::4]), height, width)) < 0.15).astype(np.uint8)  # sparse
    images[2::4] = 0
    images[3::4] = rng.choice(np.array([0, 255], dtype=np.uint8), size=(len(images[3::4]), height, width))
    for cell_r in range(0, height, k):  # image 0: one non-zero pixel in some cells, zero or 255 in others
        for cell_c in range(0, width, k):
            kind = (cell_r // k + cell_c // k) % 3
            images[0, cell_r:cell_r + k, cell_c:cell_c + k] = (0, 0, 255)[kind]
            if kind == 1:
                images[0, cell_r, cell_c] = rng.integers(1, 256)
    images[4 % n] = 255
    return images


def cell_kinds(images: np.ndarray, k: int) -> set[str]:
    """Which of the interesting kinds of cell occur (so the comparison is known to cover them)."""
    kinds = set()
    n, height, width = images.shape
    for i in range(n):
        for r in range(0, height, k):
            for c in range(0, width, k):
                block = images[i, r:r + k, c:c + k]
                if not block.any():
                    kinds.add("zero")
                elif (block == 255).all():
                    kinds.add("all-255")
                if np.count_nonzero(block) == 1 and block.size > 1:
                    kinds.add("single")
    return kinds


# ---------------------------------------------------------------------------------------------------
# Encoding


def test_cells():
    assert [cells(28, k) for k in (1, 2, 3, 4, 5, 28, 29)] == [28, 14, 10, 7, 6, 1, 1]
    assert cells(7, 2) == 4 and cells(5, 3) == 2 and cells(0, 3) == 0
    for k in (0, -1, True, 2.0):
        with pytest.raises(ConfigError):
            cells(28, k)


@pytest.mark.parametrize("shape,k", [((7, 5), 2), ((7, 5), 3), ((7, 5), 4), ((5, 7), 3), ((7, 5), 6),
                                     ((7, 5), 9), ((28, 28), 3), ((28, 28), 4), ((28, 28), 5)])
def test_coarsen_matches_reference(shape, k):
    rng = np.random.default_rng([k, *shape])
    images = tricky_images(rng, 24, *shape, k)
    assert cell_kinds(images, k) >= {"zero", "all-255", "single"} or k > max(shape)
    got = coarsen(images, k)
    assert got.dtype == np.uint8 and got.shape == (24, -(-shape[0] // k), -(-shape[1] // k), 2)
    np.testing.assert_array_equal(got, reference_coarsen(images, k))


def test_partial_cells_are_not_padded():
    # 28 with k=3: the last row and column of cells cover 1 pixel; their average is over that pixel only.
    images = np.zeros((1, 28, 28), dtype=np.uint8)
    images[0, 27, 27] = 100
    images[0, 27, 0:3] = (90, 0, 0)
    got = coarsen(images, 3)
    assert got.shape == (1, 10, 10, 2)
    assert tuple(got[0, 9, 9]) == (100, 255)  # one pixel: avg == max
    assert tuple(got[0, 9, 0]) == (90, 85)  # 3 pixels (90, 0, 0): avg 30 = 90 * 85/255


def test_k1_is_the_pixels():
    images = np.random.default_rng(1).integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    images[0, 0, 0] = 0
    got = coarsen(images, 1)
    np.testing.assert_array_equal(got[..., 0], images)
    np.testing.assert_array_equal(got[..., 1], np.where(images > 0, 255, 0))


def test_coarsen_of_no_images():
    assert coarsen(np.zeros((0, 28, 28), dtype=np.uint8), 4).shape == (0, 7, 7, 2)


@pytest.mark.parametrize("images,k", [
    (np.zeros((2, 4, 4), dtype=np.float32), 2),
    (np.zeros((2, 4, 4), dtype=np.int64), 2),
    (np.zeros((4, 4), dtype=np.uint8), 2),
    (np.zeros((1, 4, 4, 1), dtype=np.uint8), 2),
    ([[[1, 2]]], 1),
    (np.zeros((2, 4, 4), dtype=np.uint8), 0),
    (np.zeros((2, 4, 4), dtype=np.uint8), -2),
    (np.zeros((2, 4, 4), dtype=np.uint8), 2.0),
])
def test_coarsen_refuses_bad_input(images, k):
    with pytest.raises(ConfigError) as info:
        coarsen(images, k)
    assert "\n" not in str(info.value)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.data())
def test_error_bound(height, width, data):
    pixels = data.draw(st.lists(st.integers(0, 255), min_size=height * width, max_size=height * width))
    image = np.array(pixels, dtype=np.uint8).reshape(1, height, width)
    (m, val2), = coarsen(image, max(height, width)).reshape(-1, 2).tolist()
    assert m == max(pixels)
    assert 0 <= val2 <= 255
    avg = Fraction(sum(pixels), len(pixels))
    error = abs(Fraction(m * val2, 255) - avg)
    assert error <= Fraction(m, 510) <= Fraction(1, 2)
    # and VAL2 is the best byte: no other ratio byte comes closer to the average
    for other in (val2 - 1, val2 + 1):
        if 0 <= other <= 255:
            assert error <= abs(Fraction(m * other, 255) - avg)


# ---------------------------------------------------------------------------------------------------
# Decoding


def test_decode_definitions():
    rng = np.random.default_rng(7)
    data = rng.integers(0, 256, size=(6, 3, 4, 2), dtype=np.uint8)
    data[0, 0, 0] = (255, 255)
    data[0, 0, 1] = (0, 0)
    m, v = data[..., 0].astype(np.float64), data[..., 1].astype(np.float64)
    # float64 quotients are exact enough that casting rounds them as float32 division would
    expected = {"ratio": (m / 255, m * v / 65025), "raw": (m / 255, v / 255)}
    assert set(DECODINGS) == set(expected)
    for how, (first, second) in expected.items():
        got = decode(data, how)
        assert got.dtype == np.float32 and got.shape == (6, 3 * 4 * 2)
        # the cells in row-major order, each cell's two values side by side
        np.testing.assert_array_equal(got[:, 0::2], first.reshape(6, -1).astype(np.float32))
        np.testing.assert_array_equal(got[:, 1::2], second.reshape(6, -1).astype(np.float32))
        assert got[0, 0] == 1.0 and got[0, 1] == 1.0 and got[0, 2] == 0.0 and got[0, 3] == 0.0
    np.testing.assert_array_equal(decode(data), decode(data, "ratio"))


def test_decode_ratio_is_the_average():
    images = np.random.default_rng(3).integers(0, 256, size=(10, 28, 28), dtype=np.uint8)
    x = decode(coarsen(images, 4))
    averages = images.reshape(10, 7, 4, 7, 4).mean(axis=(2, 4)) / 255
    maxima = images.reshape(10, 7, 4, 7, 4).max(axis=(2, 4)) / 255
    np.testing.assert_array_equal(x[:, 0::2], maxima.reshape(10, -1).astype(np.float32))
    assert np.all(np.abs(x[:, 1::2] - averages.reshape(10, -1)) <= maxima.reshape(10, -1) / 510 + 1e-7)


def test_decode_refuses():
    good = np.zeros((1, 2, 2, 2), dtype=np.uint8)
    for how in ("avg", "", None):
        with pytest.raises(ConfigError, match="decoding must be one of ratio, raw"):
            decode(good, how)
    for bad in (good.astype(np.float32), good[..., :1], good[0]):
        with pytest.raises(ConfigError):
            decode(bad)


# ---------------------------------------------------------------------------------------------------
# The file


def small_splits(height: int = 9, width: int = 11) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(11)
    return (tricky_images(rng, 13, height, width, 3), tricky_images(rng, 5, height, width, 3))


def build(tmp_path: Path, ks=(2, 3, 5), name: str = "c.bin") -> tuple[Path, np.ndarray, np.ndarray]:
    train, test = small_splits()
    path = tmp_path / name
    write_coarse_file(path, train, test, ks, FAKE_SHA)
    return path, train, test


def expect_error(path: Path, phrase: str, k: int = 2, split: str = "train") -> str:
    with pytest.raises(DataError) as info:
        read_coarse(path, k, split)
    message = str(info.value)
    assert "\n" not in message and path.name in message
    assert phrase in message, message
    return message


def test_round_trip(tmp_path):
    train, test = small_splits()
    path = tmp_path / "c.bin"
    digest = write_coarse_file(path, train, test, [5, 2, 3, 2], FAKE_SHA)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert (tmp_path / "c.bin.sha256").read_text() == f"{digest}  c.bin\n"
    info = coarse_file_info(path)
    assert info["ks"] == [2, 3, 5] and (info["height"], info["width"]) == (9, 11)
    assert info["counts"] == {"train": 13, "test": 5} and info["source_sha256"] == FAKE_SHA
    assert info["size"] == path.stat().st_size
    raw = path.read_bytes()
    for k in (2, 3, 5):
        for split, images in (("train", train), ("test", test)):
            got = read_coarse(path, k, split)
            np.testing.assert_array_equal(got, coarsen(images, k))
            # the stated offset is where the block is: a reader can fromfile/memmap it alone
            offset, shape = info["blocks"][(k, split)]
            block = np.frombuffer(raw, dtype=np.uint8, count=int(np.prod(shape)), offset=offset).reshape(shape)
            np.testing.assert_array_equal(block, got)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.bin", "c.bin.sha256"]  # no temporaries left


def test_header_layout(tmp_path):
    path, train, test = build(tmp_path, ks=(4, 2))
    raw = path.read_bytes()
    assert raw[:8] == b"DNCOARSE"
    assert struct.unpack("<6I", raw[8:32]) == (1, 9, 11, 2, 13, 5)
    assert raw[32:64].hex() == FAKE_SHA["train"] and raw[64:96].hex() == FAKE_SHA["test"]
    assert struct.unpack("<2I", raw[96:104]) == (2, 4)
    blocks = [coarsen(a, k).tobytes() for k in (2, 4) for a in (train, test)]
    assert raw[104:] == b"".join(blocks)


def test_missing_file(tmp_path):
    expect_error(tmp_path / "none.bin", "missing file")
    with pytest.raises(DataError, match="missing file"):
        coarse_file_info(tmp_path / "none.bin")


def test_corrupt_byte(tmp_path):
    path, _, _ = build(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    expect_error(path, "sha256 mismatch")


def test_missing_sidecar(tmp_path):
    path, _, _ = build(tmp_path)
    read_coarse(path, 2, "train")  # verified and cached: the sidecar is still needed afterwards
    (tmp_path / "c.bin.sha256").unlink()
    expect_error(path, "missing checksum file c.bin.sha256")


def test_malformed_sidecar(tmp_path):
    path, _, _ = build(tmp_path)
    sidecar = tmp_path / "c.bin.sha256"
    good = sidecar.read_text()
    for text in ("", "hello\n", good.replace("c.bin", "other.bin"), good[:60] + good[64:]):
        sidecar.write_text(text)
        expect_error(path, "malformed checksum file")
    sidecar.write_text(good.upper().replace("C.BIN", "c.bin"))  # hex case does not matter
    read_coarse(path, 2, "train")


def reseal(path: Path) -> None:
    """Rewrite the sidecar to match the file, so what is checked next is the header itself."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    Path(f"{path}.sha256").write_text(f"{digest}  {path.name}\n")


def test_truncated_file(tmp_path):
    path, _, _ = build(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-1])
    expect_error(path, "sha256 mismatch")
    reseal(path)
    expect_error(path, "truncated: header says")
    for length, phrase in ((50, "truncated header: 50 bytes"), (100, "truncated header: 3 ks need 12 bytes"),
                           (0, "empty file")):
        path.write_bytes(data[:length])
        reseal(path)
        expect_error(path, phrase)
        with pytest.raises(DataError, match=phrase):
            coarse_file_info(path)


def test_extra_bytes(tmp_path):
    path, _, _ = build(tmp_path)
    path.write_bytes(path.read_bytes() + b"\0")
    reseal(path)
    expect_error(path, "1 extra bytes")


@pytest.mark.parametrize("offset,value,phrase", [
    (0, b"NOTCOARS", "not a coarse-input file"),
    (8, struct.pack("<I", 2), "format version 2"),
    (12, struct.pack("<I", 0), "image size 0x11"),
    (20, struct.pack("<I", 11), "11 ks for 9x11 images"),
    (20, struct.pack("<I", 2**32 - 1), "ks for 9x11 images"),
    (96, struct.pack("<I", 3), "not strictly increasing"),
    (96, struct.pack("<I", 1), "not strictly increasing"),
    (104, struct.pack("<I", 12), "not strictly increasing"),
])
def test_malformed_header(tmp_path, offset, value, phrase):
    path, _, _ = build(tmp_path)
    data = bytearray(path.read_bytes())
    data[offset:offset + len(value)] = value
    path.write_bytes(bytes(data))
    reseal(path)
    expect_error(path, phrase)


def test_k_not_in_file(tmp_path):
    path, _, _ = build(tmp_path)
    for k in (4, 1, "2", True):
        message = expect_error(path, "is not in the file", k=k)
        assert "holds k = 2, 3, 5" in message
    assert "k=1 is the images themselves" in expect_error(path, "not in the file", k=1)


def test_unknown_split(tmp_path):
    path, _, _ = build(tmp_path)
    expect_error(path, "unknown split 'valid'", split="valid")


def test_verified_once_per_version(tmp_path, monkeypatch):
    path, train, test = build(tmp_path)
    calls = []
    real = coarse._file_sha256
    monkeypatch.setattr(coarse, "_file_sha256", lambda f: calls.append(1) or real(f))
    for k in (2, 3, 5):
        read_coarse(path, k, "test")
    assert len(calls) == 1
    write_coarse_file(path, train, test, (2, 3), FAKE_SHA)  # a new version (new inode): hashed again
    read_coarse(path, 3, "train")
    assert len(calls) == 2


@pytest.mark.parametrize("ks", [[1], [0, 2], [12], [], "23", [2.5], [True]])
def test_write_refuses_bad_ks(tmp_path, ks):
    train, test = small_splits()
    with pytest.raises(ConfigError):
        write_coarse_file(tmp_path / "c.bin", train, test, ks, FAKE_SHA)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("sources", [{"train": "ab" * 32}, {"train": "ab" * 32, "test": "xy" * 32},
                                     {"train": "ab" * 32, "test": "ab" * 31}, None])
def test_write_refuses_bad_sources(tmp_path, sources):
    train, test = small_splits()
    with pytest.raises(ConfigError):
        write_coarse_file(tmp_path / "c.bin", train, test, [2], sources)


def test_write_refuses_mismatched_images(tmp_path):
    train, _ = small_splits()
    with pytest.raises(ConfigError, match="differ in size"):
        write_coarse_file(tmp_path / "c.bin", train, train[:, :8], [2], FAKE_SHA)


def test_write_into_missing_directory(tmp_path):
    train, test = small_splits()
    with pytest.raises(DataError, match="cannot write"):
        write_coarse_file(tmp_path / "no" / "c.bin", train, test, [2], FAKE_SHA)


def test_images_sha256_is_the_idx_file_sha256(tmp_path):
    from deepnet.formats.idx import write_idx

    images = small_splits()[0]
    write_idx(tmp_path / "x-images", images)
    assert images_sha256(images) == hashlib.sha256((tmp_path / "x-images").read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# Real MNIST: read from $DEEPNET_DATA, the coarse file written only into tmp_path


@pytest.fixture(scope="module")
def mnist_images():
    return {split: load_mnist(MNIST_DIR, split)[0] for split in ("train", "test")}


def version(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


@needs_mnist
def test_images_sha256_of_mnist(mnist_images):
    assert images_sha256(mnist_images["train"]) == MNIST_FILES["train-images-idx3-ubyte"]
    assert images_sha256(mnist_images["test"]) == MNIST_FILES["t10k-images-idx3-ubyte"]


@needs_mnist
def test_ensure_coarse_mnist(tmp_path, mnist_images):
    before = sorted(os.listdir(MNIST_DIR))
    path = ensure_coarse_mnist(MNIST_DIR, [3, 2], out_dir=tmp_path)
    assert path == tmp_path / "mnist-coarse.bin"
    info = coarse_file_info(path)
    assert info["ks"] == [2, 3] and info["counts"] == {"train": 60000, "test": 10000}
    assert info["source_sha256"] == {"train": MNIST_FILES["train-images-idx3-ubyte"],
                                     "test": MNIST_FILES["t10k-images-idx3-ubyte"]}
    np.testing.assert_array_equal(read_coarse(path, 3, "test"), coarsen(mnist_images["test"], 3))
    assert read_coarse(path, 2, "train").shape == (60000, 14, 14, 2)

    stamps = version(path), version(Path(f"{path}.sha256"))
    assert ensure_coarse_mnist(MNIST_DIR, [2], out_dir=tmp_path) == path
    assert (version(path), version(Path(f"{path}.sha256"))) == stamps  # not rewritten

    ensure_coarse_mnist(MNIST_DIR, [4], out_dir=tmp_path)  # a new k: rewritten with the union
    assert version(path) != stamps[0]
    assert coarse_file_info(path)["ks"] == [2, 3, 4]
    np.testing.assert_array_equal(read_coarse(path, 4, "train"), coarsen(mnist_images["train"], 4))
    assert sorted(os.listdir(MNIST_DIR)) == before
    assert sorted(os.listdir(tmp_path)) == ["mnist-coarse.bin", "mnist-coarse.bin.sha256"]


@needs_mnist
def test_ensure_rewrites_stale_or_damaged(tmp_path, mnist_images):
    path = tmp_path / "mnist-coarse.bin"
    tiny = {split: images[:3] for split, images in mnist_images.items()}
    write_coarse_file(path, tiny["train"], tiny["test"], [7, 14], FAKE_SHA)  # other source images
    ensure_coarse_mnist(MNIST_DIR, [14], out_dir=tmp_path)
    info = coarse_file_info(path)
    assert info["ks"] == [7, 14] and info["counts"] == {"train": 60000, "test": 10000}

    Path(f"{path}.sha256").unlink()  # damaged: rebuilt with only what is asked (its ks are not trusted)
    ensure_coarse_mnist(MNIST_DIR, [14], out_dir=tmp_path)
    assert coarse_file_info(path)["ks"] == [14]
    np.testing.assert_array_equal(read_coarse(path, 14, "test"), coarsen(mnist_images["test"], 14))


@pytest.mark.parametrize("ks", [[1], [29], [2, 0], [], [3.0]])
def test_ensure_refuses_bad_ks_first(tmp_path, ks, monkeypatch):
    monkeypatch.setattr(coarse, "ensure_mnist", lambda d: pytest.fail("MNIST looked at before ks were checked"))
    with pytest.raises(ConfigError):
        ensure_coarse_mnist(MNIST_DIR, ks, out_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []
