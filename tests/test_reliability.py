"""Reliability (issue 6): the commit record, torn steps, exact resume, Ctrl-C, one writer, the numerical
guard, disk full, and what `deepnet check` says. The random-kill tests are in test_crash.py and the
malformed-input corpus in test_malformed_corpus.py.
"""

from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

import deepnet
from deepnet import DeepNet, ModelFile
from deepnet.nn.engine import NonFiniteError
from deepnet.errors import ModelFileError
from deepnet.formats import h5io, hdf5, layout, record
from deepnet.formats.atomic import atomic_path
from deepnet.formats.hdf5 import COMMIT_SLOT_BYTES, LOG_PENDING_MAX, HEAD_KEYS
from deepnet.nn.network import TornStepError
from helpers import MNIST_DIR, have_mnist

needs_mnist = pytest.mark.skipif(not have_mnist(), reason=f"MNIST is not in {MNIST_DIR}")


def new_model(path, *, layers=300, width=4, chunk=50, activation="softsign", seed=1) -> Path:
    ModelFile.create(path, layers=layers, width=width, activation=activation, seed=seed,
                     storage_chunk_layers=chunk, progress=False).close()
    return path


def batches(n, batch=6, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.uniform(0, 1, (batch, 784)).astype(np.float32), rng.integers(0, 10, batch)) for _ in range(n)]


def file_state(path):
    with ModelFile.open(path) as f:
        log = f.read_log()
        return {"core": f.read_core(), "heads": f.read_heads(), "step": f.step, "rng": f.rng_state,
                "log": (log["step"].tolist(), log["loss"].tolist(), log["batch_acc"].tolist()),
                "state": f.state().status}


def assert_same(a, b):
    assert np.array_equal(a["core"], b["core"]), "core weights differ"
    for key in HEAD_KEYS:
        assert np.array_equal(a["heads"][key], b["heads"][key]), f"head {key} differs"
    assert (a["step"], a["rng"], a["log"]) == (b["step"], b["rng"], b["log"])


