"""Compiled residual-layer kernels: h <- h + alpha * act(h W + b), forward and exact backward.

The loops themselves come from one template (``kernels/layer_loops.h.tp``) rendered for every
built-in activation and a set of widths, over the shared C of ``kernels/dn_runtime.h``; this module is
the thin checked layer over them and over a plugin module's loops (``kernels=`` its KERNEL_TABLE), with
the backward pass's thread driver (``kernels/dn_driver.h``) compiled here once. Each call runs a whole
chunk of layers without the GIL and without touching a Python object per layer.

Layouts (see DESIGN.md): activations are ``(width, batch)`` C-contiguous float32 (batch innermost);
a chunk of parameters is ``(n_layers, width*width + width)`` float32, each row ``[W (in, out) | b]``.
"""

import sys

from cpython.pycapsule cimport PyCapsule_GetPointer
from libc.stdint cimport uint64_t
from libc.stdlib cimport free, malloc

from deepnet.kernels.dn_runtime cimport (DN_BACKWARD_BLOCK, DN_BACKWARD_BLOCK16, DN_BLOCKED_MIN_BATCH, DN_MAX_BLOCK,
                                         DN_TABLE_CAPSULE, DN_V16_HALVES_WIDTH, DN_V16_NATIVE, dn_add_table_attributes,
                                         dn_grad_stride, dn_kernel, dn_kernel_for, dn_kernel_table)

cdef extern from "dn_driver.h" nogil:
    const int DN_GRAD_BUFFERS
    const double DN_THREAD_MIN_WORK
    double dn_spin_seconds
    long dn_sleeps
    int dn_fuse
    int dn_two_pass
    void dn_forward(const dn_kernel* k, const float* params, Py_ssize_t n_layers, float* h, Py_ssize_t w,
                    Py_ssize_t B, float alpha, float* saves, Py_ssize_t save_every, float* scratch,
                    Py_ssize_t part, Py_ssize_t n_parts)
    int dn_backward(const dn_kernel* k, float* params, Py_ssize_t n_layers, const float* saves,
                     Py_ssize_t save_every, float* g, Py_ssize_t w, Py_ssize_t B, float alpha, float lr,
                     float* hbuf, float* dbuf, Py_ssize_t set_floats, float* grad, float* scratch,
                     Py_ssize_t scratch_floats, int threads, int block, int by_segments)
    int dn_cpu_has_avx2_fma()
    int dn_cpu_has_avx512()

cdef extern from "dn_initial.h" nogil:
    void dn_initial_change_sums(const float* rows, Py_ssize_t n, Py_ssize_t r, Py_ssize_t m, uint64_t state_hi,
                                uint64_t state_lo, uint64_t inc_hi, uint64_t inc_lo, double low, double range,
                                double* norms_out, double* changes_out)

# The built-in activations' loops, rendered from kernels/layer_loops.h.tp by setup.py.
cdef extern from "_layer_loops.h":
    const dn_kernel_table dn_table

# ACTIVATION_NAMES, WIDTH_VARIANTS, ACTIVATION_DEFINITIONS, BUILT_FOR, KERNEL_TABLE, activation_index():
# exported from the table, as a plugin's module exports its own.
dn_add_table_attributes(sys.modules[__name__], &dn_table)

# A backward call starts a second thread from this many multiply-adds (layers x (w*w + w) x batch).
THREAD_MIN_WORK = int(DN_THREAD_MIN_WORK)
# Whether this build's 16-lane vectors are one register each (AVX-512): only then is the backward's
# 16-sample layout (backward_blocks) worth measuring against the 8-sample one at every batch; elsewhere
# it runs, with the same results, but slower (except as BLOCK16_HALVES_WIDTH says).
BLOCK16_NATIVE = bool(DN_V16_NATIVE)
# The width at which, where they are not native, the 16-sample blocks of a one-block batch still run
# well split by segments (their paired pieces on two 8-lane halves: AVX2's registers hold them); 0: none.
BLOCK16_HALVES_WIDTH = int(DN_V16_HALVES_WIDTH)
# How backward's threads share a call: by the batch's blocks, or by segments in turn (see backward).
SPLITS = ("blocks", "segments")


