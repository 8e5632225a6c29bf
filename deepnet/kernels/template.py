"""Renders the one kernel template (``layer_loops.pxi.tp``) for a list of activations.

Used by ``setup.py`` to build the built-in activations into ``deepnet._kernels`` and, later, to compile
a plugin's activation from the very same loops. Pure Python with no import of the compiled package, so
the build can run it before anything is compiled.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

TEMPLATE_PATH = Path(__file__).with_name("layer_loops.pxi.tp")

# Widths that get a variant with the width as a compile-time constant; every other width runs the
# generic variant.
SPECIALISED_WIDTHS: tuple[int, ...] = (1, 2, 3, 4, 8, 16, 32)


# Whether a narrow kernel unrolls its loop over a block's vectors around the activation. Unrolled, the
# block's state stays in registers, which made softsign's step ~8% faster; but GCC then vectorises each
# copy on its own, and for anything with a call other than fabsf (dn_tanhf, sqrtf, ...) or a ternary
# (relu's z > 0 ? z : 0) it stopped vectorising: tanh 3x and relu 1.6x slower. The arithmetic, and so
# every result, is the same either way.
_LIGHT_CALLS = {"fabsf"}


def is_light(activation) -> bool:
    """True if an activation's C expressions call nothing but ``fabsf`` and have no ``?:``."""
    text = f"{activation.forward_c} {activation.derivative_c}"
    calls = re.findall(r"([A-Za-z_]\w*)\s*\(", text)
    return set(calls) <= _LIGHT_CALLS and "?" not in text


def render_layer_loops(activations: Sequence, widths: Sequence[int] = SPECIALISED_WIDTHS) -> str:
    """The Cython source of the layer loops for ``activations`` (objects with name, forward_c, derivative_c)."""
    from Cython import Tempita  # Cython is a build requirement, so it is here whenever this runs

    template = Tempita.Template(TEMPLATE_PATH.read_text(), name=str(TEMPLATE_PATH))
    header = "# Generated from kernels/layer_loops.pxi.tp by deepnet/kernels/template.py: do not edit.\n"
    return header + template.substitute(activations=list(activations), widths=list(widths), is_light=is_light)
