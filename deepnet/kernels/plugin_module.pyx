"""The compiled loops of one plugin activation, and nothing else.

``deepnet.kernels.jit`` copies this file as ``deepnet_act_<name>_<hash>.pyx`` next to the layer loops
rendered for the activation and compiles it on first use. The module exports the loops' kernel table
(KERNEL_TABLE) with what they were compiled from; the checked calls that run them (argument checks,
workspace, the backward pass's thread driver) are those of the package's build module in use
(``deepnet._kernels*``), compiled once, so a plugin compiles only its own loops.
"""

from cpython.pycapsule cimport PyCapsule_New

from deepnet.kernels.dn_runtime cimport DN_TABLE_CAPSULE, dn_kernel_table

include "_layer_loops.pxi"
