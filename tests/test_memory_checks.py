"""Absurd sizes are refused before work starts (issue 18 item 5, the memory part): one line saying how
much memory is needed and how much is available (MemAvailable), and nothing created."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import deepnet
from deepnet import DeepNet
from deepnet.errors import ConfigError
from deepnet.nn import memory
from deepnet.training import ema
from helpers import MNIST_DIR, have_mnist

needs_mnist = pytest.mark.skipif(not have_mnist(), reason=f"MNIST is not in {MNIST_DIR}")
REFUSED = r"needs [0-9.]+ [GT]B of memory but only 1\.00 GB is available now \(MemAvailable\)$"


@pytest.fixture
def one_gb(monkeypatch):
    """This machine has 1 GB available, whatever it really has."""
    monkeypatch.setattr(memory, "mem_available", lambda: 1_000_000_000)


@pytest.mark.parametrize("shape", [dict(width=100_000, layers=10), dict(input_dim=4_000_000_000),
                                   dict(branch="mlp", hidden=100_000_000)], ids=["width", "input-dim", "branch"])
def test_init_refuses_a_model_that_cannot_be_drawn(tmp_path, one_gb, shape):
    """issue 18 item 5: init --width 100000 / --input-dim 4000000000 / --branch mlp --hidden 100000000."""
    with pytest.raises(ConfigError, match=r"^a model of width .* " + REFUSED):
        deepnet.init(tmp_path / "m.h5", progress=False, **shape)
    assert os.listdir(tmp_path) == []


def test_init_still_creates_what_fits(tmp_path, one_gb):
    deepnet.init(tmp_path / "m.h5", layers=1000, width=8, branch="mlp", hidden=64, progress=False)
    assert (tmp_path / "m.h5").exists()


@needs_mnist
def test_train_refuses_a_batch_that_cannot_fit_before_creating_the_model(tmp_path, mnist_dir, one_gb):
    """issue 18 item 5: train --batch 1000000000000, on a new model and on an existing one."""
    with pytest.raises(ConfigError, match=r"^a training step at batch 1000000000000 " + REFUSED):
        deepnet.train(tmp_path / "new.h5", layers=100, steps=1, batch=10**12, test_samples=0, progress=False)
    assert os.listdir(tmp_path) == []
    path = tmp_path / "m.h5"
    deepnet.init(path, layers=100, progress=False)
    before = path.read_bytes()
    with pytest.raises(ConfigError, match=r"^a training step of .*m\.h5 at batch 100000000 " + REFUSED):
        deepnet.train(path, steps=1, batch=10**8, test_samples=0, progress=False)
    assert path.read_bytes() == before


def test_in_memory_refuses_a_core_that_cannot_fit(tmp_path, monkeypatch):
    """issue 18 item 5: --in-memory holds the core in RAM: refused before it is read."""
    path = tmp_path / "m.h5"
    deepnet.init(path, layers=1000, width=4, progress=False)
    monkeypatch.setattr(memory, "mem_available", lambda: 50_000)
    with pytest.raises(ConfigError, match=r"^--in-memory \(the core of .*m\.h5 in RAM\) needs 0\.00 GB of memory"):
        DeepNet.open(path, writable=True, in_memory=True)
    DeepNet.open(path, writable=True).close()   # streamed needs no such copy


def test_step_bytes_grow_with_the_batch_and_count_the_store_buffers(tmp_path, monkeypatch):
    """issue 18 item 5: a step's estimate covers the batch, and the h5py-streamed store's three buffers
    of --chunk-layers rows."""
    path = tmp_path / "m.h5"
    deepnet.init(path, layers=50, width=4, branch="mlp", hidden=16, progress=False)
    with DeepNet.open(path) as net:
        small, large = net.step_bytes(16), net.step_bytes(16_000)
    assert 0 < small < large and large > 16_000 * 784 * 4
    monkeypatch.setenv("DEEPNET_NO_MMAP", "1")
    with DeepNet.open(path, chunk_layers=50) as net:
        assert net.step_bytes(16) >= small + 3 * 50 * 20 * 4


@needs_mnist
def test_train_mlp_refuses_what_cannot_fit(tmp_path, mnist_dir, one_gb):
    """issue 18 item 5: train-mlp --hidden 100000000 (and an absurd batch)."""
    with pytest.raises(ConfigError, match=r"^training an MLP of hidden 100000000 at batch 128 " + REFUSED):
        deepnet.train_mlp(tmp_path / "m.h5", hidden=100_000_000, steps=1, test_samples=0)
    with pytest.raises(ConfigError, match=r"^training an MLP of hidden 512 at batch 10000000000 " + REFUSED):
        deepnet.train_mlp(tmp_path / "m.h5", batch=10**10, steps=1, test_samples=0)
    assert os.listdir(tmp_path) == []


def test_one_helper_reads_meminfo(monkeypatch):
    """issue 18 item 5: the weight average's memory checks go through the one helper (nn/memory.py)."""
    assert ema.mem_available is memory.mem_available
    assert memory.mem_available() is None or memory.mem_available() > 0
    with pytest.raises(ConfigError, match=r"^--ema \(a second copy of the core in RAM\) needs 0\.80 GB of memory "
                                          r"but only 0\.70 GB is available now \(MemAvailable\)$"):
        ema.check_fits(800_000_000, resident=True, available=700_000_000)
    assert memory.size(3.2e9) == "3.20 GB" and memory.size(1.2e15) == "1200.00 TB"


@pytest.mark.skipif(memory.mem_available() is None, reason="no /proc/meminfo")
@pytest.mark.parametrize("args", [["init", "--model", "a.h5", "--width", "100000", "--layers", "10"],
                                  ["init", "--model", "b.h5", "--input-dim", "4000000000"],
                                  ["init", "--model", "c.h5", "--branch", "mlp", "--hidden", "100000000"]],
                         ids=["width", "input-dim", "branch"])
def test_cli_refusal_is_one_line(tmp_path, args):
    """issue 18 item 5: the command line prints one line and exits 2 (no ArrayMemoryError traceback)."""
    proc = subprocess.run([sys.executable, "-m", "deepnet", *args], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("deepnet: error: a model of width ") and "MemAvailable" in lines[0]
    assert os.listdir(tmp_path) == []
