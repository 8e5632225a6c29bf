"""Issue 18, the file side: the one-writer lock of every command that writes a model file, atomic
replacement through symlinks, free space checked before anything is written, interrupts leaving no
temporary, --resume-torn writing nothing it then refuses, a damaged commit record never read as the old
layout, and one-line error texts. Each test names the issue item it covers."""

from __future__ import annotations

import gzip
import hashlib
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import deepnet
from crash_harness import make_small_mnist
from deepnet import ModelFile
from deepnet.errors import ConfigError, DamagedFileError, DataError, ModelFileError, Terminated
from deepnet.formats import atomic, create, h5io, layout, mlp_file
from deepnet.formats.atomic import atomic_path
from deepnet.formats.idx import read_idx
from deepnet.formats.locking import lock_target
from deepnet.formats.raw import dense_head_bytes, export_raw, import_raw
from deepnet.tools.check import check_model
from helpers import MNIST_DIR, have_mnist

needs_mnist = pytest.mark.skipif(not have_mnist(), reason=f"MNIST is not in {MNIST_DIR}")


def new_model(path, *, layers=40, width=4, chunk=10) -> Path:
    ModelFile.create(path, layers=layers, width=width, activation="softsign", seed=1, storage_chunk_layers=chunk,
                     progress=False).close()
    return Path(path)


def digest(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in Path(directory).iterdir() if ".tmp-" in p.name)