def deepnet_run(*args, env_data: Path, extra_env=None, timeout=300) -> subprocess.CompletedProcess:
    env = dict(os.environ, DEEPNET_DATA=str(env_data), **(extra_env or {}))
    return subprocess.run([sys.executable, "-m", "deepnet", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def deepnet_popen(*args, env_data: Path, extra_env=None) -> subprocess.Popen:
    env = dict(os.environ, DEEPNET_DATA=str(env_data), **(extra_env or {}))
    return subprocess.Popen([sys.executable, "-m", "deepnet", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def one_line_error(proc, *fragments, status=2):
    assert proc.returncode == status, f"exit {proc.returncode}: {proc.stderr}"
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deepnet: error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------------
# the commit record


def test_a_new_file_is_a_healthy_step_0(tmp_path):
    with ModelFile.open(new_model(tmp_path / "m.h5")) as f:
        assert f.state().status == "healthy" and f.step == 0 and f.rng_state is None
        commit = f.h5[layout.TRAIN_COMMIT]
        assert commit.shape == (2, COMMIT_SLOT_BYTES) and commit.chunks is None


def test_commit_alternates_slots_and_a_cut_write_falls_back_to_the_previous_commit(tmp_path):
    path = new_model(tmp_path / "m.h5")
    with ModelFile.open(path, "r+") as f:
        heads = f.read_heads()
        for step in (1, 2, 3):
            heads["output_bias"] += 1
            f.commit(step, heads, rng_state={"n": step}, log=[(step, 1.0, 0.5, 0.1)])
        seq = f.record["seq"]
        offset = f.h5[layout.TRAIN_COMMIT].id.get_offset()
    with ModelFile.open(path) as f:
        assert (f.step, f.rng_state, f.log_rows) == (3, {"n": 3}, 3)
    # A kill part-way through writing the latest slot: its checksum fails, the other slot (step 2) wins.
    with open(path, "r+b") as fh:
        fh.seek(offset + (seq % 2) * COMMIT_SLOT_BYTES + 40)
        fh.write(b"\0garbage\0")
    with ModelFile.open(path) as f:
        assert (f.step, f.rng_state, f.log_rows) == (2, {"n": 2}, 2)
        # ... and step 3's heads no longer match: the file is torn at step 3 (its heads were written).
        assert f.state().status == "damaged" or f.state().heads_changed


def test_both_slots_damaged_is_refused(tmp_path):
    path = new_model(tmp_path / "m.h5")
    with h5py.File(path, "r+") as f:
        f["train/commit"][...] = 7
    with pytest.raises(ModelFileError, match="commit record is damaged"):
        ModelFile.open(path)


def test_log_rows_ride_in_the_record_until_flushed(tmp_path):
    path = new_model(tmp_path / "m.h5")
    n = LOG_PENDING_MAX + 5
    with ModelFile.open(path, "r+") as f:
        heads = f.read_heads()
        for step in range(1, n + 1):
            f.commit(step, heads, log=[(step, 1.0 / step, 0.25, 0.01)])
        assert f.stored_log_rows == LOG_PENDING_MAX and len(f.record["pending_log"]) == 5
        assert f.read_log()["step"].tolist() == list(range(1, n + 1))
    with ModelFile.open(path) as f:  # the carried rows survive without a flush
        assert f.read_log()["loss"].tolist() == [1.0 / s for s in range(1, n + 1)]
    with ModelFile.open(path, "r+") as f:
        f.sync()
        assert f.stored_log_rows == n and f.record["pending_log"] == []
        assert f.read_log()["step"].tolist() == list(range(1, n + 1))


def test_uncommitted_log_rows_are_ignored_and_overwritten(tmp_path):
    path = new_model(tmp_path / "m.h5")
    with ModelFile.open(path, "r+") as f:
        f.append_log([1, 2], [0.5, 0.4], [0.1, 0.2], [0.0, 0.0])
        # An append a kill interrupted after the rows were written but before the record said so.
        f.h5[layout.TRAIN_LOG].resize((5,))
        f.h5[layout.TRAIN_LOG][2:5] = np.array([(99, 9, 9, 9)] * 3, dtype=hdf5.LOG_DTYPE)
    with ModelFile.open(path, "r+") as f:
        assert f.read_log()["step"].tolist() == [1, 2]
        f.append_log(3, 0.3, 0.3, 0.0)
        assert f.stored_log_rows == 3 and f.read_log()["step"].tolist() == [1, 2, 3]


def test_a_file_without_a_commit_record_gets_one_on_its_first_commit(tmp_path):
    path = new_model(tmp_path / "m.h5")
    with h5py.File(path, "r+") as f:
        del f["train/commit"]
        f.attrs["step"] = np.int64(4)
        f["core/chunk_step"][...] = 4
    with ModelFile.open(path, "r+") as f:
        assert f.step == 4 and not f.has_commit_record and f.state().status == "healthy"
        f.commit(5, f.read_heads())
    with ModelFile.open(path) as f:
        assert f.step == 5 and f.has_commit_record


def test_rewrite_is_atomic_and_the_object_follows_the_new_file(tmp_path):
    path = new_model(tmp_path / "m.h5")
    inode = os.stat(path).st_ino
    with ModelFile.open(path, "r+") as f:
        core = f.read_core() + 1
        heads = f.read_heads()
        f.rewrite(core, step=7, heads=heads, rng_state={"a": 1}, log=[(s, 0.1, 0.2, 0.3) for s in range(1, 8)])
        assert os.stat(path).st_ino != inode
        assert f.step == 7 and np.array_equal(f.read_core(), core)
        f.commit(8, heads)  # still writable, into the new file
    with ModelFile.open(path) as f:
        assert f.step == 8 and f.state().status == "healthy" and list(f.chunk_steps()) == [7] * 6
        assert f.read_log()["step"].tolist() == list(range(1, 8))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.h5"]


def test_rewrite_disk_full_keeps_the_old_file(tmp_path, monkeypatch):
    path = new_model(tmp_path / "m.h5")
    before = path.read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with ModelFile.open(path, "r+") as f:
        monkeypatch.setattr(h5io, "write_block", full)
        with pytest.raises(ModelFileError) as e:
            f.rewrite(f.read_core(), step=3, heads=f.read_heads())
        assert str(e.value) == f"could not write a checkpoint of {path}: No space left on device (the file still holds step 0)"
        assert f.step == 0
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.h5"]


def test_stale_temporaries(tmp_path):
    path = new_model(tmp_path / "m.h5")
    dead = tmp_path / ".m.h5.tmp-999999999"
    mine = tmp_path / f".m.h5.tmp-{os.getpid()}"
    other = tmp_path / ".n.h5.tmp-999999999"
    for p in (dead, mine, other):
        p.write_bytes(b"x")
    assert hdf5.stale_temporaries(path) == [str(dead)]
    assert hdf5.remove_stale_temporaries(path) == [str(dead)]
    assert not dead.exists() and mine.exists() and other.exists()
    # Today's naming adds a random part after the pid; both are found.
    dead_new = tmp_path / ".m.h5.tmp-999999999-0a1b2c3d"
    dead_new.write_bytes(b"x")
    assert hdf5.stale_temporaries(path) == [str(dead_new)]


def test_atomic_path_places_only_a_finished_file(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_path(target) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and not target.exists()
        Path(tmp).write_bytes(b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.bin"]
    with pytest.raises(KeyboardInterrupt), atomic_path(target) as tmp:
        Path(tmp).write_bytes(b"half")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.bin"]
    with pytest.raises(ModelFileError, match="already exists"), atomic_path(target, overwrite=False) as tmp:
        Path(tmp).write_bytes(b"other")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.bin"]


def test_atomic_path_replaces_a_symlinks_target_and_keeps_the_link(tmp_path):
    (tmp_path / "real").mkdir()
    real = tmp_path / "real" / "m.bin"
    real.write_bytes(b"old")
    link = tmp_path / "link.bin"
    link.symlink_to(real)
    with atomic_path(link) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path / "real")
        Path(tmp).write_bytes(b"new")
    assert link.is_symlink() and real.read_bytes() == b"new"


def test_streamed_steps_change_no_hdf5_metadata(tmp_path):
    """A streamed step writes raw data into pre-allocated places only: outside the core chunks,
    chunk_step, the heads and the commit record, not one byte of the file changes, nor its size."""
    path = new_model(tmp_path / "m.h5", layers=300, chunk=50)
    with ModelFile.open(path) as f:
        regions = [(int(o), f.storage_chunk_layers * f.row_size * 4) for o in f.core_chunk_offsets()]
        regions.append((f.chunk_step_offset(), 8 * f.n_storage_chunks))
        for name in [*layout.HEAD_PATHS.values(), layout.TRAIN_COMMIT]:
            ds = f.h5[name]
            regions.append((ds.id.get_offset(), ds.id.get_storage_size()))
    before = np.frombuffer(path.read_bytes(), np.uint8).copy()
    with DeepNet.open(path, writable=True, chunk_layers=70) as net:
        for x, y in batches(40):
            net.train_step(x, y, layer_lr=0.1, head_lr=0.1, rng_state={"k": 1})
    after = np.frombuffer(path.read_bytes(), np.uint8).copy()
    assert after.size == before.size
    mask = np.ones(before.size, bool)
    for offset, size in regions:
        mask[offset:offset + size] = False
    assert np.array_equal(before[mask], after[mask]), "bytes outside the raw data regions changed"
    assert not np.array_equal(before[~mask], after[~mask])
    assert file_state(path)["step"] == 40 and file_state(path)["state"] == "healthy"


# ---------------------------------------------------------------------------------------------------
# torn steps


def make_torn(path, layers_updated=120):
    """A file torn like a writer killed mid-backward: the last chunks hold step 2, the rest step 1."""
    new_model(path, layers=300, chunk=50)
    with DeepNet.open(path, writable=True) as net:
        x, y = batches(1)[0]
        net.train_step(x, y, layer_lr=0.1, head_lr=0.1)
    with ModelFile.open(path, "r+") as f:
        start = f.layers - layers_updated
        f.mark_chunk_steps(start, f.layers, 2)
        f.write_layers(start, f.read_layers(start, f.layers) * 1.5, 2)
    return path


def test_torn_file_is_reported_refused_and_accepted_with_resume_torn(tmp_path):
    path = make_torn(tmp_path / "m.h5", layers_updated=120)
    with ModelFile.open(path) as f:
        state = f.state()
    assert state.status == "torn" and (state.torn_step, state.layers_updated, state.chunks_updated) == (2, 150, (3, 5))
    assert state.message == "torn step 2: 150 of 300 layers updated (storage chunks 3..5 of 6); the rest is step 1"
    before = path.read_bytes()
    with pytest.raises(TornStepError) as e:
        DeepNet.open(path, writable=True)
    assert str(e.value) == (f"{path} holds a torn step 2 (150 of 300 layers updated when its writer stopped); pass "
                            f"--resume-torn to train on from this mixed state as step 1 (`deepnet check` describes it)")
    assert path.read_bytes() == before
    with DeepNet.open(path) as net:  # reading it is allowed
        assert net.step == 1
    with DeepNet.open(path, writable=True, resume_torn=True) as net:
        assert net.accepted_torn.torn_step == 2 and net.step == 1
    with ModelFile.open(path) as f:
        assert f.state().status == "healthy" and f.torn_accepted == {"step": 2, "layers_updated": 150,
                                                                      "heads_updated": False}
        assert list(f.chunk_steps()) == [1] * 6


@needs_mnist
def test_check_command(tmp_path, mini):
    healthy = new_model(tmp_path / "h.h5")
    proc = deepnet_run("check", healthy, env_data=mini)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("healthy: step 0"), proc.stdout + proc.stderr
    torn = make_torn(tmp_path / "t.h5")
    proc = deepnet_run("check", torn, "--json", env_data=mini)
    report = json.loads(proc.stdout)
    assert report["status"] == "torn" and report["torn_step"] == 2 and report["layers_updated"] == 150
    assert report["chunks_updated"] == [3, 5]
    one_line_error(proc, f"{torn}: torn step 2: 150 of 300 layers updated (storage chunks 3..5 of 6)", status=1)
    nan = new_model(tmp_path / "n.h5")
    with ModelFile.open(nan, "r+") as f:
        rows = f.read_layers(10, 12)
        rows[1, 3] = np.nan
        f.write_layers(10, rows, 0)
    proc = deepnet_run("check", nan, env_data=mini)
    one_line_error(proc, "damaged: 1 core layers hold non-finite weights (first 11, last 11)", status=1)


# ---------------------------------------------------------------------------------------------------
# resume: bit for bit


RUN = dict(layers=200, width=4, activation="softsign", seed=4, batch=5, train_limit=600, test_samples=0, progress=False)


@needs_mnist
@pytest.mark.parametrize("in_memory, no_mmap", [(False, False), (False, True), (True, False)],
                         ids=["streamed", "streamed-through-h5py", "in-memory"])
def test_resume_in_pieces_is_bit_exact(tmp_path, mini_env, capsys, monkeypatch, in_memory, no_mmap):
    if no_mmap:
        monkeypatch.setenv("DEEPNET_NO_MMAP", "1")
    deepnet.train(tmp_path / "one.h5", steps=23, in_memory=in_memory, report_every=5, checkpoint_every=4, **RUN)
    # Pieces of different lengths, report and checkpoint cadences and chunkings, the settings given once.
    for steps, report_every, chunk_layers in ((7, 3, 13), (1, 1, 200), (9, 4, 1000), (6, 100, 50)):
        deepnet.train(tmp_path / "two.h5", steps=steps, in_memory=in_memory, report_every=report_every,
                      chunk_layers=chunk_layers, checkpoint_every=2, **RUN)
    capsys.readouterr()
    assert_same(file_state(tmp_path / "one.h5"), file_state(tmp_path / "two.h5"))


@needs_mnist
def test_training_settings_are_remembered(tmp_path, mini_env, capsys):
    settings = dict(batch=3, layer_lr=0.11, head_lr=0.07, train_limit=300)
    run = {k: v for k, v in RUN.items() if k not in ("batch", "train_limit")}
    deepnet.train(tmp_path / "one.h5", steps=8, **settings, **run)
    deepnet.train(tmp_path / "two.h5", steps=5, **settings, **run)
    deepnet.train(tmp_path / "two.h5", steps=3, **run)  # no settings: the model's are used
    capsys.readouterr()
    assert_same(file_state(tmp_path / "one.h5"), file_state(tmp_path / "two.h5"))
    with ModelFile.open(tmp_path / "two.h5") as f:
        assert {k: f.train_settings[k] for k in settings} == settings


# ---------------------------------------------------------------------------------------------------
# Ctrl-C


def wait_for_report(proc) -> dict:
    line = proc.stdout.readline()
    assert line, proc.stderr.read()
    return json.loads(line)


@needs_mnist
@pytest.mark.parametrize("in_memory", [False, True], ids=["streamed", "in-memory"])
def test_ctrl_c_finishes_the_step_saves_and_resumes_exactly(tmp_path, mini, in_memory):
    path = new_model(tmp_path / "m.h5", layers=3000, chunk=100, seed=2)
    reference = tmp_path / "ref.h5"
    reference.write_bytes(path.read_bytes())
    flags = ["--batch", "8", "--train-limit", "1000", "--test-samples", "0", "--json"]
    if in_memory:
        flags += ["--in-memory", "--checkpoint-every", "100000"]
    proc = deepnet_popen("train", path, "--steps", "100000", "--report-every", "1", *flags, env_data=mini)
    wait_for_report(proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    m = re.search(r"deepnet: interrupted: stopped after step (\d+) of 100000; (\S+) holds step (\d+)", err)
    assert m and m[1] == m[3], err
    assert "finishing the current step, then saving and stopping" in err and "Traceback" not in err
    step = int(m[1])
    state = file_state(path)
    assert state["step"] == step and state["state"] == "healthy" and state["log"][0] == list(range(1, step + 1))
    # Continue to step + 5 and compare with an uninterrupted run of step + 5 steps.
    for p, steps in ((path, 5), (reference, step + 5)):
        proc = deepnet_run("train", p, "--steps", steps, *flags, env_data=mini)
        assert proc.returncode == 0, proc.stderr
    assert_same(file_state(path), file_state(reference))


@needs_mnist
def test_ctrl_c_held_down_until_the_command_has_exited_still_exits_130(tmp_path, mini):
    """Presses that keep arriving while the command reports the stop and exits (a held-down Ctrl-C, or
    presses that reach a busy machine late) must not kill it with the signal: the interpreter's
    shutdown resets Python-level handlers to the default, so the command ignores them from then on."""
    path = new_model(tmp_path / "m.h5", layers=3000, chunk=100, seed=2)
    proc = deepnet_popen("train", path, "--steps", "100000", "--report-every", "1", "--batch", "8",
                         "--train-limit", "1000", "--test-samples", "0", "--json", env_data=mini)
    wait_for_report(proc)
    presses = 0
    while proc.poll() is None:
        try:
            proc.send_signal(signal.SIGINT)
        except ProcessLookupError:
            break
        presses += 1
        time.sleep(0.0005)
    out, err = proc.communicate(timeout=120)
    assert presses >= 3
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert re.search(r"deepnet: interrupted: (abandoned (saving )?step \d+|stopped after step \d+ of 100000); ", err), err
    assert file_state(path)["state"] == "healthy"


@needs_mnist
def test_ctrl_c_three_times_abandons_the_step(tmp_path, mini):
    path = new_model(tmp_path / "m.h5", layers=60000, chunk=1000, seed=2)
    proc = deepnet_popen("train", path, "--steps", "100000", "--report-every", "1", "--batch", "8",
                         "--train-limit", "1000", "--test-samples", "0", "--json", env_data=mini)
    wait_for_report(proc)
    for _ in range(3):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.002)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    with ModelFile.open(path) as f:
        state = f.state()
    if "abandoned" in last:
        expected = state.message if state.status == "torn" else f"{path} holds step {state.step}"
        assert expected in last, (last, state)
    else:  # all three landed before the step ended; it finished and stopped
        assert "stopped after step" in last and state.status == "healthy", err
    assert state.status in ("healthy", "torn")


# ---------------------------------------------------------------------------------------------------
# one writer


@needs_mnist
@pytest.mark.parametrize("locking", ["hdf5", "deepnet"], ids=["hdf5-locking", "HDF5_USE_FILE_LOCKING=FALSE"])
@pytest.mark.parametrize("in_memory", [False, True], ids=["streamed", "in-memory"])
def test_a_second_writer_is_refused(tmp_path, mini, locking, in_memory):
    env = {} if locking == "hdf5" else {"HDF5_USE_FILE_LOCKING": "FALSE"}
    path = new_model(tmp_path / "m.h5", layers=3000, chunk=100)
    # In memory, the file is replaced by a new one at every step: the lock must follow it.
    mode = ["--in-memory", "--checkpoint-every", "1"] if in_memory else []
    writer = deepnet_popen("train", path, "--steps", "100000", "--report-every", "1", "--batch", "8",
                           "--train-limit", "1000", "--test-samples", "0", "--json", *mode, env_data=mini,
                           extra_env=env)
    try:
        wait_for_report(writer)
        for _ in range(2):
            second = deepnet_run("train", path, "--steps", "1", "--train-limit", "1000", "--test-samples", "0",
                                 env_data=mini, extra_env=env)
            one_line_error(second, f"could not open {path} in mode 'r+': it is locked by another process")
        overwrite = deepnet_run("init", path, "--layers", "10", "--overwrite", env_data=mini, extra_env=env)
        one_line_error(overwrite, f"cannot replace {path}: another process has it open")
        if locking == "hdf5":  # HDF5's lock keeps readers out while a writer has the file
            reader = deepnet_run("info", path, env_data=mini, extra_env=env)
            one_line_error(reader, f"could not open {path} in mode 'r': it is locked by another process")
    finally:
        writer.send_signal(signal.SIGINT)
        writer.communicate(timeout=120)
    assert writer.returncode == 130
    # Nothing writes now: readers work.
    assert deepnet_run("info", path, env_data=mini, extra_env=env).returncode == 0
    assert deepnet_run("eval", path, "--samples", "50", env_data=mini, extra_env=env).returncode == 0
    assert deepnet_run("check", path, env_data=mini, extra_env=env).returncode == 0


# ---------------------------------------------------------------------------------------------------
# the numerical guard


def nan_loss_at(monkeypatch, calls: int):
    """Make the `calls`-th loss (counting from 1) NaN."""
    import deepnet.nn.network as model

    real = model.loss_and_gradient
    count = [0]

    def patched(kind, logits, labels):
        count[0] += 1
        loss, acc, d = real(kind, logits, labels)
        return (float("nan") if count[0] == calls else loss), acc, d

    monkeypatch.setattr(model, "loss_and_gradient", patched)


def nan_gradient_in_backward(monkeypatch, step_call: int, chunk_call: int):
    """Make g non-finite right after the `chunk_call`-th kernel call of the `step_call`-th backward pass."""
    from deepnet.kernels.loader import LayerKernels

    real = LayerKernels.backward
    state = {"step": 0, "chunk": 0, "last_g": None}

    def patched(self, params, saves, save_every, g, *args, **kwargs):
        if state["last_g"] is not g:
            state["step"] += 1
            state["chunk"] = 0
            state["last_g"] = g
        state["chunk"] += 1
        rows_finite = real(self, params, saves, save_every, g, *args, **kwargs)
        if state["step"] == step_call and state["chunk"] == chunk_call:
            g[0, 0] = np.inf
        return rows_finite

    monkeypatch.setattr(LayerKernels, "backward", patched)


@needs_mnist
@pytest.mark.parametrize("in_memory", [False, True], ids=["streamed", "in-memory"])
def test_non_finite_loss_refuses_the_step_and_keeps_the_good_ones(tmp_path, mini_env, monkeypatch, capsys, in_memory):
    good = tmp_path / "good.h5"
    deepnet.train(good, steps=3, in_memory=in_memory, report_every=10, **RUN)
    nan_loss_at(monkeypatch, 4)
    with pytest.raises(NonFiniteError) as e:
        deepnet.train(tmp_path / "m.h5", steps=6, in_memory=in_memory, report_every=10, checkpoint_every=100, **RUN)
    message = str(e.value)
    assert "\n" not in message and message.startswith("step 4 refused: the loss is nan")
    if in_memory:
        assert message.endswith(f"saved the last good step, 3, to {tmp_path / 'm.h5'}")
    else:
        assert message.endswith(f"nothing was written ({tmp_path / 'm.h5'} holds step 3)")
    capsys.readouterr()
    assert_same(file_state(good), file_state(tmp_path / "m.h5"))


def test_non_finite_gradient_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    import deepnet.nn.network as model

    path = new_model(tmp_path / "m.h5")
    before = path.read_bytes()
    real = model.loss_and_gradient

    def nan_gradient(kind, logits, labels):
        loss, acc, d = real(kind, logits, labels)
        d[0, 0] = np.nan
        return loss, acc, d

    monkeypatch.setattr(model, "loss_and_gradient", nan_gradient)
    for in_memory in (False, True):
        with DeepNet.open(path, writable=True, in_memory=in_memory) as net:
            x, y = batches(1)[0]
            with pytest.raises(NonFiniteError, match=r"^step 1 refused: the gradient reaching the core is not finite; "
                                                     r"nothing was written \(.* holds step 0\)$"):
                net.train_step(x, y, layer_lr=0.1, head_lr=0.1)
            assert net.step == 0
            net.save()  # nothing to save: the step never happened
    assert path.read_bytes() == before


def test_non_finite_gradient_mid_backward_streamed_leaves_a_torn_step(tmp_path, monkeypatch):
    path = new_model(tmp_path / "m.h5", layers=300, chunk=50)
    with DeepNet.open(path, writable=True, chunk_layers=50) as net:
        x, y = batches(1)[0]
        net.train_step(x, y, layer_lr=0.1, head_lr=0.1)
        nan_gradient_in_backward(monkeypatch, step_call=1, chunk_call=3)
        with pytest.raises(NonFiniteError) as e:
            net.train_step(x, y, layer_lr=0.1, head_lr=0.1)
        assert str(e.value) == (f"step 2 failed: the gradient became non-finite in layers 150..199; {path} now holds "
                                f"a torn step 2: 150 of 300 layers updated (storage chunks 3..5 of 6); the rest is step 1")
        with pytest.raises(ModelFileError, match="not saving"):
            net.save()
        with pytest.raises(ModelFileError, match="cannot train"):
            net.train_step(x, y, layer_lr=0.1, head_lr=0.1)
    with ModelFile.open(path) as f:
        assert f.state().status == "torn" and list(f.chunk_steps()) == [1, 1, 1, 2, 2, 2]


def test_non_finite_gradient_mid_backward_through_h5py_writes_nothing_of_that_chunk(tmp_path, monkeypatch):
    """The h5py-streamed fallback writes a chunk back only after its kernel call: the chunk whose gradient
    went non-finite is neither written nor marked."""
    monkeypatch.setenv("DEEPNET_NO_MMAP", "1")
    path = new_model(tmp_path / "m.h5", layers=300, chunk=50)
    with DeepNet.open(path, writable=True, chunk_layers=50) as net:
        x, y = batches(1)[0]
        net.train_step(x, y, layer_lr=0.1, head_lr=0.1)
        before = net.file.read_layers(0, 200)
        nan_gradient_in_backward(monkeypatch, step_call=1, chunk_call=3)
        with pytest.raises(NonFiniteError) as e:
            net.train_step(x, y, layer_lr=0.1, head_lr=0.1)
        assert str(e.value).endswith(f"{path} now holds a torn step 2: 100 of 300 layers updated (storage chunks "
                                     f"4..5 of 6); the rest is step 1")
    with ModelFile.open(path) as f:
        assert list(f.chunk_steps()) == [1, 1, 1, 1, 2, 2]
        assert np.array_equal(f.read_layers(0, 200), before)


@needs_mnist
def test_non_finite_gradient_mid_backward_in_memory_keeps_the_last_checkpoint(tmp_path, mini_env, monkeypatch, capsys):
    good = tmp_path / "good.h5"
    deepnet.train(good, steps=4, in_memory=True, report_every=10, **RUN)
    nan_gradient_in_backward(monkeypatch, step_call=7, chunk_call=1)
    with pytest.raises(NonFiniteError) as e:
        deepnet.train(tmp_path / "m.h5", steps=9, in_memory=True, report_every=10, checkpoint_every=4,
                      chunk_layers=50, **RUN)
    # In RAM a chunk is the whole 200-layer core (stores.IN_MEMORY_CHUNK_LAYERS), whatever --chunk-layers asks.
    assert str(e.value) == (f"step 7 failed: the gradient became non-finite in layers 0..199; the weights in RAM "
                            f"are unusable and will not be saved ({tmp_path / 'm.h5'} holds step 4)")
    capsys.readouterr()
    assert_same(file_state(good), file_state(tmp_path / "m.h5"))


# ---------------------------------------------------------------------------------------------------
# disk full while training


@needs_mnist
def test_disk_full_at_a_log_append_keeps_a_healthy_file(tmp_path, mini_env, monkeypatch, capsys):
    from deepnet.cli import main

    calls = [0]
    real = record.append_log_rows

    def full_on_second(*args):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(*args)

    monkeypatch.setattr(record, "append_log_rows", full_on_second)
    path = tmp_path / "m.h5"
    assert main(["train", str(path), "--layers", "200", "--steps", "20", "--report-every", "3", "--batch", "4",
                 "--train-limit", "1000", "--test-samples", "0", "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"deepnet: error: could not append to the training log of {path}: No space left on device "
                   f"(the file still holds step 6)")
    state = file_state(path)
    assert state["state"] == "healthy" and state["step"] == 6 and state["log"][0] == list(range(1, 7))


@needs_mnist
def test_disk_full_at_an_in_memory_checkpoint_keeps_the_previous_one(tmp_path, mini_env, monkeypatch, capsys):
    from deepnet.cli import main

    path = tmp_path / "m.h5"
    assert main(["train", str(path), "--layers", "200", "--steps", "4", "--in-memory", "--batch", "4",
                 "--train-limit", "1000", "--test-samples", "0", "--json"]) == 0
    before = path.read_bytes()

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(h5io, "write_block", full)
    capsys.readouterr()
    assert main(["train", str(path), "--steps", "6", "--in-memory", "--checkpoint-every", "3",
                 "--test-samples", "0", "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"deepnet: error: could not write a checkpoint of {path}: No space left on device "
                   f"(the file still holds step 4)")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.h5"]


# ---------------------------------------------------------------------------------------------------
# security


PACKAGE = Path(deepnet.__file__).parent


def test_pickle_only_in_the_pinned_offline_route():
    """No pickle anywhere in the package except deepnet/data/mnist.py's sha256-pinned, NumPy-only unpickler."""
    offenders = []
    for source in sorted(PACKAGE.rglob("*.py")) + sorted(PACKAGE.rglob("*.pyx")):
        text = source.read_text()
        if re.search(r"^\s*(import|from)\s+(c?pickle|dill|shelve|marshal)\b|\bpickle\.|np\.load\(|allow_pickle",
                     text, re.M) and source.relative_to(PACKAGE) != Path("data", "mnist.py"):
            offenders.append(str(source.relative_to(PACKAGE)))
    assert offenders == []
    data = (PACKAGE / "data" / "mnist.py").read_text()
    assert "class _NumpyOnlyUnpickler(pickle.Unpickler)" in data
    assert re.search(r"digest = _sha256_hex\(pickle_gz\)", data), "the pickle's sha256 is checked before unpickling"
    assert data.index("digest = _sha256_hex(pickle_gz)") < data.index("_unpickle_dataset(pickle_gz, where)")


def test_nothing_read_from_a_model_file_is_executed(tmp_path):
    """The file stores an activation's name only; a name that is not registered is refused, whatever
    it contains, and no kernel is compiled for it."""
    from deepnet.errors import ActivationError

    path = new_model(tmp_path / "m.h5")
    payload = "softsign'); import os; os.system('touch " + str(tmp_path / "pwned") + "'); ('"
    with h5py.File(path, "r+") as f:
        f.attrs["activation"] = payload
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "deepnet"
    before = sorted(cache.rglob("*")) if cache.exists() else []
    with pytest.raises(ActivationError) as e:
        DeepNet.open(path)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "pwned").exists()
    assert (sorted(cache.rglob("*")) if cache.exists() else []) == before
    # The source never evaluates text: no eval/exec on anything, compile() only in the plugin compiler.
    for source in PACKAGE.rglob("*.py"):
        text = source.read_text()
        assert not re.search(r"(?<![\w.])(?<!def )(eval|exec)\(", text), source


def test_an_interrupt_swallowed_by_a_finaliser_is_raised_at_the_next_chunk():
    """Python cannot raise a KeyboardInterrupt inside a __del__; the stop handler notes it instead and
    the core raises it between chunks, so no Ctrl-C is lost and no 'Exception ignored' is printed."""
    from types import SimpleNamespace

    from deepnet.training.signals import StopSignal

    with StopSignal() as stop:
        stop.check()  # nothing pending: returns
        sys.unraisablehook(SimpleNamespace(exc_value=KeyboardInterrupt(), exc_type=KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            stop.check()
        stop.check()  # raised once only


def test_signals_right_after_a_stop_are_ignored_then_passed_on():
    from deepnet.training.signals import ignoring_for

    seen = []
    ignoring_for(60.0, lambda signum, frame: seen.append(signum))(signal.SIGINT, None)
    assert seen == []
    ignoring_for(0.0, lambda signum, frame: seen.append(signum))(signal.SIGINT, None)
    assert seen == [signal.SIGINT]


@needs_mnist
def test_sigterm_during_training_saves_and_exits_143(tmp_path, mini):
    """issue 18 item 6: one convention for every command, 128 + the signal: SIGTERM finishes the step,
    saves and exits 143 (SIGINT: 130), saying so in one line."""
    path = new_model(tmp_path / "m.h5", layers=3000, chunk=100, seed=2)
    proc = deepnet_popen("train", path, "--steps", "100000", "--report-every", "1", "--batch", "8",
                         "--train-limit", "1000", "--test-samples", "0", "--json", env_data=mini)
    wait_for_report(proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert re.search(r"deepnet: terminated: stopped after step (\d+) of 100000; ", err) and "Traceback" not in err, err
    assert file_state(path)["state"] == "healthy"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.h5"]
