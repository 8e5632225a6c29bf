"""Where the weights live and how they are chunked do not change results: not even by one bit.

The streamed and in-memory stores hand the kernels the same chunks, and the kernels recompute a
checkpointed segment with the same arithmetic as the forward pass, so every mode and every
``chunk_layers`` gives bit-identical weights; these tests assert exact equality (np.array_equal).
"""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import deepnet
from deepnet import DeepNet, ModelFile
from deepnet.nn.stores import MappedStore, contiguous_runs, file_store
from helpers import make_model, read_weights


def run_steps(path, batches, *, in_memory, chunk_layers=100_000, layer_lr=0.3, head_lr=0.1):
    """Train the model file at `path` on the given (x, y) batches; returns the losses and the weights."""
    losses = []
    with DeepNet.open(path, writable=True, in_memory=in_memory, chunk_layers=chunk_layers) as net:
        for x, y in batches:
            losses.append(net.train_step(x, y, layer_lr=layer_lr, head_lr=head_lr).loss)
        net.save()
    heads, core = read_weights(path)
    return losses, heads, core


def make_batches(n_steps, sizes, input_dim=784, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n_steps):
        b = sizes[k % len(sizes)]
        out.append((rng.uniform(0, 1, size=(b, input_dim)).astype(np.float32), rng.integers(0, 10, size=b)))
    return out


def assert_same_weights(a, b, label):
    (heads_a, core_a), (heads_b, core_b) = a, b
    assert np.array_equal(core_a, core_b), f"{label}: core weights differ"
    for key in heads_a:
        assert np.array_equal(heads_a[key], heads_b[key]), f"{label}: head {key} differs"


@pytest.mark.parametrize("activation", ["tanh", "softsign", "relu"])
def test_streamed_and_in_memory_training_are_bit_identical(tmp_path, activation):
    original = make_model(tmp_path / "orig.h5", layers=60, width=4, activation=activation, seed=1)
    # Batch sizes change between steps (the engine reallocates its buffers), 9 is not a multiple of 8.
    batches = make_batches(6, [5, 9, 16], seed=2)
    results = {}
    for mode in ("in_memory", "streamed"):
        path = tmp_path / f"{mode}.h5"
        shutil.copy(original, path)
        results[mode] = run_steps(path, batches, in_memory=(mode == "in_memory"))
    assert results["in_memory"][0] == results["streamed"][0], "losses differ"
    assert_same_weights(results["in_memory"][1:], results["streamed"][1:], "streamed vs in-memory")
    # ... and training did move every layer (so equality is not two untouched copies).
    _, core0 = read_weights(original)
    moved = np.abs(results["streamed"][2] - core0).max(axis=1)
    assert np.all(moved > 1e-4), f"layers not updated: {np.flatnonzero(moved <= 1e-4)}"


@pytest.mark.parametrize("layers", [50, 137])
def test_chunk_layers_give_bit_identical_weights(tmp_path, layers):
    """chunk_layers 1, 7, 50, 1000 (more than L) in both modes: the same weights, bit for bit."""
    original = make_model(tmp_path / "orig.h5", layers=layers, width=3, activation="softsign", seed=3)
    batches = make_batches(3, [7, 12], seed=4)
    runs = {}
    for chunk_layers in (1, 7, 50, 1000):
        for in_memory in (True, False):
            path = tmp_path / f"c{chunk_layers}-{in_memory}.h5"
            shutil.copy(original, path)
            runs[chunk_layers, in_memory] = run_steps(path, batches, in_memory=in_memory, chunk_layers=chunk_layers)
    base = runs[1000, True]
    for key, run in runs.items():
        assert run[0] == base[0], f"chunk_layers={key[0]} in_memory={key[1]}: losses differ"
        assert_same_weights(base[1:], run[1:], f"chunk_layers={key[0]} in_memory={key[1]}")
    _, core0 = read_weights(original)
    assert np.all(np.abs(base[2] - core0).max(axis=1) > 1e-5), "every layer must have been updated"


def test_streamed_step_marks_every_storage_chunk(tmp_path):
    """A streamed step writes every storage chunk back and records the step in /core/chunk_step."""
    path = tmp_path / "m.h5"
    ModelFile.create(path, layers=45, width=4, activation="tanh", storage_chunk_layers=10, init_scale=0.5,
                     progress=False).close()
    for step, chunk_layers in ((1, 7), (2, 100_000), (3, 10)):
        run_steps(path, make_batches(1, [4], seed=step), in_memory=False, chunk_layers=chunk_layers)
        with ModelFile.open(path) as f:
            assert f.step == step
            assert list(f.chunk_steps()) == [step] * 5


# ---------------------------------------------------------------------------------------------------
# through the recipe


RUN = dict(layers=30, width=4, activation="softsign", seed=5, batch=8, train_limit=2000, report_every=5,
           test_samples=200, progress=False)


