# Cython's view of dn_runtime.h (deepnet/_kernels.pyx is its one Cython user; a plugin's module is C):
# only the names Cython code uses; the C definitions are in the header.

cdef extern from "dn_runtime.h" nogil:
    ctypedef struct dn_kernel:
        void* recompute_block16     # a function pointer in C; only compared with NULL here
    ctypedef struct dn_kernel_table:
        int n_activations
        const char* built_for
    const char* DN_TABLE_CAPSULE
    const int DN_MAX_BLOCK
    const int DN_BACKWARD_BLOCK
    const int DN_BACKWARD_BLOCK16
    const int DN_BLOCKED_MIN_BATCH
    const int DN_V16_NATIVE
    const int DN_V16_HALVES_WIDTH
    Py_ssize_t dn_grad_stride(Py_ssize_t w)
    const dn_kernel* dn_kernel_for(const dn_kernel_table* t, int act, Py_ssize_t w)

cdef extern from "dn_runtime.h":
    int dn_add_table_attributes(object module, const dn_kernel_table* t) except -1
