"""The cache sizes the engine reads at run time, and that the segment length they choose never changes a
result (the recomputation is bit-identical to the forward pass)."""

from __future__ import annotations

import numpy as np
import pytest

from deepnet.errors import ConfigError
from deepnet.nn import caches
from deepnet.nn.engine import choose_save_every
from deepnet.nn.network import DeepNet
from helpers import make_model


def test_sizes_parse_and_the_l2_drives_the_segment_length(monkeypatch):
    assert caches._parse_size("512K") == 512 * 1024 and caches._parse_size("2M") == 2 << 20
    assert caches._parse_size("4096") == 4096
    monkeypatch.setenv(caches.L2_ENV, "512K")
    at_512k = choose_save_every(10_000_000, 4, 16, 10_000)
    monkeypatch.setenv(caches.L2_ENV, "2M")
    at_2m = choose_save_every(10_000_000, 4, 16, 10_000)
    assert (at_512k, at_2m) == (262_144 // (2 * 256 + 80), 1_048_576 // (2 * 256 + 80))  # 442, 1771 layers
    for bad in ("lots", "1K", "-5"):
        monkeypatch.setenv(caches.L2_ENV, bad)
        with pytest.raises(ConfigError, match=caches.L2_ENV):
            caches.l2_bytes()


def test_the_system_reports_a_plausible_l2(monkeypatch):
    monkeypatch.delenv(caches.L2_ENV, raising=False)
    assert 64 * 1024 <= caches.l2_bytes() <= 64 << 20


@pytest.mark.parametrize("in_memory", [True, False], ids=["in-memory", "streamed"])
def test_results_do_not_depend_on_the_l2_size(tmp_path, monkeypatch, in_memory):
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (16, 784)).astype(np.float32)
    y = rng.integers(0, 10, 16)
    cores = []
    for size in ("8K", "64K", "4M"):
        monkeypatch.setenv(caches.L2_ENV, size)
        path = make_model(tmp_path / f"m{size}.h5", layers=3000, width=4, activation="softsign")
        with DeepNet.open(path, writable=True, in_memory=in_memory, chunk_layers=1000) as net:
            for _ in range(2):
                net.train_step(x, y, layer_lr=0.1, head_lr=0.1)
            net.save()
            cores.append(net.file.read_core())
    assert all(np.array_equal(cores[0], core) for core in cores[1:])
