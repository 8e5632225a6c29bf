"""Compiled residual-layer kernels: h <- h + alpha * act(h W + b), forward and exact backward.

The loops themselves come from one template (``kernels/layer_loops.pxi.tp``) rendered for every registered
built-in activation and a set of widths; this module is the thin checked layer over them. Each call
runs a whole chunk of layers without the GIL and without touching a Python object per layer.

Layouts (see DESIGN.md): activations are ``(width, batch)`` C-contiguous float32 (batch innermost);
a chunk of parameters is ``(n_layers, width*width + width)`` float32, each row ``[W (in, out) | b]``.
"""

from libc.string cimport memcpy
from libc.stdlib cimport malloc, free

ctypedef void (*forward_fn)(
    const float* params, Py_ssize_t n_layers, float* h, Py_ssize_t w, Py_ssize_t B,
    float alpha, float* saves, Py_ssize_t save_every, float* scratch, Py_ssize_t part, Py_ssize_t n_parts,
) noexcept nogil

ctypedef void (*backward_fn)(
    float* params, Py_ssize_t n_layers, const float* saves, Py_ssize_t save_every,
    float* g, Py_ssize_t w, Py_ssize_t B, float alpha, float lr,
    float* hbuf, float* dbuf, Py_ssize_t set_floats, float* grad, float* scratch, Py_ssize_t scratch_floats,
    int threads,
) noexcept nogil

include "_layer_loops.pxi"

_fill_kernel_tables()


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


def sleep_count() -> int:
    """Waits between the backward's threads so far that ended in sleeping rather than spinning."""
    return dn_sleeps


cdef extern from *:
    """
    static int dn_cpu_has_avx2_fma(void) {
    #if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    #else
        return 0;
    #endif
    }
    /* libgcc's checks also ask the OS (XCR0) whether it saves the 512-bit register state. */
    static int dn_cpu_has_avx512(void) {
    #if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
        __builtin_cpu_init();
        return dn_cpu_has_avx2_fma() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl")
            && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
    #else
        return 0;
    #endif
    }
    #if defined(__AVX512F__) && defined(__AVX512VL__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__FMA__)
    #define DN_BUILT_FOR "avx512"
    #elif defined(__AVX2__) && defined(__FMA__)
    #define DN_BUILT_FOR "avx2+fma"
    #elif defined(__AVX__)
    #define DN_BUILT_FOR "avx"
    #elif defined(__SSE2__)
    #define DN_BUILT_FOR "sse2"
    #elif defined(__ARM_NEON)
    #define DN_BUILT_FOR "neon"
    #else
    #define DN_BUILT_FOR "generic"
    #endif
    """
    int dn_cpu_has_avx2_fma() noexcept nogil
    int dn_cpu_has_avx512() noexcept nogil
    const char* DN_BUILT_FOR


def cpu_has_avx2_fma() -> bool:
    """Whether this CPU runs AVX2 and FMA instructions (False off x86)."""
    return bool(dn_cpu_has_avx2_fma())


def cpu_has_avx512() -> bool:
    """Whether this CPU (and OS) runs AVX-512 F/VL/BW/DQ with AVX2 and FMA (False off x86)."""
    return bool(dn_cpu_has_avx512())


BUILT_FOR = DN_BUILT_FOR.decode()


def activation_index(str name) -> int:
    """Index of a compiled activation in this module's kernel table (ValueError if not compiled here)."""
    return ACTIVATION_NAMES.index(name)


cdef Py_ssize_t _variant(Py_ssize_t w) noexcept:
    cdef Py_ssize_t k
    for k in range(N_WIDTH_VARIANTS - 1):
        if WIDTH_VARIANTS[k] == w:
            return k
    return N_WIDTH_VARIANTS - 1


cdef Py_ssize_t _scratch_size(Py_ssize_t w) noexcept nogil:
    # block state, z and g of the generic-width and per-sample paths, plus slack to align the vectors
    # of the any-width path to 32 bytes (dn_align32)
    return 3 * w * MAX_BLOCK + 8


