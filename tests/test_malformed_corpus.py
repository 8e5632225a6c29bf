"""The malformed-input corpus: every bad file and flag in one place.

Each case prepares a working directory (a trained model ``existing.h5``, a small copy of MNIST in
``mnist/``, sometimes a broken file), runs one `deepnet` command, and asserts: exit status 2, exactly one
line on stderr starting ``deepnet: error:`` and naming the problem, no traceback, and not one byte of
any file in the directory created, changed or removed. The command runs through the console entry
point's ``main()`` in this process (the same code path as the installed script; test_cli.py runs a
selection through real subprocesses, as does the last test here), so disk-full cases can be simulated.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

import deepnet
from crash_harness import make_small_mnist
from deepnet.formats import h5io
from deepnet.formats.idx import write_idx
from helpers import MNIST_DIR, have_mnist, train_tiny

pytestmark = pytest.mark.skipif(not have_mnist(), reason=f"MNIST is not in {MNIST_DIR}")

N_TRAIN = 1000


# ---------------------------------------------------------------------------------------------------
# the template directory


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("corpus-template")
    make_small_mnist(MNIST_DIR, d / "mnist", N_TRAIN, 200)
    deepnet.ModelFile.create(d / "existing.h5", layers=40, width=4, activation="softsign", storage_chunk_layers=10,
                             progress=False).close()
    train_tiny(d / "existing.h5", 3)
    (d / "notes.txt").write_text("not a model\n")
    (d / "adir").mkdir()
    return d


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------
# how the broken inputs are made (each takes the working directory)


def idx_header(magic: int, dims) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims)


def broken_mnist(edit):
    """A copy of the small MNIST in bad/ with one file changed by `edit(bad_dir)`."""
    def prepare(d: Path) -> None:
        shutil.copytree(d / "mnist", d / "bad")
        edit(d / "bad")
    return prepare


def rewrite(name, data: bytes):
    return lambda bad: (bad / name).write_bytes(data)


TRAIN_IMAGES, TRAIN_LABELS = "train-images-idx3-ubyte", "train-labels-idx1-ubyte"
TEST_IMAGES, TEST_LABELS = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"


def truncate(name, keep):
    def edit(bad):
        data = (bad / name).read_bytes()
        (bad / name).write_bytes(data[:keep] if keep >= 0 else data[:keep])
    return edit


def swap_labels(bad):
    write_idx(bad / TRAIN_LABELS, np.zeros((N_TRAIN, 28, 28), np.uint8))  # an images file where labels go


def fewer_labels(bad):
    write_idx(bad / TRAIN_LABELS, np.zeros(N_TRAIN - 1, np.uint8))


def not_28x28(bad):
    write_idx(bad / TRAIN_IMAGES, np.zeros((N_TRAIN, 28, 27), np.uint8))


def label_out_of_range(bad):
    labels = np.zeros(N_TRAIN, np.uint8)
    labels[17] = 10
    write_idx(bad / TRAIN_LABELS, labels)


def corrupt_gzip(bad):
    (bad / TRAIN_LABELS).unlink()
    data = bytearray(gzip.compress(idx_header(2049, [N_TRAIN]) + bytes(N_TRAIN)))
    data[len(data) // 2] ^= 0xFF
    (bad / (TRAIN_LABELS + ".gz")).write_bytes(bytes(data))


def extra_bytes(bad):
    with open(bad / TRAIN_LABELS, "ab") as f:
        f.write(b"trailing")


def h5_edit(edit):
    """Change existing.h5 with h5py (as a foreign or damaged writer would)."""
    def prepare(d: Path) -> None:
        with h5py.File(d / "existing.h5", "r+") as f:
            edit(f)
    return prepare


def replace_dataset(name, data):
    def edit(f):
        del f[name]
        f.create_dataset(name, data=data)
    return edit


def plain_hdf5(d: Path) -> None:
    with h5py.File(d / "foreign.h5", "w") as f:
        f.create_dataset("x", data=np.arange(3))


def truncated_model(d: Path) -> None:
    data = (d / "existing.h5").read_bytes()
    (d / "half.h5").write_bytes(data[: len(data) // 2])


def torn_model(d: Path) -> None:
    with deepnet.ModelFile.open(d / "existing.h5", "r+") as f:
        f.mark_chunk_steps(f.layers - 10, f.layers, f.step + 1)


def nan_weights(d: Path) -> None:
    with deepnet.ModelFile.open(d / "existing.h5", "r+") as f:
        rows = f.read_layers(5, 6)
        rows[0, 0] = np.nan
        f.write_layers(5, rows, f.step)


def mlp_model(d: Path) -> None:
    from deepnet.nn.mlp import MLP

    MLP.new(8, seed=0).save(d / "mlp.h5")


def disk_full(monkeypatch) -> None:
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(h5io, "write_block", full)


def no_data_env(monkeypatch) -> None:
    pass


# ---------------------------------------------------------------------------------------------------
# the corpus: name -> (command, expected fragment of the error line, prepare(d) or None, patch or None)

TINY = ["--layers", "20", "--width", "4"]
NEW = ["train", "new.h5", *TINY, "--train-limit", str(N_TRAIN), "--test-samples", "0", "--steps", "1"]
BAD_DATA = ["--data-dir", "bad"]
OLD = ["train", "existing.h5", "--train-limit", str(N_TRAIN), "--test-samples", "0", "--steps", "1"]

CORPUS = {
    # --- malformed IDX files (training and test sets)
    "idx-bad-magic": (NEW + BAD_DATA, "bad magic 0x01000803",
                      broken_mnist(rewrite(TRAIN_IMAGES, b"\x01\x00\x08\x03" + bytes(12)))),
    "idx-labels-where-images-go": (NEW + BAD_DATA, "bad magic 2051 (0x00000803), expected 2049", broken_mnist(swap_labels)),
    "idx-truncated-payload": (NEW + BAD_DATA, f"truncated: header says {N_TRAIN * 784} bytes of data",
                              broken_mnist(truncate(TRAIN_IMAGES, -100))),
    "idx-truncated-header": (NEW + BAD_DATA, "truncated header", broken_mnist(truncate(TRAIN_IMAGES, 9))),
    "idx-empty-file": (NEW + BAD_DATA, "empty file", broken_mnist(truncate(TRAIN_LABELS, 0))),
    "idx-count-mismatch": (NEW + BAD_DATA, f"count mismatch: {N_TRAIN} images but", broken_mnist(fewer_labels)),
    "idx-absurd-dimensions": (NEW + BAD_DATA, "absurd dimensions [60000, 1048576, 1048576]",
                              broken_mnist(rewrite(TRAIN_IMAGES, idx_header(2051, [60000, 2**20, 2**20]) + bytes(64)))),
    "idx-absurd-gzip-claim": (NEW + BAD_DATA, "more than a",
                              broken_mnist(lambda bad: ((bad / TRAIN_IMAGES).unlink(), (bad / (TRAIN_IMAGES + ".gz")).write_bytes(
                                  gzip.compress(idx_header(2051, [60000, 28, 28]) + bytes(100)))))),
    "idx-not-28x28": (NEW + BAD_DATA, "MNIST images must be 28x28, header says 28x27", broken_mnist(not_28x28)),
    "idx-label-out-of-range": (NEW + BAD_DATA, "label out of range: label 17 is 10", broken_mnist(label_out_of_range)),
    "idx-corrupt-gzip": (NEW + BAD_DATA, "corrupt gzip data", broken_mnist(corrupt_gzip)),
    "idx-extra-bytes": (NEW + BAD_DATA, "8 extra bytes after the data", broken_mnist(extra_bytes)),
    "idx-float-dtype": (NEW + BAD_DATA, "unsupported dtype code 0x0d",
                        broken_mnist(rewrite(TRAIN_LABELS, b"\x00\x00\x0d\x01" + struct.pack(">I", 2) + bytes(8)))),
    "idx-zero-dimension": (NEW + BAD_DATA, "dimension 1 is 0 in the header (dims [1000, 0, 28])",
                           broken_mnist(rewrite(TRAIN_IMAGES, idx_header(2051, [N_TRAIN, 0, 28])))),
    "idx-test-set-truncated": (["eval", "existing.h5", "--samples", "50", *BAD_DATA], "t10k-labels-idx1-ubyte: truncated",
                               broken_mnist(truncate(TEST_LABELS, -1))),
    # --- model files that are not (or no longer) deepnet's
    "model-not-hdf5": (["train", "notes.txt", "--steps", "1", "--test-samples", "0"], "notes.txt is not a deepnet model file (not an HDF5 file)", None),
    "model-foreign-hdf5": (["eval", "foreign.h5", "--samples", "50"], "foreign.h5 is not a deepnet model file (no 'format' attribute)", plain_hdf5),
    "model-other-format": (["info", "existing.h5"], "is not a deepnet model file (format is 'zarr'",
                           h5_edit(lambda f: f.attrs.__setitem__("format", "zarr"))),
    "model-format-version-2": (OLD, "has format_version 2 but this deepnet reads format_version 1",
                               h5_edit(lambda f: f.attrs.__setitem__("format_version", np.int64(2)))),
    "model-missing-weights": (OLD, "existing.h5 is missing the dataset /core/weights",
                              h5_edit(lambda f: f.__delitem__("core/weights"))),
    "model-misshaped-head": (["eval", "existing.h5", "--samples", "50"], "dataset /head/input/weight has shape (784, 5)",
                             h5_edit(replace_dataset("head/input/weight", np.zeros((784, 5), np.float32)))),
    "model-wrong-dtype": (["info", "existing.h5"], "dataset /core/chunk_step has dtype float64",
                          h5_edit(replace_dataset("core/chunk_step", np.zeros(1, np.float64)))),
    "model-negative-step": (OLD, "attribute step is -4, must be >= 0",
                            h5_edit(lambda f: f.attrs.__setitem__("step", np.int64(-4)))),
    "model-unknown-activation": (OLD, "swish9", h5_edit(lambda f: f.attrs.__setitem__("activation", "swish9"))),
    "model-truncated": (["train", "half.h5", "--steps", "1", "--test-samples", "0"], "could not open half.h5", truncated_model),
    "model-commit-record-damaged": (OLD, "the commit record is damaged",
                                    h5_edit(lambda f: f["train/commit"].__setitem__(Ellipsis, 7))),
    "model-torn-step": (OLD, "holds a torn step 4 (10 of 40 layers updated when its writer stopped); pass --resume-torn",
                        torn_model),
    "model-non-finite-weights": (OLD, "step 4 refused: the loss is nan; nothing was written", nan_weights),
    "model-is-a-directory": (["train", "adir", "--steps", "1", "--test-samples", "0"], "adir is a directory", None),
    "model-of-kind-mlp": (["train", "mlp.h5", "--steps", "1", "--in-memory"], "is an MLP model; --in-memory applies "
                          "to dense models only", mlp_model),
    # --- flags that disagree with the file
    "width-disagrees": (OLD + ["--width", "3"], "existing.h5 has width 4 but --width 3 was given", None),
    "layers-disagree": (OLD + ["--layers", "41"], "existing.h5 has layers 40 but --layers 41 was given", None),
    "activation-disagrees": (OLD + ["--activation", "tanh"], "has activation softsign but --activation tanh", None),
    "alpha-disagrees": (OLD + ["--alpha", "0.5"], "but --alpha 0.5 was given", None),
    # --- sizes and rates
    "layers-0": (NEW + ["--layers", "0"], "--layers must be > 0, got 0", None),
    "layers-negative": (["init", "new.h5", "--layers", "-5"], "--layers must be > 0, got -5", None),
    "width-0": (["init", "new.h5", "--width", "0"], "--width must be > 0, got 0", None),
    "batch-0": (NEW + ["--batch", "0"], "--batch must be > 0, got 0", None),
    "steps-negative": (NEW + ["--steps", "-1"], "--steps must be > 0, got -1", None),
    "chunk-layers-0": (NEW + ["--chunk-layers", "0"], "--chunk-layers must be > 0", None),
    "report-every-0": (OLD + ["--report-every", "0"], "--report-every must be > 0", None),
    "checkpoint-every-0": (OLD + ["--in-memory", "--checkpoint-every", "0"], "--checkpoint-every must be > 0", None),
    "layer-lr-negative": (OLD + ["--layer-lr", "-0.1"], "--layer-lr must be a finite number >= 0", None),
    "head-lr-nan": (OLD + ["--head-lr", "nan"], "--head-lr must be a finite number", None),
    "alpha-0": (["init", "new.h5", *TINY, "--alpha", "0"], "--alpha must be > 0", None),
    "test-samples-negative": (OLD + ["--test-samples", "-1"], "--test-samples must be an integer >= 0", None),
    "train-limit-0": (NEW + ["--train-limit", "0"], "--train-limit must be > 0, got 0", None),
    "train-limit-beyond-data": (NEW + ["--train-limit", str(N_TRAIN + 1)], f"--train-limit must be in 1..{N_TRAIN}, got {N_TRAIN + 1}", None),
    "test-samples-beyond-data": (["eval", "existing.h5", "--samples", "201"], "--test-samples must be in 1..200, got 201", None),
    "unknown-activation": (NEW + ["--activation", "nope"], "nope", None),
    "unknown-flag": (OLD + ["--stepz", "3"], "deepnet train has no flag --stepz", None),
    # --- where the output goes
    "output-directory-missing": (["init", "nodir/m.h5", *TINY], "directory", None),
    "output-under-a-file": (["init", "notes.txt/m.h5", *TINY], "cannot create notes.txt/m.h5", None),
    "output-is-a-directory": (["init", "adir", *TINY], "cannot create adir: it is a directory", None),
    "output-exists": (["init", "existing.h5", *TINY], "existing.h5 already exists (pass overwrite=True / --overwrite", None),
    "output-unwritable-filesystem": (["init", "/proc/deepnet-corpus.h5", *TINY], "/proc/deepnet-corpus.h5", None),
}

# Simulated disk-full cases: (command, fragment, prepare, monkeypatch-based patch)
DISK_FULL = {
    "disk-full-during-init": (["init", "new.h5", *TINY], "could not write new.h5: No space left on device"),
    "disk-full-during-train-init": (NEW, "could not write new.h5: No space left on device"),
    "disk-full-in-memory-checkpoint": (OLD + ["--in-memory", "--steps", "2"],
                                       "could not write a checkpoint of existing.h5: No space left on device "
                                       "(the file still holds step 3)"),
}


def run_case(template: Path, tmp_path: Path, monkeypatch, capsys, argv, prepare=None, patch=None):
    from deepnet.cli import main

    d = tmp_path / "work"
    shutil.copytree(template, d)
    if prepare is not None:
        prepare(d)
    monkeypatch.chdir(d)
    monkeypatch.setenv("DEEPNET_DATA", str(d / "mnist"))
    before = snapshot(d)
    if patch is not None:
        patch(monkeypatch)
    capsys.readouterr()
    code = main(list(argv))
    err = capsys.readouterr().err
    return code, err, before, snapshot(d)


def visible_lines(text: str) -> list[str]:
    """The lines a terminal shows: a progress bar redraws itself with carriage returns and erases itself
    when done (leave=False), so only what follows the last carriage return of a line stays."""
    return [line.rsplit("\r", 1)[-1].strip() for line in text.split("\n") if line.rsplit("\r", 1)[-1].strip()]


def assert_clear_error(code, err, fragment, before, after, case):
    assert code == 2, f"{case}: exit status {code}; stderr: {err}"
    assert "Traceback" not in err, err
    lines = visible_lines(err)
    assert len(lines) == 1, f"{case}: stderr is not one line:\n{err}"
    assert lines[0].startswith("deepnet: error: "), lines[0]
    assert fragment in lines[0], f"{case}: {fragment!r} not in {lines[0]!r}"
    assert after == before, f"{case}: files changed: {set(after.items()) ^ set(before.items())}"


def test_the_corpus_is_large_enough():
    assert len(CORPUS) + len(DISK_FULL) >= 30
    print(f"\n[corpus] {len(CORPUS) + len(DISK_FULL)} malformed inputs")


@pytest.mark.parametrize("case", list(CORPUS))
def test_malformed_input(template, tmp_path, monkeypatch, capsys, case):
    argv, fragment, prepare = CORPUS[case]
    code, err, before, after = run_case(template, tmp_path, monkeypatch, capsys, argv, prepare)
    assert_clear_error(code, err, fragment, before, after, case)


@pytest.mark.parametrize("case", list(DISK_FULL))
def test_disk_full(template, tmp_path, monkeypatch, capsys, case):
    argv, fragment = DISK_FULL[case]
    code, err, before, after = run_case(template, tmp_path, monkeypatch, capsys, argv, patch=disk_full)
    assert_clear_error(code, err, fragment, before, after, case)


SUBPROCESS_CASES = ["idx-absurd-dimensions", "model-truncated", "model-torn-step", "model-format-version-2",
                    "train-limit-beyond-data"]


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_malformed_input_through_the_real_command(template, tmp_path, case):
    """The same, through `python -m deepnet` in a new interpreter (and --debug shows the traceback)."""
    argv, fragment, prepare = CORPUS[case]
    d = tmp_path / "work"
    shutil.copytree(template, d)
    if prepare is not None:
        prepare(d)
    before = snapshot(d)
    env = {"DEEPNET_DATA": str(d / "mnist"), "PATH": "/usr/bin:/bin"}
    import os

    env = dict(os.environ, **env)
    proc = subprocess.run([sys.executable, "-m", "deepnet", *argv], cwd=d, env=env, capture_output=True, text=True,
                          timeout=300)
    assert_clear_error(proc.returncode, proc.stderr, fragment, before, snapshot(d), case)
    proc = subprocess.run([sys.executable, "-m", "deepnet", *argv, "--debug"], cwd=d, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback (most recent call last)" in proc.stderr
    assert snapshot(d) == before
