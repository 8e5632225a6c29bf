"""Mach inference: a section's own head on the stack below it, or on its distilled input alone.

``evaluate_section`` (one process, `deepnet eval MODEL --section k [--synthetic]`) reads the shards it
needs from a Mach model; ``evaluate_sections`` is the same for every section at once at the end of a Mach
run, the test images going up through the ranks.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from deepnet.errors import ConfigError
from deepnet.flags import int_at_least
from deepnet.formats import shards
from deepnet.formats.mach_state import read_mach
from deepnet.kernels.loader import LayerKernels, kernels_for
from deepnet.nn import heads as _heads
from deepnet.nn.distill import DistilledInput
from deepnet.nn.losses import softmax_cross_entropy
from deepnet.training.data_plan import model_data

#: Images per forward pass.
EVAL_BATCH = 1024

#: The tag of the states going up in a run's final evaluation (above the run's other tags).
TAG_EVAL_UP = (8 << 20)


def forward(params: np.ndarray, kernels: LayerKernels, alpha: float, h: np.ndarray, chunk_layers: int) -> None:
    """h (w, n) through the rows of ``params``, in place, ``chunk_layers`` rows a kernel call."""
    for start in range(0, params.shape[0], chunk_layers):
        kernels.forward(params[start:start + chunk_layers], h, alpha)


def _figures(head: dict[str, np.ndarray], h: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(summed loss, correct) of the head on states h (w, n)."""
    loss, accuracy, _ = softmax_cross_entropy(_heads.output_head(head, h.T), y)
    return loss * y.shape[0], accuracy * y.shape[0]


def evaluate_sections(section: Any, ranks: Any, test: tuple[np.ndarray, np.ndarray]) -> dict[str, float]:
    """This rank's section on the test images: its head on the stack below it (``test_*``) and, for a
    section k >= 1, on its distilled input alone (``synthetic_test_*``). Every rank calls it together."""
    x, y = test
    chunk = max(stop - start for start, stop in section.cores[section.batch].bounds)
    sums = np.zeros(4)
    for lo in range(0, x.shape[0], EVAL_BATCH):
        hi = min(x.shape[0], lo + EVAL_BATCH)
        if section.first:
            h = np.ascontiguousarray(_heads.input_head(section.heads, x[lo:hi]).T)
        else:
            h = ranks.recv((section.width, hi - lo), ranks.rank - 1, TAG_EVAL_UP)
        forward(section.params, section.kernels, section.alpha, h, chunk)
        if not section.last:
            ranks.send(h, ranks.rank + 1, TAG_EVAL_UP)
        sums[:2] += _figures(section.heads, h, y[lo:hi])
        if section.distill is not None:
            s = np.ascontiguousarray(section.distill.predict(x[lo:hi]).T)
            forward(section.params, section.kernels, section.alpha, s, chunk)
            sums[2:] += _figures(section.heads, s, y[lo:hi])
    n = x.shape[0]
    out = {"test_loss": sums[0] / n, "test_acc": sums[1] / n}
    if section.distill is not None:
        out.update(synthetic_test_loss=sums[2] / n, synthetic_test_acc=sums[3] / n)
    return {k: float(v) for k, v in out.items()}


def evaluate_section(model: str | os.PathLike, section: int, *, synthetic: bool = False, samples: int | None = None,
                     batch: int = EVAL_BATCH, chunk_layers: int = 1000, data: str | None = None,
                     data_dir: Any = None) -> dict:
    """Section ``section`` of the Mach model ``model`` on the first ``samples`` test images (None: all) of
    its data (or ``data``): its own head on the stack of sections 0..section, or (``synthetic``) on its
    distilled input model alone."""
    root = os.fspath(model)
    int_at_least("section", section, 0)
    if not shards.is_sharded(root):
        raise ConfigError(f"{root} is not a Mach model (--section applies to models trained with --mode mach)")
    started = time.perf_counter()
    with shards.open_root(root) as opened:
        mf = opened.file
        state = read_mach(mf.h5, root, width=mf.width, input_dim=mf.input_dim, n_classes=mf.n_classes)
        if state is None:
            raise ConfigError(f"{root} has no Mach sections (train it with --mode mach first)")
        count = len(state.sections)
        if not 0 <= section < count:
            raise ConfigError(f"--section must be in 0..{count - 1} ({root} has {count} sections), got {section}")
        if synthetic and section == 0:
            raise ConfigError("--synthetic: section 0 takes the raw input through the input head; it has no "
                              "distilled input model (use --section 1 or above)")
        heads = mf.read_heads()
        own = heads if section == count - 1 else state.sections[section].head
        distill = DistilledInput(state.sections[section].distill) if synthetic else None
        used = [section] if synthetic else list(range(section + 1))
        cores = [opened.read_core(k) for k in used]
        layers = sum(opened.shards[k].layers for k in used)
        kernels, alpha, step = kernels_for(mf.activation, mf.width), mf.alpha, mf.step
        dataset = model_data(mf, data, data_dir)
    try:
        x, y = dataset.required_test(samples, "to evaluate on")
    finally:
        dataset.close()
    loss_sum = correct = 0.0
    for lo in range(0, x.shape[0], batch):
        hi = min(x.shape[0], lo + batch)
        h = distill.predict(x[lo:hi]) if synthetic else _heads.input_head(heads, x[lo:hi])
        h = np.ascontiguousarray(h.T)
        for core in cores:
            forward(core, kernels, alpha, h, chunk_layers)
        part = _figures(own, h, y[lo:hi])
        loss_sum += part[0]
        correct += part[1]
    seconds = time.perf_counter() - started
    n = int(y.shape[0])
    return {"model": root, "step": step, "section": section, "sections": count, "synthetic": synthetic,
            "layers": layers, "samples": n, "loss": loss_sum / n, "accuracy": correct / n, "seconds": seconds,
            "samples_per_s": n / seconds}
