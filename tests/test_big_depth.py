"""Billion-layer streaming at tiny sizes: the chunk length chosen for the user, memory bounded whatever
the depth, and the page-releasing path of the memory-mapped store (pread/pwrite, posix_fadvise)
giving bit-identical results.
"""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from deepnet import DeepNet, ModelFile
from deepnet.formats import create, h5io
from deepnet.kernels.loader import kernels_for
from deepnet.nn import engine as engine_mod
from deepnet.nn import stores
from deepnet.nn.engine import CoreEngine, choose_chunk_layers, choose_save_every
from deepnet.nn.stores import MappedStore, WeightStore, release_pages
from helpers import make_model, read_weights

BILLION = 1_000_000_000


class Shape(WeightStore):
    """A store with only a shape: enough to size an engine's buffers."""

    def __init__(self, layers: int, width: int) -> None:
        self.layers, self.row_size = layers, width * width + width


def test_chunk_length_for_a_billion_layers_at_width_2():
    assert choose_chunk_layers(100_000, BILLION, 6) == 1_000_000           # 1000 chunks of 24 MB
    assert choose_chunk_layers(100_000, 10_000_000, 20) == 100_000         # the usual sizes: unchanged
    assert choose_chunk_layers(100_000, 200_000_000, 6) == 200_000
    assert choose_chunk_layers(2_000_000, BILLION, 6) == 2_000_000         # longer asked: kept
    assert choose_chunk_layers(100_000, 50, 6) == 50                       # never beyond the core
    # Width 32 (4224-byte rows): the 64 MiB cap keeps the requested length.
    assert choose_chunk_layers(100_000, BILLION, 32 * 33) == 100_000
    # Lengthened chunks stay within MAX_CHUNK_BYTES.
    for width in (1, 2, 4, 8):
        row = width * width + width
        n = choose_chunk_layers(1_000, 10 * BILLION, row)
        assert n == 1_000 or 4 * row * n <= engine_mod.MAX_CHUNK_BYTES


def test_chunks_in_ram_cover_a_million_layers_or_the_whole_core():
    """In RAM a chunk is a view, so a kernel call covers at least IN_MEMORY_CHUNK_LAYERS whatever is asked
    (each backward call costs its threads' start and finish); a store that reads chunks keeps the ask."""
    kernels = kernels_for("softsign", 2)
    in_ram = stores.InMemoryStore(np.zeros((3_000_000, 6), np.float32))
    assert CoreEngine(in_ram, kernels, 2, 1e-3, 100_000, threads=1).chunk_layers == stores.IN_MEMORY_CHUNK_LAYERS
    assert CoreEngine(in_ram, kernels, 2, 1e-3, 2_500_000, threads=1).chunk_layers == 2_500_000
    small = CoreEngine(stores.InMemoryStore(np.zeros((200, 6), np.float32)), kernels, 2, 1e-3, 50, threads=1)
    assert small.chunk_layers == 200 and small._bounds == [(0, 200)]
    assert CoreEngine(Shape(3_000_000, 2), kernels, 2, 1e-3, 100_000, threads=1).chunk_layers == 100_000


