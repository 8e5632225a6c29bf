"""The weight average (deepnet.training.ema): its arithmetic, the Lookahead-style variant, what the file stores,
evaluation with the average, and the refusals."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import deepnet
import reference_branch as rb
from deepnet import DeepNet, ModelFile
from deepnet.training import ema
from deepnet.errors import ConfigError, ModelFileError
from deepnet.formats.layout import CORE_WEIGHTS, EMA_BRANCH_GROUP, EMA_CORE
from deepnet.data.sources import open_dataset
from deepnet.formats.data_record import DataRecord
from helpers import MNIST_DIR, have_mnist, make_model
from reference import Model64, assert_close, softmax_xent


def live_weights(net) -> dict:
    out = {"core": net.core_weights.astype(np.float64)}
    out.update({k: v.astype(np.float64) for k, v in net.heads.items()})
    if net.branch is not None:
        out.update({f"branch_{k}": v.astype(np.float64) for k, v in net.branch.params().items()})
    return out


def average_weights(avg) -> dict:
    out = {"core": avg.core}
    out.update(avg.heads)
    if avg.branch is not None:
        out.update({f"branch_{k}": v for k, v in avg.branch.items()})
    return out


def weights_of(path) -> tuple:
    with DeepNet.open(path) as net:
        return net.file.read_core(), net.heads, {k: v.copy() for k, v in net.branch.params().items()}


@pytest.mark.parametrize("in_memory", [True, False], ids=["in_memory", "streamed"])
def test_using_weights_computes_with_them_and_puts_the_own_back(tmp_path, in_memory):
    for seed, name in ((0, "a.h5"), (1, "b.h5")):
        deepnet.init(tmp_path / name, layers=40, width=4, activation="tanh", input_dim=12, seed=seed,
                     branch="mlp", hidden=6, progress=False)
    x = np.random.default_rng(0).uniform(0, 1, (24, 12)).astype(np.float32)
    y = np.arange(24) % 10
    core, heads, branch = weights_of(tmp_path / "b.h5")
    with DeepNet.open(tmp_path / "b.h5") as other:
        theirs = other.logits(x)
    with DeepNet.open(tmp_path / "a.h5", writable=True, in_memory=in_memory, chunk_layers=16) as net:
        own = net.logits(x)
        with net.using_weights(core=core, heads=heads, branch=branch) as inside:
            assert np.array_equal(inside.logits(x), theirs)
            assert net.unusable
            with pytest.raises(ModelFileError, match="other weights"):
                net.train_step(x, y, layer_lr=0.1, head_lr=0.1)
        assert net.unusable is None and np.array_equal(net.logits(x), own)
        net.train_step(x, y, layer_lr=0.1, head_lr=0.1)   # its own weights again: it trains
        assert net.engine.work_batch == 24


def test_replace_weights_is_for_good_and_refuses_training(tmp_path):
    for seed, name in ((0, "a.h5"), (1, "b.h5")):
        deepnet.init(tmp_path / name, layers=40, width=4, activation="tanh", input_dim=12, seed=seed,
                     branch="mlp", hidden=6, progress=False)
    x = np.random.default_rng(1).uniform(0, 1, (8, 12)).astype(np.float32)
    core, heads, branch = weights_of(tmp_path / "b.h5")
    with DeepNet.open(tmp_path / "b.h5") as other:
        theirs = other.logits(x)
    with DeepNet.open(tmp_path / "a.h5", writable=True) as net:
        net.replace_weights(core=core, heads=heads, branch=branch)
        assert net.core_weights is core and np.array_equal(net.logits(x), theirs)
        with pytest.raises(ModelFileError, match="other weights"):
            net.train_step(x, np.zeros(8, np.intp), layer_lr=0.1, head_lr=0.1)
        with pytest.raises(ConfigError):
            net.replace_weights(core=core[:-1])


def test_weights_that_do_not_fit_replace_nothing(tmp_path):
    deepnet.init(tmp_path / "a.h5", layers=20, width=4, activation="tanh", input_dim=12, seed=0,
                 branch="mlp", hidden=6, progress=False)
    core, heads, branch = weights_of(tmp_path / "a.h5")
    x = np.random.default_rng(2).uniform(0, 1, (8, 12)).astype(np.float32)
    with DeepNet.open(tmp_path / "a.h5") as net:
        own = net.logits(x)
        live_heads, live_engine = net.heads, net.engine
        bad_branch = dict(branch, w2=branch["w2"][:-1])
        for kwargs in ({"core": np.zeros_like(core), "heads": heads, "branch": bad_branch},
                       {"core": np.zeros_like(core)[:, :-1], "heads": {k: v * 0 for k, v in heads.items()}}):
            with pytest.raises(ConfigError):
                with net.using_weights(**kwargs):
                    pass
            assert net.heads is live_heads and net.engine is live_engine and net.unusable is None
            assert np.array_equal(net.logits(x), own)


@pytest.mark.parametrize("with_branch", [False, True], ids=["plain", "branch"])
def test_average_matches_numpy_reference(tmp_path, with_branch, monkeypatch):
    monkeypatch.setattr(ema, "BLOCK_FLOATS", 512)  # several blocks per thread, and a partial last one
    if with_branch:
        deepnet.init(tmp_path / "m.h5", layers=300, width=4, input_dim=20, branch="mlp", hidden=8, progress=False)
        path = tmp_path / "m.h5"
    else:
        path = make_model(tmp_path / "m.h5", layers=300, width=4, activation="softsign", input_dim=20)
    rng = np.random.default_rng(2)
    decay = 0.8
    with DeepNet.open(path, writable=True, in_memory=True) as net:
        avg = ema.WeightAverage.start(net, decay)
        avg.threads = 2  # exercise the threaded blend (the core has > BLOCK_FLOATS floats)
        assert net.core_weights.size > ema.BLOCK_FLOATS
        ref = live_weights(net)
        for _ in range(4):
            x = rng.uniform(0, 1, size=(5, 20)).astype(np.float32)
            y = rng.integers(0, 10, size=5)
            net.train_step(x, y, layer_lr=0.5, head_lr=0.5)
            avg.after_step(net)
            live = live_weights(net)
            ref = {k: decay * ref[k] + (1 - decay) * live[k] for k in ref}
        got = average_weights(avg)
        assert set(got) == set(ref)
        for key in ref:
            assert got[key].dtype == np.float32
            assert_close(got[key], ref[key], rtol=2e-6, what=key)
        for key in ("core", "output_weight"):  # the average is clearly not the live weights
            assert np.max(np.abs(ref[key] - live[key])) > 100 * 2e-6 * np.max(np.abs(ref[key])), key
        assert avg.step == 4
        avg.close()


def test_every_k_writes_the_average_back(tmp_path):
    path = make_model(tmp_path / "m.h5", layers=20, width=4, activation="tanh", input_dim=20)
    rng = np.random.default_rng(4)
    decay, k = 0.5, 3
    with DeepNet.open(path, writable=True, in_memory=True) as net:
        avg = ema.WeightAverage.start(net, decay, every=k)
        slow = live_weights(net)
        for step in range(1, 7):
            x = rng.uniform(0, 1, size=(4, 20)).astype(np.float32)
            y = rng.integers(0, 10, size=4)
            net.train_step(x, y, layer_lr=0.3, head_lr=0.3)
            fast = live_weights(net)
            avg.after_step(net)
            if step % k == 0:
                slow = {key: slow[key] + (1 - decay) * (fast[key] - slow[key]) for key in slow}
                now = live_weights(net)
                for key in slow:
                    assert np.array_equal(now[key], average_weights(avg)[key]), key   # live <- avg
                    assert_close(now[key], slow[key], rtol=2e-6, what=key)
            else:
                # between the K-th steps nothing is averaged
                for key in slow:
                    assert_close(average_weights(avg)[key], slow[key], rtol=2e-6, what=key)


def test_train_with_ema_reports_both_and_stores_the_average(tmp_path, mnist_dir, capsys):
    path = tmp_path / "m.h5"
    final = deepnet.train(path, steps=30, layers=40, width=4, branch="mlp", hidden=16, ema=0.9, in_memory=True,
                          test_samples=300, progress=False)
    capsys.readouterr()
    assert {"test_acc", "ema_test_acc", "ema_test_loss"} <= set(final) and final["ema_decay"] == 0.9
    assert final["ema_test_loss"] != final["test_loss"]
    with ModelFile.open(path) as f:
        h5 = f.h5
        assert h5[EMA_CORE].shape == h5[CORE_WEIGHTS].shape
        assert h5[EMA_CORE].chunks == h5[CORE_WEIGHTS].chunks
        assert int(h5.attrs["ema_step"]) == 30 and float(h5.attrs["ema_decay"]) == 0.9
        assert int(h5.attrs["ema_every"]) == 0
        assert set(h5[EMA_BRANCH_GROUP]) == {"w1", "b1", "w2", "b2"}
        core, heads, branch = ema.read_arrays(f, branch=True)
        live_core, alpha = f.read_core(), f.alpha
    assert not np.array_equal(core, live_core)

    # eval --use-ema: differs from plain eval and matches a manual float64 computation on the average
    plain = deepnet.evaluate(path, test_samples=500, progress=False)
    averaged = deepnet.evaluate(path, test_samples=500, progress=False, use_ema=True)
    capsys.readouterr()
    assert averaged["ema"] is True and averaged["ema_step"] == 30
    assert averaged["loss"] != plain["loss"]
    x, y = open_dataset(DataRecord()).test(500)
    ref = rb.logits(Model64.from_arrays(heads, core, alpha, "softsign"), branch, x)
    loss, _ = softmax_xent(ref, y)
    assert averaged["loss"] == pytest.approx(loss, rel=1e-5)
    assert averaged["accuracy"] == pytest.approx(np.mean(np.argmax(ref, axis=1) == y), abs=2 / 500)
    # ... and the final report's EMA figure is that same evaluation
    assert final["ema_test_loss"] == pytest.approx(deepnet.evaluate(path, test_samples=300, progress=False,
                                                                    use_ema=True)["loss"], rel=1e-6)
    capsys.readouterr()


def test_resumed_average_continues_exactly(tmp_path, mnist_dir, capsys):
    kw = dict(layers=12, width=4, test_samples=0, progress=False, in_memory=True, ema=0.7)
    deepnet.train(tmp_path / "one.h5", steps=10, **kw)
    deepnet.train(tmp_path / "two.h5", steps=5, **kw)
    deepnet.train(tmp_path / "two.h5", steps=5, **kw)
    capsys.readouterr()
    with ModelFile.open(tmp_path / "one.h5") as a, ModelFile.open(tmp_path / "two.h5") as b:
        ca, ha, _ = ema.read_arrays(a, branch=False)
        cb, hb, _ = ema.read_arrays(b, branch=False)
        assert np.array_equal(ca, cb) and all(np.array_equal(ha[k], hb[k]) for k in ha)
        assert np.array_equal(a.read_core(), b.read_core())


def test_refusals(tmp_path, mnist_dir, monkeypatch):
    with pytest.raises(ConfigError, match="--ema needs --in-memory"):
        deepnet.train(tmp_path / "s.h5", steps=1, layers=5, ema=0.9, test_samples=0, progress=False)
    assert not (tmp_path / "s.h5").exists()
    with pytest.raises(ConfigError, match="--ema-every needs --ema"):
        deepnet.train(tmp_path / "s.h5", steps=1, layers=5, ema_every=3, in_memory=True, progress=False)
    with pytest.raises(ConfigError, match=r"--ema must be a decay in \[0, 1\)"):
        deepnet.train(tmp_path / "s.h5", steps=1, layers=5, ema=1.0, in_memory=True, progress=False)
    with pytest.raises(ConfigError, match="--ema-every must be an integer >= 1"):
        deepnet.train(tmp_path / "s.h5", steps=1, layers=5, ema=0.5, ema_every=0, in_memory=True, progress=False)
    # too little memory: refused before the model is even created
    monkeypatch.setattr(ema, "mem_available", lambda: 100)
    with pytest.raises(ConfigError, match=r"second copy of the core in RAM.* only 0.00 GB is available now \(MemAvailable\)"):
        deepnet.train(tmp_path / "s.h5", steps=1, layers=5, ema=0.9, in_memory=True, test_samples=0, progress=False)
    assert not (tmp_path / "s.h5").exists()
    with pytest.raises(ConfigError, match="MemAvailable"):
        ema.check_fits(800_000_000, resident=True, available=700_000_000)
    ema.check_fits(800_000_000, resident=True, available=900_000_000)
    with pytest.raises(ConfigError, match=r"with the core itself\) needs 1.60 GB of memory"):
        ema.check_fits(800_000_000, resident=False, available=900_000_000)
    monkeypatch.undo()
    # no average in the file
    deepnet.init(tmp_path / "plain.h5", layers=5, progress=False)
    with pytest.raises(ConfigError, match="holds no weight average"):
        deepnet.evaluate(tmp_path / "plain.h5", test_samples=10, use_ema=True, progress=False)
    assert ema.mem_available() is None or ema.mem_available() > 0


@pytest.mark.skipif(not have_mnist(), reason="no MNIST")
def test_cli_refusals_are_one_line(tmp_path):
    env = {"DEEPNET_DATA": str(MNIST_DIR), "PATH": ""}
    for args in (["train", "--model", "m.h5", "--layers", "5", "--steps", "1", "--ema", "0.9"],
                 ["eval", "--model", "p.h5", "--samples", "5", "--use-ema"]):
        if args[0] == "eval":
            deepnet.init(tmp_path / "p.h5", layers=5, progress=False)
        proc = subprocess.run([sys.executable, "-m", "deepnet", *args], cwd=tmp_path, capture_output=True, text=True,
                              env=env, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith("deepnet: error:") and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "m.h5").exists()


def everything_stored(path) -> dict:
    """Every weight, average, setting and log figure of a model file but the wall-clock ones."""
    with ModelFile.open(path) as f:
        log = f.read_log()
        out = {"core": f.read_core(), "heads": f.read_heads(), "step": f.step, "rng": f.rng_state,
               "train": f.train_settings, "ema": ema.stored_info(f),
               "log": (log["step"].tolist(), log["loss"].tolist(), log["batch_acc"].tolist())}
        core, heads, branch = ema.read_arrays(f, branch=True)
        out.update(ema_core=core, ema_heads=heads, ema_branch=branch)
        branch_now = deepnet.nn.branch.load(f)
        out["branch"] = branch_now.params()
    return out


def assert_all_equal(a, b, where=""):
    assert type(a) is type(b) or isinstance(a, np.ndarray), where
    if isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            assert_all_equal(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), where
    else:
        assert a == b, where


@pytest.mark.parametrize("every", [None, 2], ids=["ema", "lookahead"])
def test_a_plain_train_continues_every_stored_option(tmp_path, mnist_dir, capsys, every):
    """issue 18 item 3: `train` without flags continues the average (decay, every) and every other
    stored option (schedule, held-out, branch, train_limit, batch, rates) exactly as one run would."""
    kw = dict(layers=12, width=4, test_samples=0, progress=False, in_memory=True)
    flags = dict(ema=0.8, ema_every=every, schedule="cosine", warmup=2, final_lr_ratio=0.1, decay_steps=9,
                 holdout=300, eval_every=2, branch="mlp", hidden=8, train_limit=900, batch=5, layer_lr=0.07,
                 head_lr=0.03)
    one = deepnet.train(tmp_path / "one.h5", steps=8, **kw, **flags)
    deepnet.train(tmp_path / "two.h5", steps=3, **kw, **flags)
    two = deepnet.train(tmp_path / "two.h5", steps=5, **kw)
    capsys.readouterr()
    a, b = everything_stored(tmp_path / "one.h5"), everything_stored(tmp_path / "two.h5")
    assert a["ema"]["step"] == 8 and a["ema"]["every"] == every
    assert_all_equal(a, b)
    for key in ("loss", "heldout_acc", "heldout_step", "ema_decay", "ema_every", "ema_heldout_acc"):
        assert one[key] == two[key], key


def test_a_streamed_run_on_a_model_with_an_average_is_refused(tmp_path, mnist_dir, capsys):
    """issue 18 item 3: streamed training cannot keep the stored average going: refused, nothing written."""
    path = tmp_path / "m.h5"
    deepnet.train(path, steps=2, layers=12, width=4, test_samples=0, progress=False, in_memory=True, ema=0.9)
    before = path.read_bytes()
    with pytest.raises(ConfigError, match=r"^.*m\.h5 holds a weight average \(--ema 0\.9\), which only in-memory "
                                          r"training can continue: add --in-memory$"):
        deepnet.train(path, steps=2, test_samples=0, progress=False)
    assert path.read_bytes() == before
