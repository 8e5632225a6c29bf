"""Renders the kernel template (``layer_loops.h.tp``) for a list of activations into C.

Used by ``setup.py`` to build the built-in activations into ``deepnet._kernels`` and, later, to compile
a plugin's activation from the very same loops. Pure Python with no import of the compiled package, so
the build can run it before anything is compiled. The C every module shares whatever its activation and
width is not rendered: it is the header ``dn_runtime.h`` (``RUNTIME_HEADER``), which the rendered loops
include.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

HERE = Path(__file__).resolve().parent
TEMPLATE_PATH = HERE / "layer_loops.h.tp"
# What a rendering is included as, by deepnet/_kernels.pyx and by a plugin's module.
RENDERED_NAME = "_layer_loops.h"
# The C shared by every module with loops, and its declarations for deepnet/_kernels.pyx.
RUNTIME_HEADER = HERE / "dn_runtime.h"
RUNTIME_PXD = HERE / "dn_runtime.pxd"
# The build modules' own C (the backward driver, the CPU checks), compiled into deepnet._kernels* only.
DRIVER_HEADER = HERE / "dn_driver.h"
# The C of a plugin module: the rendered loops and their kernel table, nothing else.
PLUGIN_C = HERE / "plugin_module.c"

# Widths that get a variant with the width as a compile-time constant; every other width runs the
# generic variant (with the same sums: widths 5-7 ran there until they got variants, bench/README.md).
SPECIALISED_WIDTHS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 16, 32)


# Whether a narrow kernel unrolls its loop over a block's vectors around the activation. Unrolled, the
# block's state stays in registers (faster for cheap expressions); but GCC then vectorises each copy on
# its own and stops vectorising one that calls anything but fabsf or has a ?: (much slower). The
# arithmetic, and so every result, is the same either way.
_LIGHT_CALLS = {"fabsf"}


def is_light(activation) -> bool:
    """True if an activation's C expressions call nothing but ``fabsf`` and have no ``?:``."""
    text = f"{activation.forward_c} {activation.derivative_c}"
    calls = re.findall(r"([A-Za-z_]\w*)\s*\(", text)
    return set(calls) <= _LIGHT_CALLS and "?" not in text


def defers_derivatives(activation) -> bool:
    """True if an activation's derivative reads only ``a`` (not ``z``): the paired recomputation then makes
    each layer's derivatives in the next layer's pass, off the layer's chain."""
    return re.search(r"\bz\b", activation.derivative_c) is None


def c_string(text: str) -> str:
    """``text`` as a C string literal (its UTF-8 bytes; quotes, backslashes and the unprintable escaped)."""
    out = []
    for byte in text.encode():
        char = chr(byte)
        if char in '"\\':
            out.append("\\" + char)
        elif 32 <= byte < 127 and char != "?":  # "?" escaped: no trigraph can form
            out.append(char)
        else:
            out.append("\\%03o" % byte)
    return '"' + "".join(out) + '"'


def c_strings(texts: Sequence[str]) -> str:
    """C string literals of ``texts``, comma-separated (an array initialiser's items)."""
    return ", ".join(c_string(text) for text in texts)


def render_layer_loops(activations: Sequence, widths: Sequence[int] = SPECIALISED_WIDTHS) -> str:
    """The C of the layer loops for ``activations`` (objects with name, forward_c, derivative_c), with the
    loops of ``widths`` specialised (every other width runs the any-width loops)."""
    from Cython import Tempita  # Cython is a build requirement, so it is here whenever this runs

    template = Tempita.Template(TEMPLATE_PATH.read_text(), name=str(TEMPLATE_PATH))
    header = "/* Generated from kernels/layer_loops.h.tp by deepnet/kernels/template.py: do not edit. */\n"
    return header + template.substitute(activations=list(activations), widths=list(widths), is_light=is_light,
                                        defers_derivatives=defers_derivatives, c_strings=c_strings)