def set_spin_seconds(double seconds) -> float:
    """How long a backward thread that has to wait for the other spins before it sleeps; returns the
    previous setting. Results never depend on it (tests set 0 to take the sleeping path every time).
    Set it only while no backward call runs."""
    global dn_spin_seconds
    if not seconds >= 0:
        raise ValueError(f"spin seconds must be >= 0, got {seconds}")
    previous = dn_spin_seconds
    dn_spin_seconds = seconds
    return previous


def set_fused_backward(bint enabled) -> bool:
    """Whether the backward pass of narrow widths recomputes a block in the same loop that
    back-propagates another (the default) or one after the other; returns the previous setting.
    Results never depend on it (tests compare the two bit for bit). Set it only while no backward
    call runs."""
    global dn_fuse
    previous = dn_fuse != 0
    dn_fuse = 1 if enabled else 0
    return previous


def set_two_pass_backward(bint enabled) -> bool:
    """Whether the segments split of widths 8, 16, 24, 32, ... carries g down a segment in a pass of its
    own and makes the weight gradients after handing g on (the default), or back-propagates in one
    pass; returns the previous setting. Results never depend on it (tests compare the two bit for
    bit). Set it only while no backward call runs."""
    global dn_two_pass
    previous = dn_two_pass != 0
    dn_two_pass = 1 if enabled else 0
    return previous


def sleep_count() -> int:
    """Waits between the backward's threads so far that ended in sleeping rather than spinning."""
    return dn_sleeps


def cpu_has_avx2_fma() -> bool:
    """Whether this CPU runs AVX2 and FMA instructions (False off x86)."""
    return bool(dn_cpu_has_avx2_fma())


def cpu_has_avx512() -> bool:
    """Whether this CPU (and OS) runs AVX-512 F/VL/BW/DQ with AVX2 and FMA (False off x86)."""
    return bool(dn_cpu_has_avx512())


cdef Py_ssize_t _scratch_size(Py_ssize_t w) noexcept nogil:
    # block state, z and g of the generic-width and per-sample paths, plus slack to align the vectors
    # of the any-width path to 32 bytes (dn_align32)
    return 3 * w * DN_MAX_BLOCK + 8


# The workspace's buffers start on a cache line (a float array from NumPy or malloc is only 16-byte
# aligned): a 16-lane vector stored across two lines costs two stores, and a layer stores 2w of them.
cdef Py_ssize_t _ALIGN_FLOATS = 16


cdef float* _cache_line(float* p) noexcept nogil:
    return <float*> ((<size_t> p + 63) & ~(<size_t> 63))


cdef Py_ssize_t _set_size(Py_ssize_t w, Py_ssize_t save_every) noexcept nogil:
    # one buffer set: a segment's states (or derivatives) for one batch block of either layout
    return save_every * w * DN_BACKWARD_BLOCK16


def workspace_size(Py_ssize_t width, Py_ssize_t batch, Py_ssize_t save_every) -> int:
    """Floats of scratch a backward call needs: four buffer sets of a segment's states and four of its
    derivatives (two per thread: one being back-propagated, one being recomputed), DN_GRAD_BUFFERS of a
    segment's weight gradients (segments in flight between the threads), two threads' scratch, and the
    slack to start them on a cache line."""
    return (8 * _set_size(width, save_every) + DN_GRAD_BUFFERS * save_every * dn_grad_stride(width)
            + 2 * _scratch_size(width) + _ALIGN_FLOATS)


cdef const dn_kernel_table* _table(object kernels, int act) except NULL:
    """The kernel table of ``kernels`` (a module's KERNEL_TABLE; None: this module's own), checked to hold
    activation ``act``."""
    cdef const dn_kernel_table* table = &dn_table
    if kernels is not None:
        table = <const dn_kernel_table*> PyCapsule_GetPointer(kernels, DN_TABLE_CAPSULE)
    if act < 0 or act >= table.n_activations:
        raise ValueError(f"activation index {act} out of range (the kernel table has {table.n_activations})")
    return table