def run_cli(*args, data: Path | None = None, timeout=120) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if data is not None:
        env["DEEPNET_DATA"] = str(data)
    return subprocess.run([sys.executable, "-m", "deepnet", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def one_line_error(proc, *fragments):
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deepnet: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    if not have_mnist():
        pytest.skip(f"MNIST is not in {MNIST_DIR}")
    return make_small_mnist(MNIST_DIR, tmp_path_factory.mktemp("mini-mnist"), 300, 100)


class Holder:
    """Another process holding the exclusive flock of a file, as a training run's HDF5 open does."""

    def __init__(self, path):
        code = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
                "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "locked"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


# ---------------------------------------------------------------------------------------------------
# item 2: one writer, whichever path names the file


def _raw_files(directory: Path, layers=40, width=4):
    rng = np.random.default_rng(3)
    w, h = directory / "W.bin", directory / "H.bin"
    rng.uniform(-1, 1, layers * (width * width + width)).astype("<f4").tofile(w)
    rng.uniform(-1, 1, dense_head_bytes(width) // 4).astype("<f4").tofile(h)
    return w, h


def test_every_whole_file_writer_is_refused_on_a_file_in_use_by_any_path(tmp_path):
    """issue 18 item 2: init --overwrite, import-raw --overwrite, export-raw --overwrite and the MLP
    writer (train-mlp) take the lock of the file they replace; the same file through a symlink or a hard
    link collides. The file is left as it was and no temporary remains."""
    model = new_model(tmp_path / "S.h5")
    (tmp_path / "link.h5").symlink_to(model)
    os.link(model, tmp_path / "hard.h5")
    w, h = _raw_files(tmp_path)
    before = digest(model)
    with Holder(model):
        for name in ("S.h5", "link.h5", "hard.h5"):
            path = tmp_path / name
            attempts = [
                lambda: deepnet.init(path, layers=10, width=2, overwrite=True, progress=False),
                lambda: import_raw(path, weights=w, head=h, layers=40, width=4, activation="tanh", overwrite=True,
                                   progress=False),
                lambda: export_raw(new_model(tmp_path / "other.h5"), weights=path, head=tmp_path / "h.out",
                                   overwrite=True, progress=False),
                lambda: mlp_file.write_mlp_file(path, {"w1": np.zeros((3, 2), np.float32), "b1": np.zeros(2, np.float32),
                                                       "w2": np.zeros((2, 2), np.float32), "b2": np.zeros(2, np.float32)},
                                                step=0, seed=0, rng_state=None, log=np.empty(0, layout.LOG_DTYPE),
                                                created="x"),
            ]
            for attempt in attempts:
                with pytest.raises(ModelFileError, match=f"cannot replace {path}.*another process has it open"):
                    attempt()
                (tmp_path / "other.h5").unlink(missing_ok=True)
    assert digest(model) == before and (tmp_path / "link.h5").is_symlink()
    assert leftovers(tmp_path) == []
    deepnet.init(tmp_path / "link.h5", layers=10, width=2, overwrite=True, progress=False)  # free again
    assert (tmp_path / "link.h5").is_symlink() and ModelFile.open(model).layers == 10


def test_the_lock_is_held_from_before_the_write_until_the_rename(tmp_path):
    """issue 18 item 2: a writer holds the lock of the file it replaces for the whole write, so a run
    cannot start on it (nor be replaced) between a check and the rename."""
    model = new_model(tmp_path / "m.h5")
    with atomic_path(tmp_path / "m.h5") as tmp:
        with pytest.raises(ModelFileError, match="another process has it open"):
            lock_target(str(model))
        with pytest.raises(ModelFileError, match="it is locked by another process"):
            ModelFile.open(model, "r+")
        new_model(tmp)
    fd = lock_target(str(model))  # released after the rename; the new file is free
    assert fd is not None
    os.close(fd)


def test_a_file_replaced_between_open_and_lock_is_not_taken(tmp_path, monkeypatch):
    """issue 18 item 2: a run's checkpoint renames a new file over the old one and then releases the old
    one's lock; a second writer that opened the old file just before must not take it as the model (it
    would train a file no longer at the path, beside the run)."""
    from deepnet.formats import validate

    path = new_model(tmp_path / "m.h5")
    new_model(tmp_path / "next.h5")
    real = validate.open_h5

    def open_then_replaced(p, mode):
        f = real(p, mode)
        os.replace(tmp_path / "next.h5", path)  # the run's rename, between our open and our check
        return f

    monkeypatch.setattr(validate, "open_h5", open_then_replaced)
    with pytest.raises(ModelFileError, match="another process replaced it while it was being opened"):
        ModelFile.open(path, "r+")


def test_import_and_export_raw_cli_refuse_a_file_in_training(tmp_path):
    """issue 18 item 2, as the independent test ran it: `import-raw --overwrite --model S` and
    `export-raw --overwrite --weights S` while S is in use exit non-zero with one line naming S."""
    model = new_model(tmp_path / "S.h5")
    w, h = _raw_files(tmp_path)
    other = new_model(tmp_path / "other.h5")
    before = digest(model)
    with Holder(model):
        one_line_error(run_cli("import-raw", "--model", model, "--weights", w, "--head", h, "--layers", 40,
                               "--width", 4, "--activation", "tanh", "--overwrite"), f"cannot replace {model}")
        one_line_error(run_cli("export-raw", "--model", other, "--weights", model, "--head", tmp_path / "h.out",
                               "--overwrite"), f"cannot replace {model}")
    assert digest(model) == before and leftovers(tmp_path) == [] and not (tmp_path / "h.out").exists()


# ---------------------------------------------------------------------------------------------------
# item 4: in-memory training through a symlink


@needs_mnist
def test_in_memory_training_through_a_symlink_replaces_the_target(tmp_path, mini):
    """issue 18 item 4: `train --in-memory` on a symlink writes the target; the link stays a link."""
    (tmp_path / "real").mkdir()
    target = new_model(tmp_path / "real" / "m.h5")
    link = tmp_path / "link.h5"
    link.symlink_to(target)
    proc = run_cli("train", link, "--in-memory", "--steps", 2, "--batch", 4, "--train-limit", 300,
                   "--test-samples", 0, "--report-every", 1, data=mini)
    assert proc.returncode == 0, proc.stderr
    assert link.is_symlink() and os.readlink(link) == str(target)
    with ModelFile.open(target) as f:
        assert f.step == 2 and f.state().healthy
    assert leftovers(tmp_path) == [] and leftovers(target.parent) == []


# ---------------------------------------------------------------------------------------------------
# item 5: sizes refused before work starts


def test_init_larger_than_the_disk_is_refused_up_front(tmp_path):
    """issue 18 item 5: `init --layers 1000000000000` says how much it needs and how much is free, and
    creates nothing."""
    proc = run_cli("init", "--model", tmp_path / "big.h5", "--layers", 10**12)
    line = one_line_error(proc, "big.h5: it needs", "free")
    assert "TB" in line and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("width", [4_000_000_000, 2**40])
def test_unrepresentable_shapes_are_refused_in_one_line(tmp_path, width):
    """issue 18 item 5: a shape whose byte count overflows is refused before anything is created."""
    with pytest.raises(ConfigError, match="more than a file or an array can hold"):
        ModelFile.create(tmp_path / "m.h5", layers=10, width=width, activation="tanh", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_every_large_writer_checks_the_free_space_first(tmp_path, monkeypatch):
    """issue 18 item 5: init, import-raw, export-raw, the MLP writer and an in-memory checkpoint are all
    refused before they write when the file system has too little room; nothing is left behind."""
    model = new_model(tmp_path / "m.h5")
    w, h = _raw_files(tmp_path)
    before = digest(model)
    monkeypatch.setattr(atomic, "free_bytes", lambda directory: 1000)
    with pytest.raises(ModelFileError, match=r"new\.h5: it needs .* but the file system of .* has 1.0 kB free"):
        ModelFile.create(tmp_path / "new.h5", layers=40, width=4, activation="tanh", progress=False)
    with pytest.raises(ModelFileError, match="it needs"):
        import_raw(tmp_path / "imp.h5", weights=w, head=h, layers=40, width=4, activation="tanh", progress=False)
    with pytest.raises(ModelFileError, match="it needs"):
        export_raw(model, weights=tmp_path / "W.out", head=tmp_path / "H.out", progress=False)
    with pytest.raises(ModelFileError, match="it needs"):
        mlp_file.write_mlp_file(tmp_path / "mlp.h5", {"w1": np.zeros((3000, 2), np.float32), "b1": np.zeros(2, np.float32),
                                                      "w2": np.zeros((2, 2), np.float32), "b2": np.zeros(2, np.float32)},
                                step=0, seed=0, rng_state=None, log=np.empty(0, layout.LOG_DTYPE), created="x")
    with ModelFile.open(model, "r+") as f:
        with pytest.raises(ModelFileError, match="could not write a checkpoint .*it needs.*still holds step 0"):
            f.rewrite(f.read_core(), step=1, heads=f.read_heads())
    assert digest(model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["H.bin", "W.bin", "m.h5"]


# ---------------------------------------------------------------------------------------------------
# item 6: interrupts leave no temporary


@pytest.mark.parametrize("swallowed", [False, True], ids=["raised", "swallowed-by-a-finaliser"])
@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, Terminated])
def test_an_interrupted_init_leaves_no_temporary(tmp_path, interrupt, swallowed):
    """issue 18 item 6: Ctrl-C, or SIGTERM as the CLI raises it (errors.Terminated), in the middle of
    writing a new file removes the temporary and places nothing. One that lands in a weakref callback of
    h5py's (where Python can only print it) is kept and raised at the next block, never lost; outside a
    write the hook is back to what it was."""
    from types import SimpleNamespace

    assert issubclass(Terminated, KeyboardInterrupt)
    before = sys.unraisablehook
    blocks = []
    real = h5io.write_block

    def interrupted(dset, start, block):
        blocks.append(start)
        if len(blocks) == 2:
            if not swallowed:
                raise interrupt()
            # as Python reports an exception raised in a finaliser
            sys.unraisablehook(SimpleNamespace(exc_type=interrupt, exc_value=interrupt(), exc_traceback=None,
                                               err_msg=None, object=None))
        real(dset, start, block)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(h5io, "write_block", interrupted)
        mp.setattr(h5io, "WRITE_BLOCK_BYTES", 1)
        with pytest.raises(interrupt):
            ModelFile.create(tmp_path / "m.h5", layers=400, width=4, storage_chunk_layers=10, activation="tanh",
                             progress=False)
    assert len(blocks) == 2 and list(tmp_path.iterdir()) == []
    assert sys.unraisablehook is before


def test_sigint_during_a_long_init_stops_it_and_leaves_no_temporary(tmp_path):
    """issue 18 item 6: a real SIGINT during `deepnet init` of a large file stops it with status 130
    and removes the temporary."""
    proc = subprocess.Popen([sys.executable, "-m", "deepnet", "init", "--model", str(tmp_path / "big.h5"),
                             "--layers", str(50_000_000), "--width", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # Wait until the temporary exists and has grown: the command is in its write loop.
    while proc.poll() is None:
        tmps = [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
        if tmps and tmps[0].stat().st_size > 4 << 20:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 130, err
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# item 7: --resume-torn checks before it writes


def make_torn(path, *, layers=40, chunk=10, updated_chunks=2) -> Path:
    """A file whose writer died in step 1 after rewriting the first `updated_chunks` storage chunks."""
    new_model(path, layers=layers, chunk=chunk)
    with ModelFile.open(path, "r+") as f:
        rows = f.read_layers(0, updated_chunks * chunk) + np.float32(0.01)
        f.write_layers(0, rows, 1)
    return Path(path)


def test_resume_torn_writes_nothing_when_the_torn_state_holds_a_non_finite_value(tmp_path):
    """issue 18 item 7: a torn file that also holds a NaN is refused by --resume-torn before anything is
    written: the file stays torn (byte for byte), not committed and then damaged."""
    from deepnet import DeepNet

    path = make_torn(tmp_path / "t.h5")
    with ModelFile.open(path, "r+") as f:
        rows = f.read_layers(5, 6)
        rows[0, 3] = np.nan
        f.h5[layout.CORE_WEIGHTS][5:6] = rows  # the torn step's rows, unguarded: as a NaN update leaves them
    before = digest(path)
    with pytest.raises(ModelFileError, match="torn step 1 with non-finite values in 1 core layers; not accepting"):
        DeepNet.open(path, writable=True, resume_torn=True)
    assert digest(path) == before
    report = check_model(path)
    assert report.status == "torn" and "non-finite" in report.summary
    # Without the NaN, it is accepted as before.
    healthy = make_torn(tmp_path / "u.h5")
    net = DeepNet.open(healthy, writable=True, resume_torn=True)
    try:
        assert net.accepted_torn is not None and net.file.state().healthy
    finally:
        net.file.close()


def test_check_sees_non_finite_values_in_the_optional_parts(tmp_path):
    """issue 18 item 7 (neighbour): check reads every float dataset, not only the core and heads."""
    path = new_model(tmp_path / "m.h5")
    with h5py.File(path, "r+") as f:
        f.create_dataset("branch/mlp/b1", data=np.array([0.0, np.inf], np.float32))
    report = check_model(path)
    assert report.status == "damaged" and "/branch/mlp/b1" in report.summary


# ---------------------------------------------------------------------------------------------------
# item 8: a file with /train/commit is never read as the old unprotected layout


def test_a_zeroed_commit_record_is_damaged_and_does_not_hide_an_altered_head(tmp_path, mini):
    """issue 18 item 8: both slots zeroed (and a head bias altered): check says damaged, train refuses."""
    path = new_model(tmp_path / "m.h5")
    with h5py.File(path, "r+") as f:
        f[layout.TRAIN_COMMIT][...] = 0
        f[layout.HEAD_PATHS["output_bias"]][0] = 5.0
    report = check_model(path)
    assert report.status == "damaged" and "commit record is damaged" in report.summary
    with pytest.raises(DamagedFileError):
        ModelFile.open(path, "r+")
    one_line_error(run_cli("train", path, "--steps", 1, "--test-samples", 0, data=mini), "commit record is damaged")
    proc = run_cli("check", path)
    assert proc.returncode != 0 and "damaged" in proc.stdout + proc.stderr


def test_an_attribute_step_past_the_record_is_damaged(tmp_path):
    """issue 18 item 8 (neighbour): raising the step attribute past the record no longer drops the record
    (and with it the heads' checksum)."""
    path = new_model(tmp_path / "m.h5")
    with h5py.File(path, "r+") as f:
        f.attrs["step"] = np.int64(7)
        f[layout.HEAD_PATHS["output_bias"]][0] = 5.0
    assert check_model(path).status == "damaged"


def test_the_legacy_upgrade_creates_the_dataset_holding_its_record(tmp_path, monkeypatch):
    """issue 18 item 8: the only writer that adds /train/commit to an existing file creates it with the
    record inside, so no kill can leave an allocated, empty one."""
    path = new_model(tmp_path / "m.h5")
    with h5py.File(path, "r+") as f:
        del f[layout.TRAIN_COMMIT]
    created = []
    real = h5py.Group.create_dataset

    def spy(self, name, *args, **kwargs):
        if name == layout.TRAIN_COMMIT:
            created.append(np.asarray(kwargs["data"]).any())
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", spy)
    with ModelFile.open(path, "r+") as f:
        f.commit(1, f.read_heads())
    assert created == [True]
    with ModelFile.open(path) as f:
        assert f.step == 1 and f.has_commit_record


# ---------------------------------------------------------------------------------------------------
# item 12: one-line error texts


def test_a_corrupt_gzip_stream_that_decodes_too_far_is_corrupt_data(tmp_path):
    """issue 18 item 12: garbage decoded past what the header says, with a CRC that fails, is reported as
    corrupt gzip data naming the file (not as extra bytes); a valid stream that is longer stays "extra"."""
    payload = struct.pack(">BBBBI", 0, 0, 8, 1, 100) + bytes(range(100)) * 3
    good = bytearray(gzip.compress(payload, mtime=0))
    bad = bytearray(good)
    bad[-8] ^= 0xFF  # the CRC-32 of the member
    (tmp_path / "bad.gz").write_bytes(bytes(bad))
    (tmp_path / "long.gz").write_bytes(bytes(good))
    with pytest.raises(DataError, match=r"bad\.gz: corrupt gzip data \(CRC check failed"):
        read_idx(tmp_path / "bad.gz")
    with pytest.raises(DataError, match=r"long\.gz: 200 extra bytes after the data"):
        read_idx(tmp_path / "long.gz")


def test_an_hdf5_error_reaches_the_user_as_one_line(tmp_path, monkeypatch):
    """issue 18 item 12: train-mlp's writer on a full disk: HDF5's multi-line message becomes one line."""
    def full(*args, **kwargs):
        raise OSError("Unable to synchronously create file (file write failed: time = Mon,\n"
                      " filename = 'x', file descriptor = 5, errno = 28, error message = 'No space left on device')")

    monkeypatch.setattr(mlp_file.h5py, "File", full)
    params = {"w1": np.zeros((3, 2), np.float32), "b1": np.zeros(2, np.float32), "w2": np.zeros((2, 2), np.float32),
              "b2": np.zeros(2, np.float32)}
    with pytest.raises(ModelFileError) as info:
        mlp_file.write_mlp_file(tmp_path / "mlp.h5", params, step=0, seed=0, rng_state=None,
                                log=np.empty(0, layout.LOG_DTYPE), created="x")
    assert str(info.value) == f"could not write {tmp_path / 'mlp.h5'}: No space left on device"
    assert list(tmp_path.iterdir()) == []


@needs_mnist
def test_train_mlp_holds_the_lock_for_its_whole_run(tmp_path, mini, monkeypatch):
    """issue 18 item 2: train-mlp holds the one-writer lock from its start to its end, handed to each
    version it saves, so another writer is refused between its saves too (and no lock outlives it)."""
    from deepnet.nn.mlp import MLP

    path = tmp_path / "mlp.h5"
    deepnet.train_mlp(path, hidden=8, steps=2, batch=4, train_limit=300, test_samples=0, data_dir=mini, progress=False)
    seen = []
    real_save = MLP.save

    def save_and_try_a_second_writer(self, p, **kwargs):
        real_save(self, p, **kwargs)
        with pytest.raises(ModelFileError, match="another process has it open"):
            lock_target(str(path))
        seen.append(self.step)

    monkeypatch.setattr(MLP, "save", save_and_try_a_second_writer)
    deepnet.train_mlp(path, steps=3, batch=4, train_limit=300, test_samples=0, report_every=1, data_dir=mini,
                      progress=False)
    assert seen == [3, 4, 5]
    fd = lock_target(str(path))
    assert fd is not None
    os.close(fd)
    assert leftovers(tmp_path) == []


def test_two_runs_that_start_without_a_file_cannot_both_place_it(tmp_path):
    """issue 18 item 2 (a neighbour): two runs whose file did not exist yet hold no lock; the first to save
    places (and locks) the file, the second's save is refused instead of replacing it."""
    from deepnet.formats.locking import WriterLock

    path = tmp_path / "new.h5"
    with WriterLock(path) as first, WriterLock(path) as second:
        assert first.fd is None and second.fd is None
        with atomic_path(path, lock=first) as tmp:
            Path(tmp).write_bytes(b"first")
        with pytest.raises(ModelFileError, match="another process has it open"):
            with atomic_path(path, lock=second) as tmp:
                Path(tmp).write_bytes(b"second")
        assert path.read_bytes() == b"first" and second.fd is None
    assert leftovers(tmp_path) == []
