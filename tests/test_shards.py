"""Sharded models (deepnet.formats.shards): the layer split, a root and its shard files, the two-phase
commit and its crash points, shard/gather round trips, and the commands on a root."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

import deepnet
from deepnet import ModelFile
from deepnet.errors import ConfigError, DamagedFileError, DeepnetError, ModelFileError
from deepnet.formats import layout
from deepnet.formats import shards as S
from helpers import have_mnist, make_model, train_tiny

W = 3


def snapshot(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def trained(path: Path, layers: int = 11) -> Path:
    """A model with a history: weights that matter, SGD steps, log rows, an evaluation, settings, generator state."""
    make_model(path, layers=layers, width=W, activation="tanh", seed=4)
    train_tiny(path, 3)
    with ModelFile.open(path, "r+") as f:
        f.record_evaluation(f.step, "test", 100, 1.5, 0.25)
        f.commit(f.step + 1, f.read_heads(), rng_state=np.random.default_rng(7).bit_generator.state,
                 log=[(f.step + 1, 2.0, 0.5, 0.01)], train={"layer_lr": 0.1, "head_lr": 0.05, "batch": 4})
    return path


def contents(path: Path) -> dict:
    """Every attribute (value and stored type) and dataset (bytes, dtype, shape, chunks, max shape,
    attributes) of an HDF5 file, and every group's attributes."""
    out: dict = {}

    def attrs(obj) -> dict:
        return {name: (np.asarray(obj.attrs[name]).tobytes(), str(obj.attrs.get_id(name).dtype)) for name in obj.attrs}

    with h5py.File(path, "r") as f:
        out["/"] = attrs(f)

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = (obj[()].tobytes(), str(obj.dtype), obj.shape, obj.chunks, obj.maxshape, attrs(obj))
            else:
                out[name] = attrs(obj)

        f.visititems(visit)
    return out


# ---------------------------------------------------------------------------------------------------
# split_layers


@pytest.mark.parametrize("layers", [1, 2, 7, 10, 64, 1001])
@pytest.mark.parametrize("ranks", [1, 2, 3, 7, 64])
def test_split_layers_is_contiguous_balanced_and_front_loaded(layers, ranks):
    if ranks > layers:
        with pytest.raises(ConfigError, match="must not exceed layers"):
            S.split_layers(layers, ranks)
        return
    ranges = S.split_layers(layers, ranks)
    assert len(ranges) == ranks
    assert ranges[0][0] == 0
    for (a, n), (b, _) in zip(ranges, ranges[1:]):
        assert b == a + n
    counts = [n for _, n in ranges]
    assert sum(counts) == layers and min(counts) >= 1 and max(counts) - min(counts) <= 1
    assert counts == sorted(counts, reverse=True)


@pytest.mark.parametrize("layers, ranks", [(5, 0), (5, -1), (5, 1.5), (5, True), (0, 1), (3, 4)])
def test_split_layers_refuses_in_one_line(layers, ranks):
    with pytest.raises(ConfigError) as err:
        S.split_layers(layers, ranks)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------------------------
# creation, sharding and gathering


@pytest.mark.parametrize("ranks", [1, 3])
def test_create_sharded_draws_exactly_what_create_draws(tmp_path, ranks):
    S.create_sharded(tmp_path / "r.h5", ranks, layers=8, width=W, activation="tanh", seed=9)
    ModelFile.create(tmp_path / "one.h5", layers=8, width=W, activation="tanh", seed=9, progress=False).close()
    with S.open_root(tmp_path / "r.h5") as root, ModelFile.open(tmp_path / "one.h5") as one:
        assert len(root.shards) == ranks
        assert np.array_equal(root.file.read_core(), one.read_core())
        assert np.concatenate([root.read_core(s.index) for s in root.shards]).tobytes() == one.read_core().tobytes()
        a, b = root.file.read_heads(), one.read_heads()
        assert all(np.array_equal(a[k], b[k]) for k in layout.HEAD_KEYS)
        assert (root.file.alpha, root.file.seed, root.file.step, root.file.width) == (one.alpha, one.seed, 0, W)
        assert [(s.first_layer, s.layers) for s in root.shards] == S.split_layers(8, ranks)
        assert all(s.path.is_absolute() and s.path.parent == tmp_path / "r.shards" for s in root.shards)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.h5", "r.h5", "r.shards"]  # no temporary left