cdef Py_ssize_t _set_size(Py_ssize_t w, Py_ssize_t save_every) noexcept nogil:
    # one buffer set: a segment's states (or derivatives) for one batch block
    return save_every * w * DN_BACKWARD_BLOCK


def workspace_size(Py_ssize_t width, Py_ssize_t batch, Py_ssize_t save_every) -> int:
    """Floats of scratch a backward call needs: four buffer sets of a segment's states (twice a set:
    even narrow widths keep two vectors per unit) and of its derivatives (two per thread: one being
    back-propagated, one being recomputed), DN_GRAD_BUFFERS of a segment's weight gradients (segments
    in flight between the threads), and two threads' scratch."""
    return (12 * _set_size(width, save_every) + DN_GRAD_BUFFERS * save_every * _grad_stride(width)
            + 2 * _scratch_size(width))


cdef int _check_act(int act) except -1:
    if act < 0 or act >= N_ACTIVATIONS:
        raise ValueError(f"activation index {act} out of range (this module has {N_ACTIVATIONS})")
    return 0


def forward(int act, const float[:, ::1] params, float[:, ::1] h, float alpha,
            float[:, ::1] saves=None, Py_ssize_t save_every=0, float[::1] work=None,
            Py_ssize_t part=0, Py_ssize_t n_parts=1) -> None:
    """Forward h (width, batch) through every layer of ``params`` in place.

    If ``saves`` is given, h is copied into ``saves[k]`` before layer ``k * save_every`` of the chunk
    (the checkpoints the backward pass recomputes from). With ``n_parts`` > 1 only the ``part``-th run
    of the batch's columns is computed: threads may run the parts of one call at the same time, each
    with its own ``work``.
    """
    _check_act(act)
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
    cdef forward_fn fn = _FORWARD[act][_variant(w)]
    cdef const float* p = &params[0, 0] if n > 0 else NULL
    try:
        if n > 0:
            with nogil:
                fn(p, n, &h[0, 0], w, B, alpha, saves_ptr, save_every, z, part, n_parts)
    finally:
        if owned:
            free(z)


def backward(int act, float[:, ::1] params, const float[:, ::1] saves, Py_ssize_t save_every,
             float[:, ::1] g, float alpha, float lr, float[::1] work=None, int threads=1) -> None:
    """Back-propagate g (width, batch) through the chunk and SGD-update every layer in place.

    ``saves`` holds the states the forward pass saved for this chunk every ``save_every`` layers; on
    return g is the gradient at the chunk's input. Each layer's gradient is summed over the batch and
    the gradient flowing further down uses the layer's old weights. With ``threads`` > 1 a second
    thread takes half the batch's blocks, a segment behind the first (or, at a batch of one block,
    recomputes the next segment while the first back-propagates this one): the same result, bit for bit.
    """
    _check_act(act)
    cdef Py_ssize_t w = g.shape[0], B = g.shape[1], n = params.shape[0]
    if w < 1 or B < 1:
        raise ValueError("g must be (width, batch) with width, batch >= 1")
    if params.shape[1] != w * w + w:
        raise ValueError(f"params rows have {params.shape[1]} floats, width {w} needs {w * w + w}")
    if save_every < 1:
        raise ValueError("save_every must be >= 1")
    if n == 0:
        return
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
    cdef float* hbuf = buf
    cdef float* dbuf = hbuf + 8 * set_floats   # hbuf's four sets are twice the size (dn_backward_run)
    cdef float* grad = dbuf + 4 * set_floats
    cdef float* scratch = grad + DN_GRAD_BUFFERS * save_every * _grad_stride(w)
    cdef backward_fn fn = _BACKWARD[act][_variant(w)]
    try:
        with nogil:
            fn(&params[0, 0], n, &saves[0, 0], save_every, &g[0, 0], w, B, alpha, lr, hbuf, dbuf, set_floats,
               grad, scratch, _scratch_size(w), threads)
    finally:
        if owned:
            free(buf)
