/* A plugin activation's module: its loops and their kernel table, and nothing else.

   deepnet.kernels.jit copies this file as <module>.c next to the loops rendered for the activation
   (_layer_loops.h) and the runtime header, and compiles it with -DDN_MODULE=<module> on first use. The
   module exports the table with what the loops were compiled from (dn_add_table_attributes, as the
   build modules do); the checked calls that run the loops (argument checks, workspace, the backward
   pass's thread driver) are those of the package's build module in use (deepnet._kernels*), compiled
   once. No Cython step: a first use compiles only C, and little more than the loops. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "_layer_loops.h"

#define DN_STR(x) DN_STR_(x)
#define DN_STR_(x) #x
#define DN_CAT(a, b) DN_CAT_(a, b)
#define DN_CAT_(a, b) a##b

static int dn_exec(PyObject* module) { return dn_add_table_attributes(module, &dn_table); }

static PyModuleDef_Slot dn_slots[] = {{Py_mod_exec, (void*)dn_exec}, {0, NULL}};

static struct PyModuleDef dn_module = {
    PyModuleDef_HEAD_INIT, DN_STR(DN_MODULE), "The compiled loops of a plugin activation (deepnet.kernels.jit).",
    0, NULL, dn_slots, NULL, NULL, NULL,
};

PyMODINIT_FUNC DN_CAT(PyInit_, DN_MODULE)(void) { return PyModuleDef_Init(&dn_module); }
