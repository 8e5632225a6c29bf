"""`deepnet diagnose M`: what happens across the depth of a model's core, band by band, for a probe batch.

The core is cut into bands of consecutive layers (``--bands``, default 100). The probe batch (the first
``--probe-samples`` test samples of the model's data, through its input transform) goes forward through
the core, streamed from the file piece by piece through training's weight store, saving checkpoints as
training's forward does; then the gradient of its loss goes back with the compiled backward at learning
rate 0 (nothing changes), recomputing from those checkpoints. Per band:

- ``h_norm``: the mean over the probe of ||h|| at the band's end;
- ``update_norm``: the mean of ||alpha * act(h W + b)|| at the band's first layer (NumPy, one layer);
- ``band_change``: the mean of ||h_end - h_start||, what the whole band adds;
- ``grad_norm``: the mean of ||dLoss/dh|| at the band's start (per sample; the loss is the batch mean);
- ``weight_norm``: the mean over the band's layers of ||[W_i | b_i]||;
- ``weight_change``: the mean over the band's layers of ||[W_i | b_i] - initial||, the initial weights
  drawn again from the model's seed on the fly (no copy is kept).

Every thread takes its own share of the probe's samples through a piece, forward and back, and its
share of the piece's rows for the weight figures; the threads meet once per piece. Costs two reads of
the core, one forward and one backward of the probe (the work of a training step at the probe's batch
size) and drawing w*w numbers per layer. Without the gradient (``gradient=False``) it is one evaluation
of the probe and the draws (bench/README.md, "deepnet diagnose", has the times).

With ``--teacher T`` the probe is the teacher's data and each band also gets the unit correlations of
deepnet.tools.teacher_match.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from typing import Any

import numpy as np

from deepnet import activations
from deepnet.data.dataset import Dataset
from deepnet.errors import ConfigError
from deepnet.flags import int_at_least
from deepnet.formats.create import core_stream
from deepnet.formats.hdf5 import ModelFile
from deepnet.kernels.loader import LayerKernels, kernels_for
from deepnet.nn import heads as _heads
from deepnet.nn.engine import MIN_SPLIT_BLOCK, choose_save_every
from deepnet.nn.losses import loss_and_gradient
from deepnet.nn.stores import WeightStore, file_store
from deepnet.nn.threads import default_threads
from deepnet.tools.teacher_match import match_bands
from deepnet.training.data_plan import model_data

#: Layers of one piece of the core at most (inside one band; fewer at large widths, by PIECE_BYTES): one
#: read, one forward kernel call per thread, and the threads meet once per piece.
PIECE_LAYERS = 100_000
#: Bytes of rows one piece covers at most.
PIECE_BYTES = 8 << 20
#: Bytes of the blocks a thread copies rows into for a backward call: they stay in its L2 cache.
CALL_BYTES = 256 << 10

#: The columns of a band's row, in the order of the table.
BAND_FIGURES = ("h_norm", "update_norm", "band_change", "grad_norm", "weight_norm", "weight_change")


def band_bounds(layers: int, bands: int) -> list[tuple[int, int]]:
    """``bands`` contiguous (first, stop) ranges of ``layers`` (fewer if there are fewer layers)."""
    bands = min(bands, layers)
    edges = np.linspace(0, layers, bands + 1).round().astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _mean_norm(a: np.ndarray) -> float:
    """Mean over columns (samples) of the L2 norm over rows (units) of a (w, n) array."""
    return float(np.sqrt(np.einsum("ij,ij->j", a, a, dtype=np.float64)).mean())


def _rows_within(nbytes: int, row_bytes: int) -> int:
    return max(1, nbytes // row_bytes)


class _WeightFigures:
    """The sums of ||row|| and ||row - initial row|| over the core, each piece's rows split between the
    threads; the initial rows are drawn again on the fly from the model's seed (the compiled
    ``initial_change_sums``: NumPy's stream, bit for bit, with no buffer)."""

    def __init__(self, kernels: LayerKernels, seed: int, init_scale: float, width: int, threads: int) -> None:
        self.change_sums = kernels.calls.initial_change_sums
        self.seed, self.scale, self.width, self.drawn = int(seed), float(init_scale), width, width * width
        self.threads = threads

    def _stream_at(self, layer: int) -> tuple[int, int]:
        """The 128-bit state and increment of the creation's stream before layer ``layer``'s draws."""
        state = core_stream(self.seed, layer, self.width).bit_generator.state["state"]
        return state["state"], state["inc"]

    def tasks(self, rows: np.ndarray, first: int) -> list:
        """One callable per thread returning (norm sum, change sum) of its share of ``rows``."""
        edges = np.linspace(0, rows.shape[0], self.threads + 1).astype(int)

        def share(lo: int, hi: int) -> tuple[float, float]:
            return self.change_sums(rows[lo:hi], self.drawn, *self._stream_at(first + lo), -self.scale, self.scale)

        return [lambda lo=int(lo), hi=int(hi): share(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]


class _Checkpoints:
    """The states a forward saves every ``every`` layers of each piece, for the backward."""

    def __init__(self, pieces: list[tuple[int, int]], every: int, width: int, batch: int) -> None:
        counts = [-(-(stop - lo) // every) for lo, stop in pieces]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(int)
        self.every = every
        self.states = np.empty((int(self.offsets[-1]), width * batch), np.float32)

    def of(self, k: int) -> np.ndarray:
        return self.states[self.offsets[k]:self.offsets[k + 1]]


class _ProbeParts:
    """The probe cut into one contiguous run of samples per thread. Nothing is updated, so the samples
    are independent forward and back: each thread runs its own through a piece of the core with its own
    checkpoints and scratch (going back, a block at a time through its own copy of the rows: the kernel
    writes them, the store's are read-only), and the threads meet once per piece."""

    def __init__(self, kernels: LayerKernels, alpha: float, h: np.ndarray, threads: int,
                 pieces: list[tuple[int, int]] | None, layers: int) -> None:
        width, batch = h.shape
        parts = max(1, min(threads, batch // MIN_SPLIT_BLOCK))
        edges = np.linspace(0, batch, parts + 1).round().astype(int)
        self.kernels, self.alpha = kernels, alpha
        self.h = [np.ascontiguousarray(h[:, a:b]) for a, b in zip(edges[:-1], edges[1:])]
        self.g: list[np.ndarray] = []
        self.saves: list[_Checkpoints] = []
        if pieces is not None:
            longest = max(stop - lo for lo, stop in pieces)
            for hp in self.h:
                every = choose_save_every(layers, width, hp.shape[1], min(longest, PIECE_LAYERS))
                self.saves.append(_Checkpoints(pieces, every, width, hp.shape[1]))
        self.work = [np.empty(kernels.workspace_size(width, hp.shape[1], save.every if save else 1),
                              np.float32) for hp, save in zip(self.h, self.saves or [None] * parts)]
        row_bytes = 4 * (width * width + width)
        # a block of whole checkpoint segments, its rows within CALL_BYTES
        self.block = [save.every * max(1, _rows_within(CALL_BYTES, row_bytes) // save.every) for save in self.saves]
        self.rows = [np.empty((block, width * width + width), np.float32) for block in self.block]

    def state(self) -> np.ndarray:
        """h of the whole probe, (width, batch)."""
        return np.concatenate(self.h, axis=1)

    def forward_tasks(self, rows: np.ndarray, k: int) -> list:
        """Callables taking each part through piece ``k``'s ``rows`` (saving checkpoints if kept)."""
        return [lambda p=p: self.kernels.forward(rows, self.h[p], self.alpha,
                                                 self.saves[p].of(k) if self.saves else None,
                                                 self.saves[p].every if self.saves else 0, self.work[p])
                for p in range(len(self.h))]

    def backward_tasks(self, rows: np.ndarray, k: int) -> list:
        """Callables taking each part's gradient back through piece ``k`` at learning rate 0."""

        def back(p: int) -> None:
            every, saves, block = self.saves[p].every, self.saves[p].of(k), self.block[p]
            for lo in reversed(range(0, rows.shape[0], block)):
                own = self.rows[p][:min(rows.shape[0], lo + block) - lo]
                np.copyto(own, rows[lo:lo + own.shape[0]])
                self.kernels.backward(own, saves[lo // every:], every, self.g[p], self.alpha, 0.0, self.work[p], 1)

        return [lambda p=p: back(p) for p in range(len(self.h))]


def diagnose_depth(model: str | os.PathLike, *, bands: int = 100, probe_samples: int = 64, gradient: bool = True,
                   teacher: str | os.PathLike | None = None, data: str | None = None, data_dir: Any = None) -> dict:
    """The figures of the module docstring for ``model`` (a dense model file, or a sharded root); without
    ``gradient`` no backward pass (``grad_norm`` is None); with ``teacher``, the probe is the teacher's data
    and each band also gets deepnet.tools.teacher_match's."""
    int_at_least("bands", bands, 1)
    int_at_least("probe-samples", probe_samples, 1)
    if teacher is not None:
        if data is not None:
            raise ConfigError("--teacher probes with the teacher's data; --data cannot be given with it")
        data = f"teacher:{teacher}"
    started = time.perf_counter()
    with ModelFile.open(model, "r") as mf, ExitStack() as stack:
        dataset = model_data(mf, data, data_dir)
        try:
            x, y = _probe(dataset, probe_samples)
        finally:
            dataset.close()
        width, alpha = mf.width, float(mf.alpha)
        kernels = kernels_for(mf.activation, width)
        act = activations.get(mf.activation).forward_np
        heads = mf.read_heads()
        bounds = band_bounds(mf.layers, bands)
        store = file_store(mf)
        stack.callback(store.close)
        pieces = _pieces(bounds, store)
        threads = default_threads()
        figures = _WeightFigures(kernels, mf.seed, float(mf.init_scale), width, threads)
        probe = _ProbeParts(kernels, alpha, np.ascontiguousarray(_heads.input_head(heads, x).T), threads,
                            pieces if gradient else None, mf.layers)
        rows_out, unit_acts, first_weights = [], [], []
        with ThreadPoolExecutor(threads, thread_name_prefix="deepnet-diagnose") as pool:
            k, reads = 0, store.forward_chunks(pieces)
            for first, stop in bounds:
                start = probe.state()
                norms = changes = 0.0
                while k < len(pieces) and pieces[k][0] < stop:
                    lo, rows = next(reads)
                    if lo == first:
                        w0, b0 = rows[0, :width * width].reshape(width, width), rows[0, width * width:]
                        unit_acts.append(act((start.T @ w0 + b0).astype(np.float64)))
                        first_weights.append(w0.copy())
                    calls = [pool.submit(task) for task in probe.forward_tasks(rows, k) + figures.tasks(rows, lo)]
                    for norm, change in [call.result() for call in calls][len(probe.h):]:
                        norms, changes = norms + norm, changes + change
                    k += 1
                end = probe.state()
                rows_out.append({"first_layer": first, "layers": stop - first,
                                 "update_norm": float(np.linalg.norm(alpha * unit_acts[-1], axis=1).mean()),
                                 "h_norm": _mean_norm(end), "band_change": _mean_norm(end - start),
                                 "grad_norm": None, "weight_norm": norms / (stop - first),
                                 "weight_change": changes / (stop - first)})
            h = probe.state()
            loss, accuracy, dlogits = loss_and_gradient(dataset.record.loss, _heads.output_head(heads, h.T), y)
            if gradient:
                g = _heads.output_gradients(heads, h.T, dlogits).core
                _backward(probe, pool, store, pieces, bounds, rows_out, g)
        out = {"model": os.fspath(model), "step": mf.step, "layers": mf.layers, "width": width,
               "activation": mf.activation, "probe": dataset.name, "probe_samples": probe_samples,
               "loss_kind": dataset.record.loss, "loss": loss, "accuracy": accuracy, "bands": rows_out}
        if teacher is not None:
            out["teacher"], matches = match_bands(teacher, x, mf.layers, [b[0] for b in bounds], unit_acts,
                                                  first_weights)
            for row, match in zip(rows_out, matches):
                row.update(match)
    out["seconds"] = time.perf_counter() - started
    return out


def _pieces(bounds: list[tuple[int, int]], store: WeightStore) -> list[tuple[int, int]]:
    """(first, stop) of each piece: within one band and one of the store's chunks (a memory-mapped
    store's are contiguous in the file), at most PIECE_LAYERS and PIECE_BYTES."""
    most = min(PIECE_LAYERS, _rows_within(PIECE_BYTES, 4 * store.row_size))
    cuts = {start for start, _ in store.bounds(most)}
    cuts.update(lo for first, stop in bounds for lo in range(first, stop, most))
    edges = sorted(cuts) + [store.layers]
    return list(zip(edges[:-1], edges[1:]))


def _backward(probe: _ProbeParts, pool: ThreadPoolExecutor, store: WeightStore, pieces: list[tuple[int, int]],
              bounds: list[tuple[int, int]], rows_out: list[dict], g: np.ndarray) -> None:
    """The probe's gradient ``g`` (width, batch) back through every piece (the core read again, last
    piece first, and not changed), each band's ``grad_norm`` taken at its start."""
    edges = np.cumsum([0] + [hp.shape[1] for hp in probe.h])
    probe.g = [np.ascontiguousarray(g[:, a:b], dtype=np.float32) for a, b in zip(edges[:-1], edges[1:])]
    band = len(bounds) - 1
    for k, (lo, rows) in zip(range(len(pieces) - 1, -1, -1), store.forward_chunks(pieces[::-1])):
        for call in [pool.submit(task) for task in probe.backward_tasks(rows, k)]:
            call.result()
        if lo == bounds[band][0]:
            rows_out[band]["grad_norm"] = _mean_norm(np.concatenate(probe.g, axis=1))
            band -= 1


def _probe(dataset: Dataset, samples: int) -> tuple[np.ndarray, np.ndarray]:
    """The first ``samples`` test samples of ``dataset`` (refused if it has none)."""
    return dataset.required_test(samples, "to take the probe batch from", "probe-samples")


def build_depth_figure(result: dict, *, width: int = 1200, height: int = 800, dpi: int = 100) -> Any:
    """A matplotlib figure of ``diagnose_depth``'s result: every band figure against depth, log scales."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    depth = np.array([b["first_layer"] + b["layers"] / 2 for b in result["bands"]])
    titles = {"h_norm": "||h|| at the band's end", "update_norm": "||alpha act(hW+b)|| (band's first layer)",
              "band_change": "||h_end - h_start|| of the band", "grad_norm": "||dLoss/dh|| at the band's start",
              "weight_norm": "||[W|b]|| per layer", "weight_change": "||[W|b] - initial|| per layer"}
    panels = [(key, titles[key]) for key in BAND_FIGURES if result["bands"][0][key] is not None]
    if "teacher" in result:
        panels += [("corr_mean", "teacher units' best correlation (mean, min)"),
                   ("row_norm_matched", "W_row_norm: matched, unmatched units")]
    columns = (len(panels) + 1) // 2
    for i, (key, title) in enumerate(panels):
        ax = fig.add_subplot(2, columns, i + 1)
        values = np.array([b[key] for b in result["bands"]], np.float64)
        ax.plot(depth, values, marker=".", linewidth=1)
        partner = {"corr_mean": "corr_min", "row_norm_matched": "row_norm_unmatched"}.get(key)
        if partner is not None:
            ax.plot(depth, [np.nan if b[partner] is None else b[partner] for b in result["bands"]], marker=".",
                    linewidth=1)
        if np.all(values > 0) and values.max() / values.min() > 20:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("layer")
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{os.path.basename(result['model'])}: {result['layers']:,} layers x width {result['width']}, "
                 f"step {result['step']}, probe of {result['probe_samples']} test samples of {result['probe']} "
                 f"({result['loss_kind']} loss {result['loss']:.3f})", fontsize=10)
    fig.tight_layout()
    return fig