def test_shard_then_gather_keeps_every_dataset_and_attribute(tmp_path):
    src = trained(tmp_path / "m.h5")
    before = snapshot(tmp_path)
    result = deepnet.shard(src, ranks=3)
    assert snapshot(tmp_path)["m.h5"] == before["m.h5"]  # the source is left as it is
    root = tmp_path / "m.sharded.h5"
    assert result["root"] == os.fspath(root) and result["ranks"] == 3 and S.is_sharded(root) and not S.is_sharded(src)
    deepnet.gather(root, out=tmp_path / "g.h5")
    a, g = contents(src), contents(tmp_path / "g.h5")
    assert a.keys() == g.keys()
    for name in a:
        assert a[name] == g[name], name
    with ModelFile.open(src) as x, ModelFile.open(root) as r:
        assert r.record == x.record and r.rng_state == x.rng_state and r.train_settings == x.train_settings
        assert r.read_log().tobytes() == x.read_log().tobytes()
        assert r.read_evaluations().tobytes() == x.read_evaluations().tobytes()
        assert r.read_core().tobytes() == x.read_core().tobytes()


def test_export_raw_of_a_root_is_byte_identical(tmp_path):
    src = trained(tmp_path / "m.h5")
    deepnet.shard(src, ranks=2, out=tmp_path / "r.h5")
    deepnet.export_raw(src, weights=tmp_path / "a.w", head=tmp_path / "a.h")
    deepnet.export_raw(tmp_path / "r.h5", weights=tmp_path / "b.w", head=tmp_path / "b.h")
    assert (tmp_path / "a.w").read_bytes() == (tmp_path / "b.w").read_bytes()
    assert (tmp_path / "a.h").read_bytes() == (tmp_path / "b.h").read_bytes()


@pytest.mark.parametrize("in_memory", [False, True])
def test_a_root_evaluates_exactly_as_its_gathered_file(tmp_path, in_memory):
    src = trained(tmp_path / "m.h5")
    deepnet.shard(src, ranks=3, out=tmp_path / "r.h5")
    rng = np.random.default_rng(1)
    x, y = rng.uniform(0, 1, (32, 784)).astype(np.float32), rng.integers(0, 10, 32)
    results = []
    for path in (src, tmp_path / "r.h5"):
        with deepnet.DeepNet.open(path, in_memory=in_memory, chunk_layers=4) as net:
            results.append(net.evaluate(x, y))
    assert results[0].loss == results[1].loss and results[0].accuracy == results[1].accuracy


@pytest.mark.skipif(not have_mnist(), reason="MNIST is not in $DEEPNET_DATA")
def test_eval_command_of_a_root_equals_the_gathered_file(tmp_path, mnist_dir):
    src = trained(tmp_path / "m.h5")
    deepnet.shard(src, ranks=2, out=tmp_path / "r.h5")
    deepnet.gather(tmp_path / "r.h5", out=tmp_path / "g.h5")
    a = deepnet.evaluate(tmp_path / "r.h5", test_samples=300)
    b = deepnet.evaluate(tmp_path / "g.h5", test_samples=300)
    assert (a["loss"], a["accuracy"]) == (b["loss"], b["accuracy"])


