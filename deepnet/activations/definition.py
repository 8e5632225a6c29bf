"""The ``Activation`` type: one activation function as C expressions (for the kernels) and NumPy functions
(the float64 reference), with the checks that keep its C safe to paste into the kernel template."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from deepnet.errors import ActivationError

# Names become part of C identifiers in the generated kernels, so they are restricted to that alphabet.
_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

BUILTIN_ORIGIN = "built-in"


def _balanced(expr: str) -> bool:
    """Whether every ( and [ closes, in order (so the expression cannot close its enclosing `return (`)."""
    stack = []
    for ch in expr:
        if ch in "([":
            stack.append(ch)
        elif ch in ")]":
            if not stack or stack.pop() != "([" [")]".index(ch)]:
                return False
    return not stack


@dataclass(frozen=True)
class Activation:
    """One activation function, as C expressions for the kernels and NumPy functions for reference.

    ``forward_c`` is a C expression of ``float z``; ``derivative_c`` one of ``float z`` and ``float a``
    (``a = act(z)``, free to use where cheaper than recomputing from ``z``). Both are float32 C: write
    constants as ``1.0f``; they may call ``fabsf``, ``sqrtf`` and the kernel prelude's helpers
    (``dn_tanhf``, ``dn_expf``, ``dn_sinf``, ``dn_cosf``), which vectorise; any other ``<math.h>``
    function works too but stops the loop from vectorising. ``forward_np(z)`` and
    ``derivative_np(z, a)`` are the float64 NumPy reference. ``origin`` is "built-in", the distribution
    that provided a plugin, or the module that called ``register()``; it is not part of the definition.
    """

    name: str
    forward_c: str
    derivative_c: str
    forward_np: Callable[[np.ndarray], np.ndarray] = field(compare=False, repr=False)
    derivative_np: Callable[[np.ndarray, np.ndarray], np.ndarray] = field(compare=False, repr=False)
    description: str = ""
    origin: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_PATTERN.match(self.name):
            raise ActivationError(
                f"invalid activation name {self.name!r}: use 1-32 characters of a-z, 0-9 and _, starting with a letter"
            )
        for what, expr in (("forward_c", self.forward_c), ("derivative_c", self.derivative_c)):
            if not isinstance(expr, str) or not expr.strip():
                raise ActivationError(f"activation {self.name!r}: {what} must be a non-empty C expression")
            # The expression is pasted into a C function body: forbid what could end it early.
            # (Quotes too: the C code sits in a Cython string literal.)
            if any(bad in expr for bad in (";", "{", "}", "#", "/*", "//", "\n", "\r", "\\", '"', "'")):
                raise ActivationError(
                    f"activation {self.name!r}: {what} must be a single C expression "
                    f"(no ; {{ }} # \\ quotes or comments): {expr!r}"
                )
            if not _balanced(expr):
                raise ActivationError(f"activation {self.name!r}: {what} has unbalanced parentheses: {expr!r}")
        for what, fn in (("forward_np", self.forward_np), ("derivative_np", self.derivative_np)):
            if not callable(fn):
                raise ActivationError(f"activation {self.name!r}: {what} must be a function of NumPy arrays")
        if not isinstance(self.description, str) or "\n" in self.description:
            raise ActivationError(f"activation {self.name!r}: description must be one line of text")