def file_state(path):
    with ModelFile.open(path) as f:
        log = f.read_log()
        return {
            "heads": f.read_heads(),
            "core": f.read_core(),
            "step": f.step,
            "rng_state": f.rng_state,
            "log": (log["step"].tolist(), log["loss"].tolist(), log["batch_acc"].tolist()),
        }


def assert_same_files(a, b):
    assert np.array_equal(a["core"], b["core"]), "core weights differ"
    for key in a["heads"]:
        assert np.array_equal(a["heads"][key], b["heads"][key]), f"head {key} differs"
    assert a["step"] == b["step"]
    assert a["rng_state"] == b["rng_state"]
    assert a["log"] == b["log"]


def test_recipe_in_memory_and_streamed_give_identical_files(tmp_path, mnist_dir, capsys):
    # One run finds MNIST through $DEEPNET_DATA (set by the fixture), the other through data_dir.
    rows = {"mem": [], "str": []}
    final_mem = deepnet.train(tmp_path / "mem.h5", steps=12, in_memory=True, on_report=rows["mem"].append, **RUN)
    final_str = deepnet.train(tmp_path / "str.h5", steps=12, in_memory=False, data_dir=str(mnist_dir),
                              on_report=rows["str"].append, **RUN)
    assert capsys.readouterr().out == ""  # the API returns its figures; the CLI prints them
    for mode in ("mem", "str"):
        assert [(d["event"], d["step"]) for d in rows[mode]] == [("report", 5), ("report", 10), ("report", 12)]
    assert [d["loss"] for d in rows["mem"]] == [d["loss"] for d in rows["str"]]
    assert final_mem["event"] == final_str["event"] == "final"

    for key in ("steps", "step", "loss", "batch_acc", "test_loss", "test_acc", "test_samples"):
        assert final_mem[key] == final_str[key], key
    assert final_mem["step"] == 12
    mem, streamed = file_state(tmp_path / "mem.h5"), file_state(tmp_path / "str.h5")
    assert_same_files(mem, streamed)
    assert mem["log"][0] == list(range(1, 13))
    # Training moved every layer away from its initial weights (the same seed gives the same start).
    deepnet.init(tmp_path / "fresh.h5", layers=30, width=4, activation="softsign", seed=5, progress=False)
    _, core0 = read_weights(tmp_path / "fresh.h5")
    assert np.all(np.abs(mem["core"] - core0).max(axis=1) > 0)


def test_recipe_resumed_run_equals_one_run(tmp_path, mnist_dir, capsys):
    """6 + 6 steps (the minibatch generator continues from the file) == 12 steps; chunk_layers and
    in_memory may differ between the two halves without changing anything."""
    deepnet.train(tmp_path / "one.h5", steps=12, **RUN)
    deepnet.train(tmp_path / "two.h5", steps=6, chunk_layers=7, **RUN)
    deepnet.train(tmp_path / "two.h5", steps=6, in_memory=True, **RUN)
    capsys.readouterr()
    assert_same_files(file_state(tmp_path / "one.h5"), file_state(tmp_path / "two.h5"))


def test_contiguous_runs_of_storage_chunks():
    chunk = 100
    assert contiguous_runs(np.array([0, 100, 200, 300]), chunk) == [(0, 4)]
    assert contiguous_runs(np.array([0, 100, 500, 600, 700]), chunk) == [(0, 2), (2, 5)]
    assert contiguous_runs(np.array([300, 0, 100]), chunk) == [(0, 1), (1, 3)]   # out of order in the file
    assert contiguous_runs(np.array([40]), chunk) == [(0, 1)]


def test_mapped_store_calls_span_storage_chunks(tmp_path):
    """Back-to-back storage chunks form one view: kernel calls cover chunk_layers, not one storage chunk,
    and never cross a run of chunks (the rows of a run are contiguous in the file)."""
    path = tmp_path / "m.h5"
    ModelFile.create(path, layers=95, width=4, activation="tanh", storage_chunk_layers=10, init_scale=0.5,
                     progress=False).close()
    with ModelFile.open(path) as f:
        store = file_store(f)
        try:
            assert isinstance(store, MappedStore)
            runs = store._runs
            assert runs[0][0] == 0 and runs[-1][1] == 10 and all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
            assert max(stop - first for first, stop in runs) > 1   # HDF5 allocates most chunks back to back
            for chunk_layers in (100_000, 20, 7):
                bounds = store.bounds(chunk_layers)
                assert bounds[0][0] == 0 and bounds[-1][1] == 95
                run_of = lambda layer: next(k for k, (a, b) in enumerate(runs) if a * 10 <= layer < b * 10)
                assert all(run_of(start) == run_of(stop - 1) for start, stop in bounds)
                assert all(stop - start <= chunk_layers for start, stop in bounds)
                rows = [r.copy() for _, r in store.forward_chunks(bounds)]
                assert np.array_equal(np.concatenate(rows), f.read_core())
            assert len(store.bounds(100_000)) == len(runs)
        finally:
            store.close()
