"""Tests for deepnet.formats.hdf5: the model file format, its creation, validation and I/O."""

from __future__ import annotations

import datetime as dt
import errno
import math
import os

import h5py
import numpy as np
import pytest

import deepnet.formats.hdf5 as hdf5
from deepnet.formats import h5io
from deepnet.errors import ConfigError, ModelFileError
from deepnet.formats.hdf5 import FORMAT, FORMAT_VERSION, ModelFile, default_alpha

# Small but non-trivial: 37 layers in 8-layer storage chunks -> 5 chunks, the last one partial.
SMALL = dict(layers=37, width=3, activation="tanh", input_dim=5, n_classes=4, storage_chunk_layers=8)


def make(path, **kw):
    args = dict(SMALL, progress=False)
    args.update(kw)
    return ModelFile.create(path, **args)


def check_message(excinfo, *fragments):
    """The error message is one line and contains every fragment."""
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in {msg!r}"
    return msg


def parse_utc(text):
    t = dt.datetime.fromisoformat(text)
    assert t.utcoffset() == dt.timedelta(0)
    return t


# ----------------------------------------------------------------------------------------------
# creation and the layout


def test_create_open_round_trip(tmp_path):
    path = tmp_path / "model.h5"
    with make(path, alpha=0.25, seed=7, init_scale=0.01) as m:
        assert m.mode == "r+"
        assert m.path == str(path)
    with ModelFile.open(path) as m:
        assert m.mode == "r"
        assert (m.layers, m.width, m.activation) == (37, 3, "tanh")
        assert (m.input_dim, m.n_classes, m.seed) == (5, 4, 7)
        assert m.alpha == 0.25
        assert m.init_scale == 0.01
        assert m.step == 0
        assert m.row_size == 12
        assert m.storage_chunk_layers == 8
        assert m.n_storage_chunks == 5
        assert m.rng_state is None
        parse_utc(m.created)
        parse_utc(m.updated)
        assert "model.h5" in repr(m) and "layers=37" in repr(m)
        s = m.summary()
        assert s["path"] == str(path)
        assert s["kind"] == "dense" and s["format_version"] == FORMAT_VERSION
        assert (s["layers"], s["width"], s["activation"], s["alpha"]) == (37, 3, "tanh", 0.25)
        assert (s["input_dim"], s["n_classes"], s["step"], s["seed"]) == (5, 4, 0, 7)
        assert s["storage_chunk_layers"] == 8
        assert s["file_size_bytes"] == os.path.getsize(path)
        assert s["log_rows"] == 0 and s["last_log"] is None
        assert s["created"] == m.created and s["updated"] == m.updated
    assert "closed" in repr(m)

    # The raw layout, as another tool would see it.
    with h5py.File(path, "r") as f:
        a = f.attrs
        assert a["format"] == FORMAT and a["format_version"] == 1 and a["kind"] == "dense"
        assert a["width"] == 3 and a["layers"] == 37 and a["activation"] == "tanh"
        assert a["alpha"] == 0.25 and a["input_dim"] == 5 and a["n_classes"] == 4
        assert a["step"] == 0 and a["seed"] == 7 and a["init_scale"] == 0.01
        assert a["rng_state"] in ("", b"")
        w = f["core/weights"]
        assert w.shape == (37, 12) and w.dtype == np.float32
        assert w.chunks == (8, 12) and w.compression is None and w.maxshape == (37, 12)
        cs = f["core/chunk_step"]
        assert cs.shape == (5,) and cs.dtype == np.int64 and not cs[()].any()
        assert f["head/input/weight"].shape == (5, 3) and f["head/input/weight"].dtype == np.float32
        assert f["head/input/bias"].shape == (3,) and f["head/input/bias"].dtype == np.float32
        assert f["head/output/weight"].shape == (3, 4) and f["head/output/weight"].dtype == np.float32
        assert f["head/output/bias"].shape == (4,) and f["head/output/bias"].dtype == np.float32
        log = f["train/log"]
        assert log.shape == (0,) and log.maxshape == (None,) and log.chunks is not None
        assert log.dtype.names == ("step", "loss", "batch_acc", "seconds")
        assert [log.dtype[n] for n in log.dtype.names] == [np.dtype(t) for t in ("i8", "f8", "f8", "f8")]


def test_defaults(tmp_path):
    with ModelFile.create(tmp_path / "m.h5", layers=100, width=2, activation="tanh", progress=False) as m:
        assert m.alpha == pytest.approx(0.1) == default_alpha(100)
        assert (m.input_dim, m.n_classes, m.seed, m.init_scale) == (784, 10, 0, 1e-3)
        assert m.storage_chunk_layers == 100  # ~1 MiB would be 43690 layers: capped at L
    assert default_alpha(10_000_000) == pytest.approx(1 / math.sqrt(1e7))
    with pytest.raises(ConfigError):
        default_alpha(0)


