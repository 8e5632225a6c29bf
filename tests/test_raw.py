"""The original's raw float32 files (deepnet.formats.raw, `deepnet import-raw` / `export-raw`):
byte-identical round trips, streaming in blocks, sizes checked first, nothing half-written left behind."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import deepnet
from deepnet.cli import main
from deepnet.errors import ConfigError, DeepnetError, ModelFileError
from deepnet.formats import raw
from deepnet.formats.hdf5 import ModelFile
from deepnet.formats.raw import dense_head_bytes, dense_weights_bytes, export_raw, import_raw, mlp_head_bytes
from deepnet.nn.mlp import MLP
from helpers import make_model, read_weights


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def _random_raw(directory: Path, layers: int, width: int, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    w = directory / "W.bin"
    h = directory / "H.bin"
    rng.standard_normal(layers * (width * width + width)).astype("<f4").tofile(w)
    rng.standard_normal(dense_head_bytes(width) // 4).astype("<f4").tofile(h)
    return w, h


@pytest.fixture
def small_blocks(monkeypatch):
    """Stream in blocks of one storage chunk, so several blocks (and a short last one) are exercised."""
    monkeypatch.setattr(raw, "BLOCK_BYTES", 1)


def test_sizes():
    assert dense_weights_bytes(10_000_000, 4) == 800_000_000
    assert dense_head_bytes(4) == (784 * 4 + 4 + 40 + 10) * 4
    assert mlp_head_bytes(128) == (784 * 128 + 128 + 1280 + 10) * 4


def test_dense_raw_files_round_trip_byte_identical(tmp_path, small_blocks):
    layers, width = 1003, 3
    w, h = _random_raw(tmp_path, layers, width)
    info = import_raw(tmp_path / "m.h5", weights=w, head=h, layers=layers, width=width, activation="tanh",
                      progress=False, storage_chunk_layers=100)
    assert info["alpha"] == pytest.approx(1 / np.sqrt(layers))
    with ModelFile.open(tmp_path / "m.h5") as f:
        assert (f.layers, f.width, f.activation, f.step) == (layers, width, "tanh", 0)
        assert f.storage_chunk_layers == 100  # 11 blocks, the last one short
        core = f.read_core()
        heads = f.read_heads()
        assert not f.chunk_steps().any()
    assert np.array_equal(core.reshape(-1), np.fromfile(w, "<f4"))
    flat = np.fromfile(h, "<f4")
    assert np.array_equal(heads["input_weight"].reshape(-1), flat[:784 * width])
    assert np.array_equal(heads["output_bias"], flat[-10:])
    export_raw(tmp_path / "m.h5", weights=tmp_path / "W2.bin", head=tmp_path / "H2.bin", progress=False)
    assert (tmp_path / "W2.bin").read_bytes() == w.read_bytes()
    assert (tmp_path / "H2.bin").read_bytes() == h.read_bytes()
    assert sorted(os.listdir(tmp_path)) == ["H.bin", "H2.bin", "W.bin", "W2.bin", "m.h5"]


def test_alpha_and_seed_are_kept(tmp_path):
    w, h = _random_raw(tmp_path, 5, 2)
    import_raw(tmp_path / "m.h5", weights=w, head=h, layers=5, width=2, activation="tanh", alpha=0.25, seed=7,
               progress=False)
    with ModelFile.open(tmp_path / "m.h5") as f:
        assert f.alpha == 0.25 and f.seed == 7


def test_trained_dense_model_survives_export_and_import(tmp_path, mnist_dir, small_blocks):
    model = make_model(tmp_path / "a.h5", layers=40, width=4, activation="softsign", seed=3)
    deepnet.train(model, steps=3, batch=8, train_limit=500, test_samples=0, report_every=3,
                  progress=False)
    export_raw(model, weights=tmp_path / "W.bin", head=tmp_path / "H.bin", progress=False)
    with ModelFile.open(model) as f:
        alpha = f.alpha
    import_raw(tmp_path / "b.h5", weights=tmp_path / "W.bin", head=tmp_path / "H.bin", layers=40, width=4,
               activation="softsign", alpha=alpha, progress=False)
    (ha, ca), (hb, cb) = read_weights(model), read_weights(tmp_path / "b.h5")
    assert np.array_equal(ca, cb) and all(np.array_equal(ha[k], hb[k]) for k in ha)
    ea = deepnet.evaluate(model, test_samples=300, progress=False)
    eb = deepnet.evaluate(tmp_path / "b.h5", test_samples=300, progress=False)
    assert (ea["loss"], ea["accuracy"]) == (eb["loss"], eb["accuracy"])


def test_trained_mlp_survives_export_and_import(tmp_path, mnist_dir):
    from deepnet.training.mlp import evaluate_mlp, train_mlp

    train_mlp(tmp_path / "a.h5", hidden=24, steps=40, batch=32, train_limit=1000, test_samples=0,
              progress=False)
    export_raw(tmp_path / "a.h5", head=tmp_path / "mlp.bin")
    assert os.path.getsize(tmp_path / "mlp.bin") == mlp_head_bytes(24)
    import_raw(tmp_path / "b.h5", kind="mlp", hidden=24, head=tmp_path / "mlp.bin")
    a, b = MLP.load(tmp_path / "a.h5"), MLP.load(tmp_path / "b.h5")
    assert all(np.array_equal(a.params()[k], b.params()[k]) for k in ("w1", "b1", "w2", "b2"))
    assert b.step == 0
    ea = evaluate_mlp(tmp_path / "a.h5", samples=500)
    eb = evaluate_mlp(tmp_path / "b.h5", samples=500)
    assert (ea["loss"], ea["accuracy"]) == (eb["loss"], eb["accuracy"])
    export_raw(tmp_path / "b.h5", head=tmp_path / "mlp2.bin")
    assert (tmp_path / "mlp2.bin").read_bytes() == (tmp_path / "mlp.bin").read_bytes()


# ----------------------------------------------------------------------------------------------
# refusals: one line, nothing written


def test_size_mismatch_names_both_sizes_and_writes_nothing(tmp_path):
    w, h = _random_raw(tmp_path, 10, 4)
    before = _snapshot(tmp_path)
    with pytest.raises(ModelFileError) as exc:
        import_raw(tmp_path / "m.h5", weights=w, head=h, layers=11, width=4, activation="tanh", progress=False)
    msg = str(exc.value)
    assert "800 bytes" in msg and "880 bytes" in msg and "--layers 11 --width 4" in msg
    assert "fits --layers 10 at width 4" in msg and "\n" not in msg
    with pytest.raises(ModelFileError) as exc:
        import_raw(tmp_path / "m.h5", weights=w, head=h, layers=5, width=8, activation="tanh", progress=False)
    assert "800 bytes" in str(exc.value) and f"{dense_weights_bytes(5, 8):,} bytes" in str(exc.value)
    with pytest.raises(ModelFileError) as exc:  # the core fits 100 layers of width 1, but the head is width 4's
        import_raw(tmp_path / "m.h5", weights=w, head=h, layers=100, width=1, activation="tanh", progress=False)
    msg = str(exc.value)
    assert f"{dense_head_bytes(4):,} bytes" in msg and f"{dense_head_bytes(1):,} bytes" in msg
    assert "fits --width 4" in msg
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(layers=None), ConfigError, "--layers is required"),
    (dict(width=0), ConfigError, "--width"),
    (dict(activation=None), ConfigError, "--activation is required"),
    (dict(activation="nope"), DeepnetError, "nope"),
    (dict(alpha=-1.0), ConfigError, "--alpha"),
    (dict(weights="missing.bin"), ModelFileError, "does not exist"),
    (dict(kind="conv"), ConfigError, "--kind"),
    (dict(hidden=5), ConfigError, "--hidden applies to --kind mlp"),
    (dict(model="W.bin"), ConfigError, "same file"),
    (dict(model="nodir/m.h5"), ModelFileError, "does not exist"),
])
def test_bad_import_arguments(tmp_path, monkeypatch, kwargs, error, match):
    monkeypatch.chdir(tmp_path)
    _random_raw(tmp_path, 10, 4)
    args = dict(model="m.h5", weights="W.bin", head="H.bin", layers=10, width=4, activation="tanh", progress=False)
    args.update(kwargs)
    before = _snapshot(tmp_path)
    with pytest.raises(error, match=match):
        import_raw(args.pop("model"), **args)
    assert _snapshot(tmp_path) == before


def test_existing_outputs_need_overwrite(tmp_path):
    w, h = _random_raw(tmp_path, 10, 4)
    (tmp_path / "m.h5").write_bytes(b"keep")
    with pytest.raises(ModelFileError, match="already exists"):
        import_raw(tmp_path / "m.h5", weights=w, head=h, layers=10, width=4, activation="tanh", progress=False)
    assert (tmp_path / "m.h5").read_bytes() == b"keep"
    import_raw(tmp_path / "m.h5", weights=w, head=h, layers=10, width=4, activation="tanh", overwrite=True,
               progress=False)
    with pytest.raises(ModelFileError, match="already exists"):
        export_raw(tmp_path / "m.h5", weights=w, head=tmp_path / "new.bin", progress=False)
    assert not (tmp_path / "new.bin").exists()


def test_non_finite_values_are_refused(tmp_path, small_blocks):
    w, h = _random_raw(tmp_path, 1000, 3)
    data = np.fromfile(w, "<f4")
    data[777 * 12 + 5] = np.nan
    data.tofile(w)
    with pytest.raises(ModelFileError, match="non-finite value .* layer 777"):
        import_raw(tmp_path / "m.h5", weights=w, head=h, layers=1000, width=3, activation="tanh", progress=False,
                   storage_chunk_layers=100)
    assert sorted(os.listdir(tmp_path)) == ["H.bin", "W.bin"]


def test_a_failure_midway_leaves_no_file(tmp_path, monkeypatch, small_blocks):
    w, h = _random_raw(tmp_path, 1000, 3)
    calls = []

    def failing(self, start, rows, step):
        calls.append(start)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return original(self, start, rows, step)

    original = ModelFile.write_layers
    monkeypatch.setattr(ModelFile, "write_layers", failing)
    with pytest.raises(ModelFileError, match="No space left on device"):
        import_raw(tmp_path / "m.h5", weights=w, head=h, layers=1000, width=3, activation="tanh", progress=False,
                   storage_chunk_layers=100)
    assert sorted(os.listdir(tmp_path)) == ["H.bin", "W.bin"]


def test_mlp_refusals(tmp_path):
    MLP.new(8).save(tmp_path / "m.h5")
    with pytest.raises(ConfigError, match="no core weights"):
        export_raw(tmp_path / "m.h5", weights=tmp_path / "W.bin", head=tmp_path / "H.bin")
    deepnet.init(tmp_path / "d.h5", layers=4, width=2, activation="tanh", progress=False)
    with pytest.raises(ConfigError, match="--weights is required"):
        export_raw(tmp_path / "d.h5", head=tmp_path / "H.bin")
    export_raw(tmp_path / "m.h5", head=tmp_path / "H.bin")
    with pytest.raises(ModelFileError) as exc:
        import_raw(tmp_path / "n.h5", kind="mlp", hidden=9, head=tmp_path / "H.bin")
    assert f"{mlp_head_bytes(8):,} bytes" in str(exc.value) and f"{mlp_head_bytes(9):,} bytes" in str(exc.value)
    assert "fits --hidden 8" in str(exc.value)
    with pytest.raises(ConfigError, match="--weights apply to --kind dense only"):
        import_raw(tmp_path / "n.h5", kind="mlp", hidden=8, head=tmp_path / "H.bin", weights=tmp_path / "H.bin")
    assert not (tmp_path / "n.h5").exists()


# ----------------------------------------------------------------------------------------------
# the commands


def test_cli_import_export(tmp_path, capsys):
    w, h = _random_raw(tmp_path, 30, 4)
    assert main(["import-raw", "--weights", str(w), "--head", str(h), "--layers", "30", "--width", "4",
                 "--activation", "softsign", "--model", str(tmp_path / "m.h5")]) == 0
    assert "imported" in capsys.readouterr().out
    assert main(["export-raw", "--model", str(tmp_path / "m.h5"), "--weights", str(tmp_path / "W2.bin"),
                 "--head", str(tmp_path / "H2.bin"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["event"] == "export" and result["layers"] == 30
    assert (tmp_path / "W2.bin").read_bytes() == w.read_bytes()
    before = _snapshot(tmp_path)
    assert main(["import-raw", "--weights", str(w), "--head", str(h), "--layers", "31", "--width", "4",
                 "--activation", "softsign", "--model", str(tmp_path / "n.h5")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deepnet: error: ")
    assert "2,400 bytes" in err[0] and "2,480 bytes" in err[0]
    assert _snapshot(tmp_path) == before