def forward(int act, const float[:, ::1] params, float[:, ::1] h, float alpha,
            float[:, ::1] saves=None, Py_ssize_t save_every=0, float[::1] work=None,
            Py_ssize_t part=0, Py_ssize_t n_parts=1, kernels=None) -> None:
    """Forward h (width, batch) through every layer of ``params`` in place.

    If ``saves`` is given, h is copied into ``saves[k]`` before layer ``k * save_every`` of the chunk
    (the checkpoints the backward pass recomputes from). With ``n_parts`` > 1 only the ``part``-th run
    of the batch's columns is computed: threads may run the parts of one call at the same time, each
    with its own ``work``. ``kernels`` is the KERNEL_TABLE of the module whose loops run (a plugin's);
    None runs this module's own.
    """
    cdef const dn_kernel_table* table = _table(kernels, act)
    if n_parts < 1 or not 0 <= part < n_parts:
        raise ValueError(f"part {part} of {n_parts} is not a valid split")
    cdef Py_ssize_t w = h.shape[0], B = h.shape[1], n = params.shape[0]
    if w < 1 or B < 1:
        raise ValueError("h must be (width, batch) with width, batch >= 1")
    if params.shape[1] != w * w + w:
        raise ValueError(f"params rows have {params.shape[1]} floats, width {w} needs {w * w + w}")
    cdef float* saves_ptr = NULL
    if saves is not None:
        if save_every < 1:
            raise ValueError("save_every must be >= 1 when saves is given")
        if saves.shape[0] < (n + save_every - 1) // save_every or saves.shape[1] != w * B:
            raise ValueError("saves is too small for this chunk")
        saves_ptr = &saves[0, 0]
    cdef float* z
    cdef bint owned = work is None
    if owned:
        z = <float*> malloc(_scratch_size(w) * sizeof(float))
        if z == NULL:
            raise MemoryError()
    else:
        if work.shape[0] < _scratch_size(w):
            raise ValueError("work is too small")
        z = &work[0]
    cdef const dn_kernel* k = dn_kernel_for(table, act, w)
    cdef const float* p = &params[0, 0] if n > 0 else NULL
    try:
        if n > 0:
            with nogil:
                dn_forward(k, p, n, &h[0, 0], w, B, alpha, saves_ptr, save_every, z, part, n_parts)
    finally:
        if owned:
            free(z)


def backward_blocks(int act, Py_ssize_t width, kernels=None) -> tuple:
    """The batch blocks ``backward`` can run at this width, in samples: (8,), or (8, 16) where the
    16-sample layout is compiled (one 16-lane vector per unit; the same results bit for bit)."""
    cdef const dn_kernel_table* table = _table(kernels, act)
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    if dn_kernel_for(table, act, width).recompute_block16 != NULL:
        return (DN_BACKWARD_BLOCK, DN_BACKWARD_BLOCK16)
    return (DN_BACKWARD_BLOCK,)