@pytest.mark.parametrize(
    "layers,width,expected",
    [(10_000_000, 4, 2**20 // 80), (10_000_000, 2, 2**20 // 24), (10, 4, 10), (5, 600, 1), (3, 512, 1)],
)
def test_default_storage_chunk_layers(layers, width, expected):
    assert hdf5.default_storage_chunk_layers(layers, width) == expected


def test_storage_chunk_override_is_capped_at_layers(tmp_path):
    with make(tmp_path / "m.h5", storage_chunk_layers=1000) as m:
        assert m.storage_chunk_layers == 37 and m.n_storage_chunks == 1


def test_init_distribution(tmp_path):
    with make(tmp_path / "m.h5", layers=300, width=4, input_dim=50, n_classes=10, init_scale=0.002) as m:
        core = m.read_core()
        heads = m.read_heads()
    w = core[:, :16]
    assert np.abs(w).max() <= 0.002
    assert w.min() < -0.0019 and w.max() > 0.0019  # spans the interval
    assert abs(w.mean()) < 1e-4
    assert not core[:, 16:].any()  # biases are zero
    lim_in, lim_out = math.sqrt(6 / (50 + 4)), math.sqrt(6 / (4 + 10))
    assert np.abs(heads["input_weight"]).max() <= lim_in and np.abs(heads["input_weight"]).max() > 0.5 * lim_in
    assert np.abs(heads["output_weight"]).max() <= lim_out
    assert not heads["input_bias"].any() and not heads["output_bias"].any()
    assert all(v.dtype == np.float32 for v in heads.values())


def test_init_scale_zero(tmp_path):
    with make(tmp_path / "m.h5", init_scale=0) as m:
        assert not m.read_core().any()


def test_init_matches_reference_draws(tmp_path):
    """The documented recipe: default_rng([seed, 0]), core float64 uniform then cast, then the heads."""
    with make(tmp_path / "m.h5", seed=3) as m:
        core, heads = m.read_core(), m.read_heads()
    rng = np.random.default_rng([3, 0])
    expect = rng.uniform(-1e-3, 1e-3, size=(37, 9)).astype(np.float32)
    np.testing.assert_array_equal(core[:, :9], expect)
    lim_in, lim_out = math.sqrt(6 / (5 + 3)), math.sqrt(6 / (3 + 4))
    np.testing.assert_array_equal(heads["input_weight"], rng.uniform(-lim_in, lim_in, (5, 3)).astype(np.float32))
    np.testing.assert_array_equal(heads["output_weight"], rng.uniform(-lim_out, lim_out, (3, 4)).astype(np.float32))


def test_init_independent_of_block_and_chunk_size(tmp_path, monkeypatch):
    with make(tmp_path / "a.h5", storage_chunk_layers=37) as m:  # one chunk, one block
        core_a, heads_a = m.read_core(), m.read_heads()
    monkeypatch.setattr(h5io, "WRITE_BLOCK_BYTES", 1)  # one storage chunk per block
    writes = []
    real = h5io.write_block
    monkeypatch.setattr(h5io, "write_block", lambda d, s, b: (writes.append((s, len(b))), real(d, s, b)))
    with make(tmp_path / "b.h5", storage_chunk_layers=5) as m:
        assert m.storage_chunk_layers == 5
        core_b, heads_b = m.read_core(), m.read_heads()
    assert writes == [(s, min(5, 37 - s)) for s in range(0, 37, 5)]
    np.testing.assert_array_equal(core_a, core_b)
    for key in heads_a:
        np.testing.assert_array_equal(heads_a[key], heads_b[key])


def test_seed_determines_init(tmp_path):
    with make(tmp_path / "a.h5", seed=1) as a, make(tmp_path / "b.h5", seed=1) as b, make(tmp_path / "c.h5", seed=2) as c:
        np.testing.assert_array_equal(a.read_core(), b.read_core())
        assert not np.array_equal(a.read_core(), c.read_core())
        assert not np.array_equal(a.read_heads()["input_weight"], c.read_heads()["input_weight"])


def test_create_with_core_weights(tmp_path):
    with make(tmp_path / "drawn.h5") as m:
        drawn_heads = m.read_heads()
    core = np.arange(37 * 12, dtype=np.float64).reshape(37, 12) / 7
    with make(tmp_path / "given.h5", core_weights=core) as m:
        np.testing.assert_array_equal(m.read_core(), core.astype(np.float32))
        # The generator skips the draws the array replaced, so the heads are the drawn file's.
        for key, value in m.read_heads().items():
            np.testing.assert_array_equal(value, drawn_heads[key])
    with pytest.raises(ConfigError) as e:
        make(tmp_path / "bad.h5", core_weights=np.zeros((37, 11), np.float32))
    check_message(e, "core_weights", "(37, 11)", "(37, 12)")
    assert not (tmp_path / "bad.h5").exists()


def test_create_progress_bar(tmp_path, capsys):
    make(tmp_path / "m.h5", progress=True).close()
    assert "init m.h5" in capsys.readouterr().err


def test_create_overwrite(tmp_path):
    path = tmp_path / "m.h5"
    make(path, seed=1).close()
    with pytest.raises(ModelFileError) as e:
        make(path, seed=2)
    check_message(e, str(path), "already exists", "overwrite")
    with ModelFile.open(path) as m:
        assert m.seed == 1  # untouched
    make(path, seed=2, width=2, overwrite=True).close()
    with ModelFile.open(path) as m:
        assert (m.seed, m.width) == (2, 2)
    assert sorted(os.listdir(tmp_path)) == ["m.h5"]


def test_create_refuses_directory_targets(tmp_path):
    with pytest.raises(ModelFileError) as e:
        make(tmp_path / "nowhere" / "m.h5")
    check_message(e, "nowhere", "does not exist")
    (tmp_path / "d.h5").mkdir()
    with pytest.raises(ModelFileError) as e:
        make(tmp_path / "d.h5", overwrite=True)
    check_message(e, "d.h5", "is a directory")


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can write anywhere")
def test_create_refuses_unwritable_directory(tmp_path):
    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(0o500)
    try:
        with pytest.raises(ModelFileError) as e:
            make(d / "m.h5")
        check_message(e, str(d / "m.h5"), "not writable")
    finally:
        d.chmod(0o700)


def test_create_refuses_directory_without_write_permission(tmp_path, monkeypatch):
    # The same check as above, made testable as root (who passes any permission check).
    monkeypatch.setattr(os, "access", lambda p, mode: False)
    with pytest.raises(ModelFileError) as e:
        make(tmp_path / "m.h5")
    assert check_message(e) == f"cannot create {tmp_path / 'm.h5'}: directory {tmp_path} is not writable"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    "kw,fragment",
    [
        (dict(layers=0), "layers must be >= 1"),
        (dict(layers=2.5), "layers must be an integer"),
        (dict(layers=True), "layers must be an integer"),
        (dict(width=0), "width must be >= 1"),
        (dict(input_dim=0), "input_dim must be >= 1"),
        (dict(n_classes=1), "n_classes must be >= 2"),
        (dict(alpha=0.0), "alpha must be > 0"),
        (dict(alpha=-1.0), "alpha must be > 0"),
        (dict(alpha=float("nan")), "alpha must be finite"),
        (dict(alpha=float("inf")), "alpha must be finite"),
        (dict(alpha="big"), "alpha must be a number"),
        (dict(init_scale=-1e-3), "init_scale must be >= 0"),
        (dict(init_scale=float("nan")), "init_scale must be finite"),
        (dict(activation=""), "activation must be a non-empty name"),
        (dict(activation=None), "activation must be a non-empty name"),
        (dict(activation=" tanh"), "whitespace"),
        (dict(seed=-1), "seed must be >= 0"),
        (dict(storage_chunk_layers=0), "storage_chunk_layers must be >= 1"),
    ],
)
def test_create_bad_arguments(tmp_path, kw, fragment):
    with pytest.raises(ConfigError) as e:
        make(tmp_path / "m.h5", **kw)
    check_message(e, fragment)
    assert os.listdir(tmp_path) == []


def test_create_accepts_numpy_integers(tmp_path):
    with make(tmp_path / "m.h5", layers=np.int64(9), width=np.int32(2)) as m:
        assert (m.layers, m.width) == (9, 2)


def _failing_write_block(monkeypatch, exc, after=1):
    """Make the init write loop raise `exc` after `after` successful block writes."""
    real = h5io.write_block
    calls = []

    def write_block(dset, start, block):
        if len(calls) >= after:
            raise exc
        calls.append(start)
        real(dset, start, block)

    monkeypatch.setattr(h5io, "WRITE_BLOCK_BYTES", 1)
    monkeypatch.setattr(h5io, "write_block", write_block)
    return calls


def test_create_disk_full_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "m.h5"
    calls = _failing_write_block(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(ModelFileError) as e:
        make(path)
    assert calls == [0]  # it failed part-way through the loop
    assert check_message(e) == f"could not write {path}: No space left on device"
    assert os.listdir(tmp_path) == []


def test_create_h5py_style_error_is_reported_by_errno(tmp_path, monkeypatch):
    # h5py builds OSErrors from HDF5's error stack with the errno only inside the text.
    text = "Can't write data (file write failed: time = x, errno = 28, error message = 'No space left on device')"
    _failing_write_block(monkeypatch, OSError(text), after=0)
    with pytest.raises(ModelFileError) as e:
        make(tmp_path / "m.h5")
    assert str(e.value).endswith(": No space left on device")
    assert os.listdir(tmp_path) == []


def test_create_interrupted_leaves_nothing_and_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "m.h5"
    make(path, seed=5).close()
    _failing_write_block(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        make(path, overwrite=True, seed=6)
    assert os.listdir(tmp_path) == ["m.h5"]
    with ModelFile.open(path) as m:  # the old model is intact
        assert m.seed == 5


# ----------------------------------------------------------------------------------------------
# core weights I/O


def test_read_layers(tmp_path):
    with make(tmp_path / "m.h5") as m:
        core = m.read_core()
        assert core.shape == (37, 12) and core.dtype == np.float32 and core.flags.c_contiguous
        part = m.read_layers(6, 19)  # spans chunk boundaries at 8 and 16
        assert part.shape == (13, 12) and part.dtype == np.float32 and part.flags.c_contiguous
        np.testing.assert_array_equal(part, core[6:19])
        assert m.read_layers(5, 5).shape == (0, 12)
        np.testing.assert_array_equal(m.read_layers(0, 37), core)

        out = np.full((13, 12), np.nan, dtype=np.float32)
        got = m.read_layers(6, 19, out=out)
        assert got is out
        np.testing.assert_array_equal(out, core[6:19])

        big = np.full((8, 12), np.nan, dtype=np.float32)  # a chunk buffer, reused for the short last chunk
        got = m.read_layers(32, 37, out=big)
        assert got.shape == (5, 12) and np.shares_memory(got, big) and got.flags.c_contiguous
        np.testing.assert_array_equal(got, core[32:37])
        assert np.isnan(big[5:]).all()


@pytest.mark.parametrize(
    "out,fragment",
    [
        (np.zeros((3, 12), np.float64), "float32"),
        (np.zeros((12, 3), np.float32).T, "C-contiguous"),
        (np.zeros((2, 12), np.float32), "(2, 12)"),
        (np.zeros((3, 11), np.float32), "(3, 11)"),
        (np.zeros(36, np.float32), "(36,)"),
    ],
)
def test_read_layers_bad_out(tmp_path, out, fragment):
    with make(tmp_path / "m.h5") as m, pytest.raises(ConfigError) as e:
        m.read_layers(0, 3, out=out)
    check_message(e, fragment)


@pytest.mark.parametrize("start,stop", [(-1, 3), (5, 4), (30, 38)])
def test_read_layers_bad_range(tmp_path, start, stop):
    with make(tmp_path / "m.h5") as m, pytest.raises(ConfigError) as e:
        m.read_layers(start, stop)
    check_message(e, f"[{start}, {stop})", "0..37")


def test_write_layers_and_chunk_step(tmp_path):
    path = tmp_path / "m.h5"
    with make(path) as m:
        core = m.read_core()
        rows = np.random.default_rng(0).standard_normal((13, 12)).astype(np.float32)
        m.write_layers(6, rows, step=3)  # layers 6..18: chunks 0, 1, 2
        core[6:19] = rows
        np.testing.assert_array_equal(m.chunk_steps(), [3, 3, 3, 0, 0])
        m.write_layers(16, rows[:8], step=4)  # exactly chunk 2
        core[16:24] = rows[:8]
        np.testing.assert_array_equal(m.chunk_steps(), [3, 3, 4, 0, 0])
        m.write_layers(36, rows[:1].astype(np.float64), step=5)  # last layer, short last chunk; cast
        core[36] = rows[0]
        np.testing.assert_array_equal(m.chunk_steps(), [3, 3, 4, 0, 5])
        m.write_layers(10, rows[:0], step=9)  # empty: nothing marked
        np.testing.assert_array_equal(m.chunk_steps(), [3, 3, 4, 0, 5])
        np.testing.assert_array_equal(m.read_core(), core)
        with pytest.raises(ConfigError):
            m.write_layers(30, rows[:8], step=6)  # runs past the end
        with pytest.raises(ConfigError):
            m.write_layers(0, rows[:, :11], step=6)
        with pytest.raises(ConfigError):
            m.write_layers(0, rows[:1], step=-1)
        np.testing.assert_array_equal(m.chunk_steps(), [3, 3, 4, 0, 5])
    with ModelFile.open(path) as m:
        np.testing.assert_array_equal(m.read_core(), core)
        np.testing.assert_array_equal(m.chunk_steps(), [3, 3, 4, 0, 5])


def test_write_layers_marks_chunk_step_before_the_rows(tmp_path, monkeypatch):
    """An interrupted write shows up as a torn step, never as stale chunk_step on new data."""

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    with make(tmp_path / "m.h5") as m:
        before = m.read_core()
        monkeypatch.setattr(h5io, "write_block", interrupted)
        with pytest.raises(KeyboardInterrupt):
            m.write_layers(8, np.ones((8, 12), np.float32), step=2)
    with ModelFile.open(tmp_path / "m.h5") as m:
        np.testing.assert_array_equal(m.chunk_steps(), [0, 2, 0, 0, 0])
        np.testing.assert_array_equal(m.read_core(), before)


def test_write_layers_does_not_change_metadata(tmp_path):
    """The per-step path only writes raw data: the file does not grow and no attribute changes."""
    path = tmp_path / "m.h5"
    with make(path) as m:
        m.write_layers(0, m.read_core(), step=1)
        m.flush()
        size = os.path.getsize(path)
        updated = m.updated
        for step in range(2, 50):
            m.write_layers(3, np.full((20, 12), step, np.float32), step=step)
        m.flush()
        assert os.path.getsize(path) == size
        assert m.updated == updated and m.step == 0


def test_read_core_write_core(tmp_path):
    path = tmp_path / "m.h5"
    new = np.random.default_rng(1).standard_normal((37, 12)).astype(np.float32)
    with make(path) as m:
        m.write_core(new, step=11)
        np.testing.assert_array_equal(m.chunk_steps(), [11] * 5)
        with pytest.raises(ConfigError) as e:
            m.write_core(new[:36], step=12)
        check_message(e, "(36, 12)", "(37, 12)")
    with ModelFile.open(path) as m:
        np.testing.assert_array_equal(m.read_core(), new)


def test_write_core_in_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(h5io, "WRITE_BLOCK_BYTES", 1)
    new = np.arange(37 * 12, dtype=np.float32).reshape(37, 12)
    with make(tmp_path / "m.h5") as m:
        m.write_core(new, step=1)
        np.testing.assert_array_equal(m.read_core(), new)


# ----------------------------------------------------------------------------------------------
# heads, log, step, rng state


def test_heads_round_trip(tmp_path):
    path = tmp_path / "m.h5"
    rng = np.random.default_rng(2)
    heads = {
        "input_weight": rng.standard_normal((5, 3)).astype(np.float32),
        "input_bias": rng.standard_normal(3).astype(np.float32),
        "output_weight": rng.standard_normal((3, 4)).astype(np.float32),
        "output_bias": rng.standard_normal(4).astype(np.float32),
    }
    with make(path) as m:
        m.write_heads(heads)
        got = m.read_heads()
        got["input_weight"][...] = 0  # a copy: does not write through
    with ModelFile.open(path) as m:
        got = m.read_heads()
    assert set(got) == set(heads)
    for key in heads:
        np.testing.assert_array_equal(got[key], heads[key])


@pytest.mark.parametrize(
    "change,fragment",
    [
        (dict(input_weight=np.zeros((3, 5), np.float32)), "head input_weight has shape (3, 5)"),
        (dict(output_bias=np.zeros(5, np.float32)), "head output_bias has shape (5,)"),
        (dict(output_weight=np.zeros((3, 4), np.float64)), "head output_weight has dtype float64"),
        (dict(input_bias=[0.0, 0.0, 0.0]), "head input_bias must be a numpy array"),
        (dict(input_bias=None), "missing input_bias"),
        (dict(extra=np.zeros(1, np.float32)), "unknown extra"),
    ],
)
def test_write_heads_validates(tmp_path, change, fragment):
    with make(tmp_path / "m.h5") as m:
        heads = m.read_heads()
        heads.update(change)
        heads = {k: v for k, v in heads.items() if v is not None}
        with pytest.raises(ConfigError) as e:
            m.write_heads(heads)
        check_message(e, fragment)


def test_log_append_read(tmp_path):
    path = tmp_path / "m.h5"
    with make(path) as m:
        m.append_log(1, 2.3, 0.1, 0.5)
        m.append_log([2, 3], [2.2, 2.1], np.array([0.2, 0.3]), [0.4, 0.45])
        m.append_log([], [], [], [])
        with pytest.raises(ConfigError):
            m.append_log([4, 5], [1.0], [0.1, 0.2], [0.1, 0.2])
        with pytest.raises(ConfigError):
            m.append_log(4.5, 1.0, 0.1, 0.2)
    with ModelFile.open(path) as m:
        log = m.read_log()
        assert log.dtype.names == ("step", "loss", "batch_acc", "seconds")
        np.testing.assert_array_equal(log["step"], [1, 2, 3])
        np.testing.assert_array_equal(log["loss"], [2.3, 2.2, 2.1])
        np.testing.assert_array_equal(log["batch_acc"], [0.1, 0.2, 0.3])
        np.testing.assert_array_equal(log["seconds"], [0.5, 0.4, 0.45])
        assert m.log_rows == 3
        s = m.summary()
        assert s["log_rows"] == 3
        assert s["last_log"] == {"step": 3, "loss": 2.1, "batch_acc": 0.3, "seconds": 0.45}


def test_log_grows_past_one_chunk(tmp_path):
    with make(tmp_path / "m.h5") as m:
        n = hdf5.LOG_CHUNK_ROWS + 10
        m.append_log(np.arange(n), np.zeros(n), np.zeros(n), np.zeros(n))
        m.append_log(n, 0.0, 0.0, 0.0)
        np.testing.assert_array_equal(m.read_log()["step"], np.arange(n + 1))


def test_step_and_rng_state(tmp_path):
    path = tmp_path / "m.h5"
    rng = np.random.default_rng(123)
    rng.random(5)
    with make(path) as m:
        created = m.created
        m.step = 42
        m.rng_state = rng.bit_generator.state
        assert parse_utc(m.updated) >= parse_utc(created)
        with pytest.raises(ConfigError):
            m.step = -1
        with pytest.raises(ConfigError):
            m.rng_state = "not a dict"
        with pytest.raises(ConfigError):
            m.rng_state = {"x": object()}
    expected = rng.random(3)
    with ModelFile.open(path) as m:
        assert m.step == 42
        restored = np.random.default_rng()
        restored.bit_generator.state = m.rng_state
        np.testing.assert_array_equal(restored.random(3), expected)
        assert m.created == created
    with ModelFile.open(path, "r+") as m:
        m.rng_state = None
        assert m.rng_state is None


def test_repeated_attribute_updates_do_not_grow_the_file(tmp_path):
    path = tmp_path / "m.h5"
    rng = np.random.default_rng(0)
    make(path).close()
    with ModelFile.open(path, "r+") as m:
        m.step = 1
        m.rng_state = rng.bit_generator.state
    size = os.path.getsize(path)
    with ModelFile.open(path, "r+") as m:
        for step in range(2, 1002):
            rng.random()
            m.step = step
            m.rng_state = rng.bit_generator.state
    assert os.path.getsize(path) == size


def test_read_only_mode_refuses_writes(tmp_path):
    make(tmp_path / "m.h5").close()
    with ModelFile.open(tmp_path / "m.h5") as m:
        for write in (
            lambda: m.write_layers(0, np.zeros((1, 12), np.float32), step=1),
            lambda: m.write_core(np.zeros((37, 12), np.float32), step=1),
            lambda: m.write_heads(m.read_heads()),
            lambda: m.append_log(1, 1.0, 1.0, 1.0),
            lambda: setattr(m, "step", 3),
            lambda: setattr(m, "rng_state", None),
        ):
            with pytest.raises(ModelFileError) as e:
                write()
            check_message(e, "m.h5", "read-only")


def test_close(tmp_path):
    m = make(tmp_path / "m.h5")
    m.flush(sync=True)
    m.close()
    m.close()  # idempotent
    assert m.closed
    with pytest.raises(ModelFileError) as e:
        m.read_layers(0, 1)
    check_message(e, "m.h5", "closed")
    assert m.layers == 37  # plain metadata stays available


# ----------------------------------------------------------------------------------------------
# refusing files that are not (complete, matching) deepnet models


def _edit(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)


def _replace_dataset(name, data):
    def fn(f):
        del f[name]
        f.create_dataset(name, data=data)

    return fn


def test_open_missing_file(tmp_path):
    with pytest.raises(ModelFileError) as e:
        ModelFile.open(tmp_path / "nope.h5")
    assert check_message(e) == f"no model file at {tmp_path / 'nope.h5'}"


def test_open_directory(tmp_path):
    with pytest.raises(ModelFileError) as e:
        ModelFile.open(tmp_path)
    check_message(e, str(tmp_path), "directory")


def test_open_without_permission(tmp_path, monkeypatch):
    make(tmp_path / "m.h5").close()
    monkeypatch.setattr(os, "access", lambda p, mode: False)
    with pytest.raises(ModelFileError) as e:
        ModelFile.open(tmp_path / "m.h5", "r+")
    assert check_message(e) == f"could not open {tmp_path / 'm.h5'} in mode 'r+': Permission denied"


@pytest.mark.skipif(
    os.environ.get("HDF5_USE_FILE_LOCKING", "").upper() == "FALSE", reason="HDF5 file locking is disabled"
)
def test_open_locked_by_another_process(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "m.h5"
    make(path).close()
    code = (
        "import sys\n"
        "from deepnet.formats.hdf5 import ModelFile\n"
        "from deepnet.errors import ModelFileError\n"
        "try:\n"
        "    ModelFile.open(sys.argv[1], 'r')\n"
        "except ModelFileError as e:\n"
        "    print(e)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    with ModelFile.open(path, "r+"):
        out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip() == f"could not open {path} in mode 'r': it is locked by another process (a training run?)"


def test_open_non_hdf5_file(tmp_path):
    path = tmp_path / "m.h5"
    path.write_bytes(b"this is not HDF5\n" * 10)
    with pytest.raises(ModelFileError) as e:
        ModelFile.open(path)
    assert check_message(e) == f"{path} is not a deepnet model file (not an HDF5 file)"
    path.write_bytes(b"")
    with pytest.raises(ModelFileError) as e:
        ModelFile.open(path)
    check_message(e, "not a deepnet model file")


def test_open_hdf5_without_attrs(tmp_path):
    path = tmp_path / "m.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(ModelFileError) as e:
        ModelFile.open(path)
    assert check_message(e) == f"{path} is not a deepnet model file (no 'format' attribute)"


def test_open_other_format(tmp_path):
    path = tmp_path / "m.h5"
    make(path).close()
    _edit(path, lambda f: f.attrs.__setitem__("format", "keras"))
    with pytest.raises(ModelFileError) as e:
        ModelFile.open(path)
    check_message(e, str(path), "not a deepnet model file", "keras")


def test_open_other_format_version(tmp_path):
    path = tmp_path / "m.h5"
    make(path).close()
    _edit(path, lambda f: f.attrs.__setitem__("format_version", np.int64(2)))
    with pytest.raises(ModelFileError) as e:
        ModelFile.open(path)
    assert check_message(e) == f"{path} has format_version 2 but this deepnet reads format_version 1"


def test_open_missing_attribute(tmp_path):
    path = tmp_path / "m.h5"
    make(path).close()
    _edit(path, lambda f: f.attrs.__delitem__("alpha"))
    with pytest.raises(ModelFileError) as e:
        ModelFile.open(path)
    check_message(e, str(path), "missing", "alpha")


@pytest.mark.parametrize(
    "attr,value,fragment",
    [
        ("width", np.int64(0), "width is 0, must be >= 1"),
        ("layers", 2.5, "layers is 2.5, not an integer"),
        ("alpha", np.float64(-1), "alpha is -1.0, must be > 0"),
        ("activation", "", "activation is empty"),
        ("kind", "conv", "kind 'conv'"),
    ],
)
def test_open_bad_attribute(tmp_path, attr, value, fragment):
    path = tmp_path / "m.h5"
    make(path).close()
    _edit(path, lambda f: f.attrs.__setitem__(attr, value))
    with pytest.raises(ModelFileError) as e:
        ModelFile.open(path)
    check_message(e, str(path), fragment)


@pytest.mark.parametrize(
    "name", ["core/weights", "core/chunk_step", "head/input/weight", "head/output/bias", "train/log"]
)
def test_open_missing_dataset(tmp_path, name):
    path = tmp_path / "m.h5"
    make(path).close()
    _edit(path, lambda f: f.__delitem__(name))
    with pytest.raises(ModelFileError) as e:
        ModelFile.open(path)
    assert check_message(e) == f"{path} is missing the dataset /{name}"


@pytest.mark.parametrize(
    "name,data,fragments",
    [
        ("core/weights", np.zeros((36, 12), np.float32), ["/core/weights", "(36, 12)", "layers=37, width=3", "(37, 12)"]),
        ("core/chunk_step", np.zeros(4, np.int64), ["/core/chunk_step", "(4,)", "(5,)"]),
        ("head/input/weight", np.zeros((5, 4), np.float32), ["/head/input/weight", "(5, 4)", "(5, 3)"]),
        ("head/output/bias", np.zeros(10, np.float32), ["/head/output/bias", "(10,)", "(4,)"]),
        ("head/output/weight", np.zeros((3, 4), np.float64), ["/head/output/weight", "dtype float64", "float32"]),
        ("core/chunk_step", np.zeros(5, np.float64), ["/core/chunk_step", "dtype float64", "int64"]),
        ("train/log", np.zeros(3, np.float64), ["/train/log", "dtype float64"]),
        ("train/log", np.zeros(3, hdf5.LOG_DTYPE), ["/train/log", "resizable"]),
    ],
)
def test_open_misshaped_dataset(tmp_path, name, data, fragments):
    path = tmp_path / "m.h5"
    make(path).close()
    _edit(path, _replace_dataset(name, data))
    with pytest.raises(ModelFileError) as e:
        ModelFile.open(path)
    check_message(e, str(path), *fragments)


def test_open_unchunked_weights(tmp_path):
    path = tmp_path / "m.h5"
    make(path).close()
    _edit(path, _replace_dataset("core/weights", np.zeros((37, 12), np.float32)))  # contiguous
    with pytest.raises(ModelFileError) as e:
        ModelFile.open(path)
    check_message(e, str(path), "/core/weights", "chunked")


def test_open_corrupt_rng_state(tmp_path):
    # A file without a commit record (written before it existed) is read from its attributes.
    path = tmp_path / "m.h5"
    make(path).close()
    _edit(path, lambda f: (f.attrs.__setitem__("rng_state", "{not json"), f.__delitem__("train/commit")))
    with ModelFile.open(path) as m, pytest.raises(ModelFileError) as e:
        m.rng_state
    check_message(e, str(path), "rng_state", "not valid JSON")


def test_commit_record_is_authoritative_over_the_attributes(tmp_path):
    # The root attributes only mirror the commit record (at report boundaries).
    path = tmp_path / "m.h5"
    make(path).close()
    with ModelFile.open(path, "r+") as m:
        m.rng_state = {"bit_generator": "PCG64", "state": {"state": 5, "inc": 7}, "has_uint32": 0, "uinteger": 0}
    _edit(path, lambda f: f.attrs.__setitem__("rng_state", "{not json"))
    with ModelFile.open(path) as m:
        assert m.rng_state["state"] == {"state": 5, "inc": 7}


@pytest.mark.parametrize(
    "expect,message",
    [
        (dict(width=8), "has width 3 but --width 8 was given"),
        (dict(layers=100), "has layers 37 but --layers 100 was given"),
        (dict(activation="relu"), "has activation tanh but --activation relu was given"),
        (dict(input_dim=784), "has input_dim 5 but --input-dim 784 was given"),
        (dict(n_classes=10), "has n_classes 4 but --n-classes 10 was given"),
        (dict(width=3, layers=36), "has layers 37 but --layers 36 was given"),
    ],
)
def test_open_expect_mismatch(tmp_path, expect, message):
    path = tmp_path / "model.h5"
    make(path).close()
    with pytest.raises(ModelFileError) as e:
        ModelFile.open(path, expect=expect)
    assert check_message(e) == f"{path} {message}"


def test_open_expect_match(tmp_path):
    path = tmp_path / "m.h5"
    make(path).close()
    expect = dict(width=3, layers=np.int64(37), activation="tanh", input_dim=5, n_classes=4)
    with ModelFile.open(path, "r+", expect=expect) as m:
        assert m.width == 3
    with ModelFile.open(path, expect=dict(width=None, layers=None)):
        pass  # None: the flag was not given
    with pytest.raises(ConfigError) as e:
        ModelFile.open(path, expect=dict(depth=3))
    check_message(e, "depth")


def test_open_bad_mode(tmp_path):
    make(tmp_path / "m.h5").close()
    for mode in ("w", "a", "x"):
        with pytest.raises(ConfigError) as e:
            ModelFile.open(tmp_path / "m.h5", mode)
        check_message(e, repr(mode))


def test_create_returns_file_that_opens_cleanly(tmp_path):
    # Everything create() writes passes open()'s validation, for a range of shapes.
    for i, (layers, width, chunk) in enumerate([(1, 1, None), (2, 2, 1), (100, 2, 7), (64, 8, 64)]):
        make(tmp_path / f"{i}.h5", layers=layers, width=width, storage_chunk_layers=chunk).close()
        with ModelFile.open(tmp_path / f"{i}.h5") as m:
            assert m.layers == layers and m.width == width
            assert m.chunk_steps().shape == (math.ceil(layers / m.storage_chunk_layers),)


# ----------------------------------------------------------------------------------------------
# files written without this package's code open unchanged


def _write_by_hand(path, *, with_commit: bool):
    """A dense model written with h5py and the layout's literal names and values only (as the code before
    the formats split wrote it, and as another tool would), never with deepnet.formats."""
    layers, width, chunk = 10, 2, 4
    rng = np.random.default_rng(5)
    core = rng.uniform(-1, 1, (layers, width * width + width)).astype(np.float32)
    heads = {"head/input/weight": rng.standard_normal((3, width)).astype(np.float32),
             "head/input/bias": np.zeros(width, np.float32),
             "head/output/weight": rng.standard_normal((width, 2)).astype(np.float32),
             "head/output/bias": np.ones(2, np.float32)}
    log = np.array([(1, 0.5, 0.25, 0.125), (2, 0.25, 0.5, 0.125)],
                   dtype=[("step", "<i8"), ("loss", "<f8"), ("batch_acc", "<f8"), ("seconds", "<f8")])
    with h5py.File(path, "w") as f:
        for name, value in (("format", "deepnet"), ("format_version", np.int64(1)), ("kind", "dense"),
                            ("width", np.int64(width)), ("layers", np.int64(layers)), ("activation", "tanh"),
                            ("alpha", np.float64(0.5)), ("input_dim", np.int64(3)), ("n_classes", np.int64(2)),
                            ("step", np.int64(2)), ("seed", np.int64(9)), ("rng_state", '{"n": 1}'),
                            ("created", "2025-01-01T00:00:00+00:00"), ("updated", "2025-01-02T00:00:00+00:00"),
                            ("init_scale", np.float64(0.001))):
            f.attrs[name] = value
        f.create_dataset("core/weights", data=core, chunks=(chunk, width * width + width))
        f.create_dataset("core/chunk_step", data=np.array([2, 1, 0], "<i8"))
        for name, value in heads.items():
            f.create_dataset(name, data=value)
        f.create_dataset("train/log", data=log, maxshape=(None,), chunks=(4096,))
        if with_commit:
            f.create_dataset("train/commit", data=np.zeros((2, 32768), np.uint8))
    return core, heads, log


def test_a_file_written_with_the_literal_layout_opens_and_trains_on(tmp_path):
    path = tmp_path / "old.h5"
    core, heads, log = _write_by_hand(path, with_commit=False)
    with ModelFile.open(path) as m:
        assert (m.layers, m.width, m.activation, m.alpha, m.seed) == (10, 2, "tanh", 0.5, 9)
        assert (m.step, m.rng_state, m.storage_chunk_layers) == (2, {"n": 1}, 4)
        np.testing.assert_array_equal(m.read_core(), core)
        got = m.read_heads()
        for key, name in (("input_weight", "head/input/weight"), ("output_bias", "head/output/bias")):
            np.testing.assert_array_equal(got[key], heads[name])
        np.testing.assert_array_equal(m.read_log(), log)
        assert m.state().status == "healthy" and m.updated == "2025-01-02T00:00:00+00:00"
    with ModelFile.open(path, "r+") as m:
        m.commit(3, m.read_heads(), log=[(3, 0.1, 0.75, 0.1)])
    with ModelFile.open(path) as m:
        assert m.step == 3 and m.has_commit_record and m.read_log()["step"].tolist() == [1, 2, 3]


def test_a_commit_dataset_with_no_record_is_damaged_not_the_old_layout(tmp_path):
    """issue 18 item 8: /train/commit all zeros is not "written before the record existed": the file
    is refused as damaged (an edit there must not drop the heads' checksum)."""
    from deepnet.errors import DamagedFileError

    path = tmp_path / "old.h5"
    _write_by_hand(path, with_commit=True)
    with pytest.raises(DamagedFileError, match="commit record is damaged .*both are all zeros"):
        ModelFile.open(path)


def test_the_layout_names_are_the_files_names():
    """The names are the file format: changing one would orphan every file written before."""
    from deepnet.formats import layout

    assert (layout.CORE_WEIGHTS, layout.CORE_CHUNK_STEP) == ("core/weights", "core/chunk_step")
    assert layout.HEAD_PATHS == {"input_weight": "head/input/weight", "input_bias": "head/input/bias",
                                 "output_weight": "head/output/weight", "output_bias": "head/output/bias"}
    assert (layout.TRAIN_LOG, layout.TRAIN_COMMIT, layout.TRAIN_HELDOUT) == ("train/log", "train/commit",
                                                                            "train/heldout")
    assert layout.mlp_paths(layout.MLP_GROUP)["w1"] == "mlp/w1"
    assert layout.mlp_paths(layout.BRANCH_GROUP)["b2"] == "branch/mlp/b2"
    assert (layout.EMA_CORE, layout.EMA_HEAD_PATHS["input_bias"]) == ("ema/core/weights", "ema/head/input/bias")
    assert (layout.FORMAT, layout.FORMAT_VERSION, layout.KIND_DENSE, layout.KIND_MLP) == ("deepnet", 1, "dense", "mlp")


def test_files_are_opened_without_chunk_cache_or_sieve_buffer(tmp_path):
    """The crash-safety argument needs HDF5's sieve buffer off (formats/h5io.py)."""
    with make(tmp_path / "m.h5") as m:
        fapl = m.h5.id.get_access_plist()
        assert fapl.get_sieve_buf_size() == 0 and fapl.get_cache()[2] == 0


def test_an_mlp_file_written_with_the_literal_layout_opens(tmp_path):
    from deepnet.formats.mlp_file import model_kind, read_mlp_file

    path = tmp_path / "mlp.h5"
    rng = np.random.default_rng(2)
    params = {"w1": rng.standard_normal((5, 3)), "b1": np.zeros(3), "w2": rng.standard_normal((3, 2)), "b2": np.ones(2)}
    with h5py.File(path, "w") as f:
        for name, value in (("format", "deepnet"), ("format_version", np.int64(1)), ("kind", "mlp"),
                            ("hidden", np.int64(3)), ("input_dim", np.int64(5)), ("n_classes", np.int64(2)),
                            ("step", np.int64(4)), ("seed", np.int64(1)), ("rng_state", ""),
                            ("init", "he-uniform/xavier-uniform"), ("created", "2025-01-01T00:00:00+00:00"),
                            ("updated", "2025-01-01T00:00:00+00:00")):
            f.attrs[name] = value
        for name, value in params.items():
            f.create_dataset(f"mlp/{name}", data=value.astype(np.float32))
        f.create_dataset("train/log", data=np.zeros(1, hdf5.LOG_DTYPE), maxshape=(None,), chunks=(4096,))
    assert model_kind(path) == "mlp"
    contents = read_mlp_file(path)
    assert (contents.step, contents.seed, contents.rng_state, contents.log.shape) == (4, 1, None, (1,))
    for name, value in params.items():
        np.testing.assert_array_equal(contents.params[name], value.astype(np.float32))