def test_engine_memory_at_a_billion_layers_is_bounded():
    kernels = kernels_for("softsign", 2)
    engine = CoreEngine(Shape(BILLION, 2), kernels, 2, 1e-3, 100_000, threads=2)
    assert engine.chunk_layers == 1_000_000 and len(engine._bounds) == 1000
    for batch in (1, 16, 256):
        save_every = choose_save_every(BILLION, 2, batch, engine.chunk_layers)
        saves = -(-BILLION // save_every) * 4 * 2 * batch
        assert saves <= engine_mod.MAX_SAVED_STATE_BYTES + 1000 * 4 * 2 * batch   # one ragged save a chunk
        assert engine.buffer_bytes(batch) < 300 << 20
    # Ten times deeper: the same bound (no memory grows with the depth).
    deeper = CoreEngine(Shape(10 * BILLION, 2), kernels, 2, 1e-3, 100_000, threads=2)
    assert deeper.buffer_bytes(16) < 300 << 20


def test_release_rule(monkeypatch):
    monkeypatch.delenv("DEEPNET_RELEASE_PAGES", raising=False)
    gib = 1 << 30
    assert release_pages(24 * 10**9, mem_total=24 * gib)          # 1B x width 2 on this machine
    assert not release_pages(8 * 10**8, mem_total=24 * gib)       # 10M x width 4: kept mapped
    assert not release_pages(10**9, mem_total=None)               # nothing known: never
    monkeypatch.setenv("DEEPNET_RELEASE_PAGES", "1")
    assert release_pages(1, mem_total=24 * gib)
    monkeypatch.setenv("DEEPNET_RELEASE_PAGES", "0")
    assert not release_pages(10**12, mem_total=24 * gib)


def _tiny(tmp_path, name="orig.h5", layers=97, width=2):
    # Storage chunks of 10 layers: pieces of several storage chunks, a ragged last one.
    path = tmp_path / name
    ModelFile.create(path, layers=layers, width=width, activation="softsign", storage_chunk_layers=10,
                     init_scale=0.5, progress=False).close()
    return path


def _train(path, *, in_memory=False, chunk_layers=25, steps=3):
    rng = np.random.default_rng(5)
    losses = []
    with DeepNet.open(path, writable=True, in_memory=in_memory, chunk_layers=chunk_layers) as net:
        store = net.engine.store
        kind = (type(store).__name__, getattr(store, "release", None))
        for k in range(steps):
            b = (16, 5, 9)[k % 3]
            x = rng.uniform(0, 1, size=(b, 784)).astype(np.float32)
            y = rng.integers(0, 10, size=b)
            losses.append(net.train_step(x, y, layer_lr=0.3, head_lr=0.1).loss)
        net.save()
    with ModelFile.open(path) as f:
        marks = f.chunk_steps()
    return kind, losses, read_weights(path), marks


def test_released_pages_train_bit_identically(tmp_path, monkeypatch):
    original = _tiny(tmp_path)
    results = {}
    for mode, env in (("mapped", "0"), ("released", "1"), ("in_memory", "0")):
        path = tmp_path / f"{mode}.h5"
        shutil.copy(original, path)
        monkeypatch.setenv("DEEPNET_RELEASE_PAGES", env)
        results[mode] = _train(path, in_memory=mode == "in_memory")
    assert results["released"][0] == ("MappedStore", True)
    assert results["mapped"][0] == ("MappedStore", False)
    losses, (heads, core), marks = results["released"][1:]
    for other in ("mapped", "in_memory"):
        assert results[other][1] == losses
        assert np.array_equal(results[other][2][1], core)
        for key in heads:
            assert np.array_equal(results[other][2][0][key], heads[key])
    assert np.array_equal(marks, results["mapped"][3]) and (marks == 3).all()
    assert not np.array_equal(core, read_weights(original)[1])   # training moved the core


def test_released_store_reads_the_rows_the_map_holds(tmp_path):
    path = _tiny(tmp_path, layers=123, width=3)
    with ModelFile.open(path) as f:
        core = f.read_core()
        released = MappedStore(f, f.core_chunk_offsets(), f.chunk_step_offset(), release=True)
        try:
            assert not released.random_access and released.buffer_bytes(40) == 3 * (40 * 12 * 4 + 2 * 4096)
            bounds = released.bounds(40)
            got = {start: rows.copy() for start, rows in released.forward_chunks(bounds)}
        finally:
            released.close()
    assert sorted(got) == [s for s, _ in bounds]
    assert np.array_equal(np.concatenate([got[s] for s in sorted(got)]), core)


def test_chunk_offsets_without_chunk_iter(tmp_path, monkeypatch):
    path = _tiny(tmp_path, layers=95)
    with ModelFile.open(path) as f:
        fast = f.core_chunk_offsets()

    class NoIter:
        def __init__(self, dsid):
            self._id = dsid

        def __getattr__(self, name):
            if name == "chunk_iter":
                raise AttributeError(name)
            return getattr(self._id, name)

    real = h5py.Dataset.id

    monkeypatch.setattr(h5py.Dataset, "id", property(lambda self: NoIter(real.fget(self))))
    with ModelFile.open(path) as f:
        slow = f.core_chunk_offsets()
    assert fast is not None and np.array_equal(fast, slow) and len(fast) == 10


def test_init_writing_behind_makes_the_same_file(tmp_path, monkeypatch):
    a = tmp_path / "a.h5"
    ModelFile.create(a, layers=3000, width=2, activation="softsign", storage_chunk_layers=100, progress=False).close()
    monkeypatch.setattr(h5io.WriteBehind, "MIN_BYTES", 0)
    monkeypatch.setattr(h5io.WriteBehind, "LAG", 2)
    calls = []
    real = h5io.WriteBehind.wrote
    monkeypatch.setattr(h5io.WriteBehind, "wrote", lambda self: (calls.append(1), real(self)))
    monkeypatch.setattr(h5io, "WRITE_BLOCK_BYTES", 4096)   # many blocks
    b = tmp_path / "b.h5"
    ModelFile.create(b, layers=3000, width=2, activation="softsign", storage_chunk_layers=100, progress=False).close()
    assert len(calls) > 3
    (heads_a, core_a), (heads_b, core_b) = read_weights(a), read_weights(b)
    assert np.array_equal(core_a, core_b)
    for key in heads_a:
        assert np.array_equal(heads_a[key], heads_b[key])


@pytest.mark.parametrize("direct", [True, False])
def test_span_io_writes_exactly_its_bytes(tmp_path, direct):
    from deepnet.formats.direct import ALIGN, SpanIO, aligned_buffer, span_buffer_bytes

    rng = np.random.default_rng(3)
    size = 9 * ALIGN + 123
    data = rng.integers(0, 256, size=size, dtype=np.uint8)
    path = tmp_path / "spans.bin"
    path.write_bytes(data.tobytes())
    spans = SpanIO(str(path), writable=True, direct=direct)
    try:
        # aligned, unaligned at either end, inside one block, up to the end of the file
        for first, length in ((0, 2 * ALIGN), (100, 3 * ALIGN), (ALIGN + 8, 40), (5 * ALIGN - 12, 2 * ALIGN + 24),
                              (size - 300, 300), (4, size - 4)):
            buf = aligned_buffer(span_buffer_bytes(length))
            at = spans.read(buf, first, length)
            got = np.frombuffer(buf, np.uint8, count=length, offset=at)
            assert np.array_equal(got, data[first:first + length])
            new = rng.integers(0, 256, size=length, dtype=np.uint8)
            np.frombuffer(buf, np.uint8, count=length, offset=at)[:] = new
            spans.write(buf, at, first, length)
            data[first:first + length] = new
            del got
            assert np.array_equal(np.frombuffer(path.read_bytes(), np.uint8), data)
        assert spans.direct == (direct and spans.direct_fd is not None)
    finally:
        spans.close()


def test_released_pages_through_the_page_cache_train_the_same(tmp_path, monkeypatch):
    """Where O_DIRECT is refused: the same results through the page cache."""
    from deepnet.formats import direct

    original = _tiny(tmp_path)
    shutil.copy(original, tmp_path / "a.h5")
    shutil.copy(original, tmp_path / "b.h5")
    monkeypatch.setenv("DEEPNET_RELEASE_PAGES", "1")
    a = _train(tmp_path / "a.h5")
    real_init = direct.SpanIO.__init__
    monkeypatch.setattr(direct.SpanIO, "__init__",
                        lambda self, path, writable, direct=True: real_init(self, path, writable=writable, direct=False))
    b = _train(tmp_path / "b.h5")
    assert a[1] == b[1] and np.array_equal(a[2][1], b[2][1]) and np.array_equal(a[3], b[3])
