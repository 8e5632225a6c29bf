"""The backward kernel's own check of the weights it updated (the numerical guard's core check): it
returns False exactly when some updated weight is inf or nan, whichever thread, split, batch layout and
fusion ran the segment that overflowed, and True otherwise, in every build this CPU runs. The loops note
it as they write the weights (dn_finite): the any-width loops (widths 12 and 24) as well as the
specialised ones.
"""

from __future__ import annotations

import numpy as np
import pytest

from deepnet.kernels.loader import LayerKernels
from helpers import kernel_builds

SAVE_EVERY = 50


def _layers(module, width: int, batch: int) -> int:
    """Enough layers for a second thread, with a short last segment."""
    row = width * width + width
    return max(40 * SAVE_EVERY, int(1.5 * module.THREAD_MIN_WORK / (row * batch)) // SAVE_EVERY * SAVE_EVERY + 13)


def _case(module, width: int, batch: int, huge_segment: int | None):
    """relu layers long enough for a second thread; the saved state of ``huge_segment`` (if any) is
    ~1e30, so only that segment's recomputed inputs, and so its weight gradients, are huge (relu passes
    them on; the gradient flowing down stays small)."""
    rng = np.random.default_rng([width, batch])
    row = width * width + width
    layers = _layers(module, width, batch)
    params = (rng.uniform(-0.5, 0.5, (layers, row)) / np.sqrt(width)).astype(np.float32)
    saves = rng.standard_normal((-(-layers // SAVE_EVERY), width * batch)).astype(np.float32)
    if huge_segment is not None:
        saves[huge_segment] = np.abs(saves[huge_segment]) * 1e30 + 1e30
    g = rng.standard_normal((width, batch)).astype(np.float32)
    kernels = LayerKernels("relu", module, module.activation_index("relu"))
    return kernels, params, saves, g, 1.0 / layers


def _options(kernels: LayerKernels, width: int, batch: int):
    blocks = [b for b in kernels.backward_blocks(width) if batch >= 8]
    return [(1, block, "blocks") for block in (blocks or [8])] + [
        (2, block, split) for block in (blocks or [8]) for split in ("blocks", "segments")]


@pytest.mark.parametrize("module", kernel_builds(), ids=lambda m: m.__name__)
@pytest.mark.parametrize("width,batch", [(4, 16), (4, 32), (4, 4), (3, 16), (8, 16), (12, 16), (24, 16)])
@pytest.mark.parametrize("where", ["top", "middle", "bottom", None])
@pytest.mark.parametrize("fused", [True, False])
def test_backward_reports_non_finite_updates(module, width, batch, where, fused):
    n_seg = -(-_layers(module, width, batch) // SAVE_EVERY)
    segment = {"top": n_seg - 1, "middle": n_seg // 2, "bottom": 0, None: None}[where]
    kernels, params, saves, g0, alpha = _case(module, width, batch, segment)
    previous = module.set_fused_backward(fused)
    try:
        for threads, block, split in _options(kernels, width, batch):
            p, g = params.copy(), g0.copy()
            finite = kernels.backward(p, saves, SAVE_EVERY, g, alpha, 1e14, None, threads, block, split)
            rows_finite = np.isfinite(p).all(axis=1)
            assert finite == bool(rows_finite.all()), (threads, block, split)
            assert np.isfinite(g).all()
            if segment is None:
                assert finite
            else:   # rows of the huge segment overflowed (those with a unit relu passed), and no others
                lo, hi = segment * SAVE_EVERY, (segment + 1) * SAVE_EVERY
                assert not finite and not rows_finite[lo:hi].all()
                assert rows_finite[:lo].all() and rows_finite[hi:].all()
    finally:
        module.set_fused_backward(previous)


@pytest.mark.parametrize("module", kernel_builds(), ids=lambda m: m.__name__)
@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("column", [7, 17], ids=["weight", "bias"])
def test_backward_reports_a_weight_that_was_already_non_finite(module, value, column):
    """A non-finite weight or bias stays non-finite through its update (lr = 0), and the check says so, on
    every thread count, split and batch layout."""
    kernels, params, saves, g0, alpha = _case(module, 4, 16, None)
    finite = params.copy()
    params[-1, column] = value    # the top layer's: the first segment back-propagated
    for threads, block, split in _options(kernels, 4, 16):
        assert not kernels.backward(params.copy(), saves, SAVE_EVERY, g0.copy(), alpha, 0.0, None, threads, block,
                                    split), (threads, block, split)
        assert kernels.backward(finite.copy(), saves, SAVE_EVERY, g0.copy(), alpha, 0.0, None, threads, block,
                                split), (threads, block, split)
