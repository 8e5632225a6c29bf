"""The depth split's step (deepnet.distributed.pipeline) against one process, and the MPI plumbing that
needs no launcher (deepnet.distributed.mpi). The runs under mpiexec are in tests/test_mpi.py.
"""

from __future__ import annotations

import os
import sys
import threading

import numpy as np
import pytest

import deepnet
from deepnet.distributed import mpi
from deepnet.distributed.pipeline import (MIN_MICRO_BATCH, RankCore, RankStep, default_micro_batches,
                                          micro_batch_sizes, run_in_process)
from deepnet.errors import ConfigError
from deepnet.formats.hdf5 import ModelFile
from deepnet.kernels.loader import kernels_for
from deepnet.nn.network import DeepNet

LAYERS, WIDTH, BATCH = 203, 4, 16


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist") / "m.h5"
    deepnet.init(path, layers=LAYERS, width=WIDTH, activation="softsign", seed=3)
    rng = np.random.default_rng(0)
    batches = [(rng.random((BATCH, 784), dtype=np.float32), rng.integers(0, 10, BATCH)) for _ in range(3)]
    return path, batches


def one_process(path, batches, tmp_path, lr=(0.05, 0.02)):
    copy = tmp_path / "ref.h5"
    copy.write_bytes(path.read_bytes())
    with DeepNet.open(copy, writable=True, in_memory=True, chunk_layers=50) as net:
        losses = [net.train_step(x, y, layer_lr=lr[0], head_lr=lr[1]).loss for x, y in batches]
        return net.core_weights.copy(), {k: v.copy() for k, v in net.heads.items()}, losses


def split_run(path, batches, ranks, micro, lr=(0.05, 0.02), chunk=37):
    with ModelFile.open(path) as f:
        core, heads, alpha = f.read_core(), f.read_heads(), f.alpha
    kernels = kernels_for("softsign", WIDTH)
    steps = []
    for r, layers in enumerate(np.array_split(np.arange(LAYERS), ranks)):
        mine = {k: v for k, v in heads.items()
                if (r == 0 and k.startswith("input")) or (r == ranks - 1 and k.startswith("output"))}
        rank_core = RankCore(core[layers[0]:layers[-1] + 1], kernels, WIDTH, alpha, chunk,
                             micro_batch_sizes(BATCH, micro))
        steps.append(RankStep(r, ranks, rank_core, mine))
    losses = []
    for x, y in batches:
        steps[0].x, steps[-1].y = x, y
        losses.append(run_in_process(steps, *lr)[0])
    return core, heads, losses


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_one_micro_batch_is_the_one_process_step_bit_for_bit(model, tmp_path, ranks):
    path, batches = model
    want_core, want_heads, want_losses = one_process(path, batches, tmp_path)
    core, heads, losses = split_run(path, batches, ranks, micro=1)
    assert np.array_equal(core, want_core)
    assert all(np.array_equal(heads[k], want_heads[k]) for k in want_heads)
    assert losses == want_losses


@pytest.mark.parametrize("ranks,micro", [(1, 2), (2, 2), (2, 3), (3, 4), (3, 8)])
def test_micro_batches_give_the_one_process_step_to_float32_rounding(model, tmp_path, ranks, micro):
    path, batches = model
    want_core, want_heads, want_losses = one_process(path, batches, tmp_path)
    with ModelFile.open(path) as f:
        before = f.read_core()
    core, heads, losses = split_run(path, batches, ranks, micro)
    moved = np.abs(want_core - before).max()
    assert moved > 0
    # the difference is rounding: tiny against both the weights and how far the steps moved them
    assert np.abs(core - want_core).max() <= 1e-3 * moved + 1e-9
    for k in want_heads:
        np.testing.assert_allclose(heads[k], want_heads[k], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
    again, again_heads, _ = split_run(path, batches, ranks, micro)  # and the same P and M repeat exactly
    assert np.array_equal(again, core) and all(np.array_equal(again_heads[k], heads[k]) for k in heads)


def test_micro_batch_sizes_and_the_default_count():
    assert micro_batch_sizes(16, 3) == [6, 5, 5] and sum(micro_batch_sizes(1001, 7)) == 1001
    assert micro_batch_sizes(16, 1) == [16]
    assert default_micro_batches(16, 1) == default_micro_batches(256, 2) == 1
    assert default_micro_batches(64, 3) == 64 // MIN_MICRO_BATCH and default_micro_batches(256, 3) == 6
    assert default_micro_batches(4096, 8) == 16 and default_micro_batches(16, 4) == 1


def test_the_launcher_s_rank_and_size_come_from_the_environment(monkeypatch):
    for name in (*mpi.RANK_VARIABLES, *mpi.SIZE_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    assert mpi.launched_size() == 1 and mpi.launched_rank() == 0 and mpi.world() is None
    monkeypatch.setenv("PMI_SIZE", "3")
    monkeypatch.setenv("PMI_RANK", "2")
    assert mpi.launched_size() == 3 and mpi.launched_rank() == 2
    monkeypatch.setitem(sys.modules, "mpi4py", None)  # as if the [mpi] extra were not installed
    with pytest.raises(ConfigError, match=r"one of 3 MPI ranks, but mpi4py is not installed \(pip install"):
        mpi.world()


class _FakeRequest:
    def Test(self):
        return False


class _FakeComm:
    def Get_rank(self):
        return 1

    def Get_size(self):
        return 2

    def Irecv(self, buf, source, tag):
        return _FakeRequest()


def test_a_rank_that_never_answers_ends_the_wait_naming_it():
    ranks = mpi.Ranks(_FakeComm(), timeout=0.05)
    with pytest.raises(mpi.RankLost, match=r"rank 1 waited 0.05 s for a message from rank 0, which died or hangs"):
        ranks.recv((4, 8), 0, 1)


def test_a_pipe_s_unread_bytes_are_counted_until_its_reader_reads_them(tmp_path):
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, b"x" * 100)
        assert mpi.unread_bytes(write_end) == 100
        assert not mpi.wait_until_read((write_end,), 0.05)  # nobody reads: the wait gives up
        reader = threading.Timer(0.05, os.read, (read_end, 60))
        reader.start()
        assert not mpi.wait_until_read((write_end,), 0.5)  # the reader left 40 bytes
        reader.join()
        threading.Timer(0.05, os.read, (read_end, 100)).start()
        assert mpi.wait_until_read((write_end,), 5.0) and mpi.unread_bytes(write_end) == 0
    finally:
        os.close(read_end)
        os.close(write_end)
    with open(tmp_path / "log", "wb") as log:  # not a pipe: nothing to wait for
        log.write(b"x" * 100)
        assert mpi.unread_bytes(log.fileno()) == 0 and mpi.wait_until_read((log.fileno(),), 0.0)