def backward_block_count(Py_ssize_t batch, int block) -> int:
    """How many blocks ``backward`` cuts a batch into with ``block`` (one per sample below a batch of
    8, where each sample runs alone), for widths that have that block."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if batch < DN_BLOCKED_MIN_BATCH:
        return batch
    return (batch + block - 1) // block


def backward(int act, float[:, ::1] params, const float[:, ::1] saves, Py_ssize_t save_every,
             float[:, ::1] g, float alpha, float lr, float[::1] work=None, int threads=1, kernels=None,
             int block=8, str split="blocks") -> bool:
    """Back-propagate g (width, batch) through the chunk and SGD-update every layer in place; return
    whether every updated weight is finite (the loops note it as they write each weight).

    ``saves`` holds the states the forward pass saved for this chunk every ``save_every`` layers; on
    return g is the gradient at the chunk's input. Each layer's gradient is summed over the batch and
    the gradient flowing further down uses the layer's old weights. With ``threads`` > 1 a second
    thread shares the work as ``split`` says (one of ``SPLITS``): "blocks", half the batch's blocks
    each, a segment behind the first; "segments", every other segment each, with all its blocks,
    recomputed while the other thread back-propagates the segment above (so at a batch of one block
    whatever ``split`` says). The same result, bit for bit.
    ``block`` is the samples of a batch block (``backward_blocks``: 8, or 16 in 16-lane vectors where
    compiled), again the same result bit for bit. ``kernels`` is as for ``forward``.
    """
    cdef const dn_kernel_table* table = _table(kernels, act)
    cdef Py_ssize_t w = g.shape[0], B = g.shape[1], n = params.shape[0]
    if w < 1 or B < 1:
        raise ValueError("g must be (width, batch) with width, batch >= 1")
    if params.shape[1] != w * w + w:
        raise ValueError(f"params rows have {params.shape[1]} floats, width {w} needs {w * w + w}")
    if save_every < 1:
        raise ValueError("save_every must be >= 1")
    if block != DN_BACKWARD_BLOCK and block != DN_BACKWARD_BLOCK16:
        raise ValueError(f"block must be {DN_BACKWARD_BLOCK} or {DN_BACKWARD_BLOCK16}, got {block}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if n == 0:
        return True
    if saves.shape[0] < (n + save_every - 1) // save_every or saves.shape[1] != w * B:
        raise ValueError("saves is too small for this chunk")
    cdef Py_ssize_t need = workspace_size(w, B, save_every)
    cdef float* buf
    cdef bint owned = work is None
    if owned:
        buf = <float*> malloc(need * sizeof(float))
        if buf == NULL:
            raise MemoryError()
    else:
        if work.shape[0] < need:
            raise ValueError(f"work has {work.shape[0]} floats, needs {need}")
        buf = &work[0]
    cdef Py_ssize_t set_floats = _set_size(w, save_every)
    cdef float* hbuf = _cache_line(buf)
    cdef float* dbuf = hbuf + 4 * set_floats
    cdef float* grad = dbuf + 4 * set_floats
    cdef float* scratch = grad + DN_GRAD_BUFFERS * save_every * dn_grad_stride(w)
    cdef const dn_kernel* k = dn_kernel_for(table, act, w)
    cdef int finite
    cdef int by_segments = split == "segments"
    try:
        with nogil:
            finite = dn_backward(k, &params[0, 0], n, &saves[0, 0], save_every, &g[0, 0], w, B, alpha, lr, hbuf,
                                 dbuf, set_floats, grad, scratch, _scratch_size(w), threads, block,
                                 by_segments)
    finally:
        if owned:
            free(buf)
    return bool(finite)


def initial_change_sums(const float[:, ::1] rows, Py_ssize_t drawn, state, increment, double low,
                        double high) -> tuple:
    """(sum of ||row||, sum of ||row - initial row||) over ``rows``, in float64, in one pass.

    The initial rows' first ``drawn`` columns are float32(NumPy's PCG64 Generator.uniform(low, high))
    drawn from the generator state ``state`` (its 128-bit state and increment, as Python ints), row
    after row; their other columns are 0. Bit for bit NumPy's draws (kernels/dn_initial.h), with no
    buffer (bench/README.md has what it costs against NumPy's drawing and norms).
    """
    cdef Py_ssize_t n = rows.shape[0], r = rows.shape[1]
    if not 0 <= drawn <= r:
        raise ValueError(f"drawn must be within 0..{r}, got {drawn}")
    cdef uint64_t mask = 0xFFFFFFFFFFFFFFFF
    cdef uint64_t s_hi = (state >> 64) & mask, s_lo = state & mask
    cdef uint64_t i_hi = (increment >> 64) & mask, i_lo = increment & mask
    cdef double norms = 0.0, changes = 0.0
    if n == 0:
        return norms, changes
    with nogil:
        dn_initial_change_sums(&rows[0, 0], n, r, drawn, s_hi, s_lo, i_hi, i_lo, low, high - low, &norms,
                               &changes)
    return norms, changes