def test_the_pair_moves_together(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    src = trained(tmp_path / "a" / "m.h5")
    deepnet.shard(src, ranks=2, out=tmp_path / "a" / "r.h5")
    shutil.move(tmp_path / "a", tmp_path / "b")
    monkeypatch.chdir(tmp_path)  # the shards are found from the root's directory, not the working one
    with S.open_root(Path("b") / "r.h5") as root, ModelFile.open(tmp_path / "b" / "m.h5") as x:
        assert root.file.read_core().tobytes() == x.read_core().tobytes()
        assert root.read_core(1).tobytes() == x.read_layers(6, 11).tobytes()


def test_info_and_check_show_the_shards(tmp_path):
    deepnet.shard(trained(tmp_path / "m.h5"), ranks=3, out=tmp_path / "r.h5")
    info = deepnet.info(tmp_path / "r.h5")
    assert info["shards"]["count"] == 3
    assert "layers 0..3 in r.shards/r0-of-3." in info["shards"]["shard 0"]
    report = deepnet.check(tmp_path / "r.h5")
    assert report.healthy and report.summary == f"healthy: step {report.step}, 3 shards" and report.step == 4
    assert any("every core matching its CRC-32" in line for line in report.findings)


# ---------------------------------------------------------------------------------------------------
# the two-phase commit and its crash points


def _versions(root: Path, step: int, delta: float) -> tuple[list[Path], np.ndarray, dict]:
    with S.open_root(root) as model:
        core, heads, specs = model.file.read_core(), model.file.read_heads(), model.shards
    new = core + np.float32(delta)
    return [S.write_core_version(root, s.index, step, new[s.first_layer : s.first_layer + s.layers])
            for s in specs], new, heads


def _rng(step: int) -> dict:
    return np.random.default_rng(step).bit_generator.state


def _commit(root: Path, step: int, versions: list[Path], heads: dict, **kw) -> None:
    S.commit_root(root, step=step, versions=versions, heads=heads, rng_state=_rng(step),
                  train_settings={"layer_lr": 0.1}, log_rows=[(step, 1.0 / (step + 1), 0.5, 0.01)], **kw)


def test_commits_point_the_root_at_new_versions_and_keep_the_log(tmp_path):
    root = tmp_path / "r.h5"
    S.create_sharded(root, 2, layers=5, width=W, activation="tanh")
    for step in (3, 7):
        versions, core, heads = _versions(root, step, 0.5)
        heads["output_bias"] += 1
        _commit(root, step, versions, heads, evaluations=[(step, "heldout", 10, 2.0, 0.1)])
        with S.open_root(root) as model:
            assert model.step == step and model.file.rng_state == json.loads(json.dumps(_rng(step)))
            assert model.file.read_core().tobytes() == core.tobytes()
            assert np.array_equal(model.file.read_heads()["output_bias"], heads["output_bias"])
            assert model.file.state().healthy
            assert sorted(p.name for p in (tmp_path / "r.shards").iterdir()) == sorted(s.path.name for s in model.shards)
    with S.open_root(root) as model:
        assert model.file.read_log()["step"].tolist() == [3, 7]
        assert model.file.read_evaluations()["step"].tolist() == [3, 7]
        assert model.file.train_settings == {"layer_lr": 0.1}
    assert deepnet.check(root).healthy


def test_versions_without_a_commit_leave_the_old_step(tmp_path):
    root = tmp_path / "r.h5"
    S.create_sharded(root, 2, layers=5, width=W, activation="tanh")
    with S.open_root(root) as model:
        old = model.file.read_core()
    versions, _, _ = _versions(root, 4, 1.0)  # every rank wrote step 4, then rank 0 died before committing
    assert all(v.exists() for v in versions)
    with S.open_root(root) as model:
        assert model.step == 0 and model.file.read_core().tobytes() == old.tobytes()
    report = deepnet.check(root)
    assert report.healthy and any("2 stray uncommitted shard version(s)" in line for line in report.findings)
    assert sorted(S.remove_stale_versions(root)) == sorted(versions)
    assert not any(v.exists() for v in versions)


def test_a_root_write_that_fails_keeps_the_old_commit(tmp_path, monkeypatch):
    root = tmp_path / "r.h5"
    S.create_sharded(root, 2, layers=5, width=W, activation="tanh")
    versions, _, heads = _versions(root, 2, 1.0)

    def dies(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(S, "write_root", dies)
    with pytest.raises(KeyboardInterrupt):
        _commit(root, 2, versions, heads)
    monkeypatch.undo()
    with S.open_root(root) as model:
        assert model.step == 0 and all(s.path.exists() for s in model.shards)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_crash_before_the_deletion_leaves_strays_removed_next_time(tmp_path, monkeypatch):
    root = tmp_path / "r.h5"
    S.create_sharded(root, 2, layers=5, width=W, activation="tanh")
    with S.open_root(root) as model:
        old = [s.path for s in model.shards]
    versions, core, heads = _versions(root, 2, 1.0)
    monkeypatch.setattr(S, "_remove", lambda paths: [])  # committed, then killed before deleting
    _commit(root, 2, versions, heads)
    monkeypatch.undo()
    assert all(p.exists() for p in old)
    with S.open_root(root) as model:
        assert model.step == 2 and model.file.read_core().tobytes() == core.tobytes()
    assert sorted(S.remove_stale_versions(root)) == sorted(old)


def test_a_failed_version_write_leaves_nothing(tmp_path, monkeypatch):
    root = tmp_path / "r.h5"
    S.create_sharded(root, 2, layers=5, width=W, activation="tanh")
    before = snapshot(tmp_path)

    def dies(tmp, **kwargs):
        Path(tmp).write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(S, "write_shard", dies)
    with pytest.raises(KeyboardInterrupt):
        S.write_core_version(root, 0, 1, np.zeros((3, W * W + W), np.float32))
    assert snapshot(tmp_path) == before


def test_a_missing_damaged_or_foreign_shard_is_one_line(tmp_path):
    root = tmp_path / "r.h5"
    S.create_sharded(root, 3, layers=6, width=W, activation="tanh")
    with S.open_root(root) as model:
        shard = model.shards[1].path
    saved = shard.read_bytes()

    shard.unlink()
    for call in (lambda: S.open_root(root), lambda: deepnet.info(root), lambda: deepnet.gather(root, out=tmp_path / "g.h5")):
        with pytest.raises(ModelFileError, match=r"shard 1 \(r.shards/r1-of-3\.step000000000\.[0-9a-f]+\.h5\) is missing"):
            call()
    report = deepnet.check(root)
    assert report.status == "damaged" and "shard 1" in report.summary and "is missing" in report.summary
    assert not (tmp_path / "g.h5").exists()

    # A shard of another step in its place (a version renamed by hand).
    shard.write_bytes(saved)
    versions, _, heads = _versions(root, 5, 1.0)
    os.replace(versions[1], shard)
    with pytest.raises(DamagedFileError, match="holds step 5 but the root records step 0"):
        S.open_root(root)

    # Its bytes damaged: the CRC-32 says so where the core is read.
    shard.write_bytes(saved)
    with h5py.File(shard, "r+") as f:
        f[layout.CORE_WEIGHTS][0, 0] += 1
    with S.open_root(root) as model:
        with pytest.raises(DamagedFileError, match="shard 1 .* is damaged: the CRC-32"):
            model.read_core(1)
    report = deepnet.check(root)
    assert report.status == "damaged" and "CRC-32" in report.summary
    with pytest.raises(DamagedFileError):
        deepnet.gather(root, out=tmp_path / "g.h5")
    assert not (tmp_path / "g.h5").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_commit_and_version_refusals(tmp_path):
    root = tmp_path / "r.h5"
    S.create_sharded(root, 2, layers=5, width=W, activation="tanh")
    versions, _, heads = _versions(root, 2, 1.0)
    before = snapshot(tmp_path)
    bad = [
        lambda: S.write_core_version(root, 0, 0, np.zeros((3, 12), np.float32)),   # not a new step
        lambda: S.write_core_version(root, 2, 3, np.zeros((3, 12), np.float32)),   # no shard 2
        lambda: S.write_core_version(root, 1, 3, np.zeros((3, 12), np.float32)),   # shard 1 has 2 layers
        lambda: S.write_core_version(root, 0, 3, np.zeros((3, 12), np.float64)),
        lambda: _commit(root, 2, versions[:1], heads),
        lambda: _commit(root, 2, versions[::-1], heads),
        lambda: _commit(root, 3, versions, heads),                                # versions of step 2
        lambda: _commit(root, 0, versions, heads),
        lambda: _commit(root, 2, versions, {**heads, "input_bias": np.zeros(2, np.float32)}),
        lambda: S.commit_root(root, step=2, versions=versions, heads=heads, rng_state=5, train_settings=None,
                              log_rows=None),
    ]
    for call in bad:
        with pytest.raises(DeepnetError) as err:
            call()
        assert "\n" not in str(err.value)
    assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------------------------------
# refusals of the commands


def test_training_a_root_is_refused_with_what_to_do(tmp_path):
    root = tmp_path / "r.h5"
    S.create_sharded(root, 2, layers=5, width=W, activation="tanh")
    before = snapshot(tmp_path)
    with pytest.raises(ModelFileError, match=r"mpiexec -n 2 deepnet train .*deepnet gather"):
        deepnet.DeepNet.open(root, writable=True)
    with S.open_root(root) as model:
        shard = model.shards[0].path
    with pytest.raises(ModelFileError, match="shard file of a sharded model"):
        ModelFile.open(shard, "r+")
    assert snapshot(tmp_path) == before


def _refused(args: list[str], cwd: Path, capsys, monkeypatch) -> str:
    from deepnet.cli import main

    monkeypatch.chdir(cwd)
    before = snapshot(cwd)
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("deepnet: error: ") and "Traceback" not in err[0], err
    assert snapshot(cwd) == before
    return err[0]


def test_bad_inputs_are_one_line_and_write_nothing(tmp_path, capsys, monkeypatch):
    from deepnet.nn.mlp import MLP

    trained(tmp_path / "m.h5", layers=4)
    MLP.new(8).save(tmp_path / "mlp.h5")
    shutil.copy(tmp_path / "m.h5", tmp_path / "torn.h5")
    with ModelFile.open(tmp_path / "torn.h5", "r+") as f:
        f.write_layers(0, f.read_layers(0, 1) + 1, f.step + 1)
    deepnet.shard(tmp_path / "m.h5", ranks=2, out=tmp_path / "r.h5")
    (tmp_path / "exists.h5").write_bytes(b"x")
    cases = {
        "no ranks": (["shard", "m.h5"], "--ranks is required"),
        "ranks > layers": (["shard", "m.h5", "--ranks", "5"], "must not exceed layers"),
        "ranks 0": (["shard", "m.h5", "--ranks", "0"], "ranks must be >= 1"),
        "mlp": (["shard", "mlp.h5", "--ranks", "2"], "MLP model"),
        "torn": (["shard", "torn.h5", "--ranks", "2"], "torn step"),
        "missing": (["shard", "nope.h5", "--ranks", "2"], "no model file"),
        "out exists": (["shard", "m.h5", "--ranks", "2", "-o", "exists.h5"], "already exists"),
        "out is the source": (["shard", "m.h5", "--ranks", "2", "-o", "m.h5", "--overwrite"], "must not be the model"),
        "sharded already": (["shard", "r.h5", "--ranks", "2", "-o", "x.h5"], "sharded already"),
        "gather no out": (["gather", "r.h5"], "--out is required"),
        "gather not a root": (["gather", "m.h5", "-o", "g.h5"], "not a sharded model"),
        "gather out exists": (["gather", "r.h5", "-o", "exists.h5"], "already exists"),
        "gather onto the root": (["gather", "r.h5", "-o", "r.h5", "--overwrite"], "must not be the root"),
        "train a root": (["train", "r.h5", "-n", "1"], "mpiexec -n 2"),
    }
    for case, (args, message) in cases.items():
        line = _refused(args, tmp_path, capsys, monkeypatch)
        assert message in line, (case, line)


def test_the_commands_print_and_json(tmp_path, capsys, monkeypatch):
    from deepnet.cli import main

    trained(tmp_path / "m.h5", layers=5)
    monkeypatch.chdir(tmp_path)
    assert main(["shard", "m.h5", "--ranks", "2", "-o", "r.h5", "--json"]) == 0
    shard = json.loads(capsys.readouterr().out)
    assert shard["event"] == "shard" and [s["layers"] for s in shard["shards"]] == [3, 2]
    assert main(["gather", "r.h5", "-o", "g.h5"]) == 0
    assert capsys.readouterr().out.startswith("gathered r.h5 (2 shards, step 4")
    assert main(["check", "r.h5"]) == 0 and "healthy: step 4, 2 shards" in capsys.readouterr().out
    assert main(["shard", "g.h5", "--ranks", "3", "-o", "r.h5", "--overwrite"]) == 0
    assert len(list((tmp_path / "r.shards").iterdir())) == 3  # the replaced root's versions are gone


def _write_version(args: tuple) -> str:
    root, index, step, core = args
    return os.fspath(S.write_core_version(root, index, step, core))


def test_ranks_write_their_versions_at_once(tmp_path):
    import multiprocessing

    root = tmp_path / "r.h5"
    S.create_sharded(root, 2, layers=6, width=W, activation="tanh")
    with S.open_root(root) as model:
        core, heads, specs = model.file.read_core() + 1, model.file.read_heads(), model.shards
    jobs = [(root, s.index, 1, core[s.first_layer : s.first_layer + s.layers]) for s in specs]
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        versions = [Path(p) for p in pool.map(_write_version, jobs)]
    _commit(root, 1, versions, heads)
    with S.open_root(root) as model:
        assert model.file.read_core().tobytes() == core.tobytes()


def test_a_version_is_written_while_another_rank_commits(tmp_path, monkeypatch):
    """Mach's sections write versions while rank 0 commits an earlier step: the commit replaces the root and
    removes the versions it no longer names, possibly between a rank opening the root and checking its
    shard files. The writing rank then opens the new root and writes its version against it."""
    from deepnet.formats import shard_files

    root = tmp_path / "r.h5"
    S.create_sharded(root, 2, layers=5, width=W, activation="tanh")
    versions, core, heads = _versions(root, 3, 0.5)
    real_check = shard_files.check_shard_file
    commits = []

    def check_during_a_commit(*args, **kwargs):
        if not commits:   # rank 0's commit lands after this rank opened the old root
            commits.append(3)
            monkeypatch.setattr(shard_files, "check_shard_file", real_check)
            _commit(root, 3, versions, heads)
        return real_check(*args, **kwargs)

    monkeypatch.setattr(shard_files, "check_shard_file", check_during_a_commit)
    version = S.write_core_version(root, 1, 5, np.zeros((2, W * W + W), np.float32))
    assert commits == [3] and version.exists()
    with S.open_root(root) as model:
        assert model.step == 3 and model.file.read_core().tobytes() == core.tobytes()


def test_a_missing_shard_file_is_still_an_error_for_a_version(tmp_path):
    """The re-opening above is for a root replaced meanwhile only: a shard file missing from the root on
    disk is the one-line error it always was."""
    root = tmp_path / "r.h5"
    S.create_sharded(root, 2, layers=5, width=W, activation="tanh")
    with S.open_root(root) as model:
        missing = model.shards[0].path
    missing.unlink()
    with pytest.raises(ModelFileError, match="cannot be read|missing|no such"):
        S.write_core_version(root, 1, 5, np.zeros((2, W * W + W), np.float32))
