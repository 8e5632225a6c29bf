"""The activation registry.

An ``Activation`` is a name, its forward as a C expression of ``z``, its derivative as a C expression of
``z`` and ``a = act(z)``, and NumPy versions of both (the reference the tests and ``deepnet activations
check`` compare the kernels with). The kernel template (``deepnet/kernels/layer_loops.pxi.tp``) substitutes the
C expressions into one loop per activation, so every registered activation runs as compiled code, never
as a Python callback: the built-ins (``builtin.py``) are compiled when the package is built, any other
activation the first time it is used (``compile.py``, cached on disk).

Where activations come from:

- the built-ins, registered when this module is imported;
- third-party packages, through the entry-point group ``deepnet.activations`` (``plugins.py``), loaded
  the first time a name is looked up that is not registered yet, or ``available()`` is called;
- ``register()`` called from Python.

A model file stores only an activation's *name*; the definition always comes from this registry, and
nothing read from a file is ever compiled.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import threading
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

    @property
    def is_builtin(self) -> bool:
        """Whether this is the built-in definition compiled into the package (not just its name)."""
        builtin = _BUILTIN_BY_NAME.get(self.name)
        return builtin is not None and builtin == self


_REGISTRY: dict[str, Activation] = {}
_LOCK = threading.RLock()


def register(activation: Activation, *, replace: bool = False) -> Activation:
    """Add an activation to the registry and return it (with ``origin`` filled in).

    Registering a name that is taken is an error unless ``replace=True``. Replacing a built-in is
    allowed but then the package's compiled kernel is not used: the new definition is compiled on first
    use like a plugin's.
    """
    if not isinstance(activation, Activation):
        raise ActivationError(f"register() takes an Activation, not {type(activation).__name__}")
    if not activation.origin:
        caller = sys._getframe(1).f_globals.get("__name__", "python")
        activation = dataclasses.replace(activation, origin=caller)
    with _LOCK:
        if activation.name in _REGISTRY and not replace:
            raise ActivationError(
                f"activation {activation.name!r} is already registered (from {_REGISTRY[activation.name].origin}); "
                "pass replace=True to replace it"
            )
        _REGISTRY[activation.name] = activation
    return activation


def get(name: str) -> Activation:
    """The registered activation called ``name``.

    A name that is not registered yet makes the plugins load (once); a name nobody provides is an
    error naming it and the installed activations.
    """
    with _LOCK:
        try:
            return _REGISTRY[name]
        except (KeyError, TypeError):
            pass
        from deepnet.activations import plugins

        plugins.load()
        try:
            return _REGISTRY[name]
        except (KeyError, TypeError):
            pass
    hint = "install the package that provides it, or register() it"
    broken = plugins.errors()
    if broken:
        hint += f"; {len(broken)} plugin(s) failed to load: " + "; ".join(broken)
    raise ActivationError(
        f"activation {name!r} is not registered (installed: {', '.join(available())}); {hint}"
    ) from None


def available() -> list[str]:
    """Names of all registered activations (the plugins loaded first), sorted."""
    from deepnet.activations import plugins

    plugins.load()
    with _LOCK:
        return sorted(_REGISTRY)


from deepnet.activations import builtin as _builtin  # noqa: E402  (defines the built-ins)

BUILTINS: tuple[Activation, ...] = tuple(
    dataclasses.replace(a, origin=BUILTIN_ORIGIN) for a in _builtin.BUILTINS
)
_BUILTIN_BY_NAME: dict[str, Activation] = {a.name: a for a in BUILTINS}
for _activation in BUILTINS:
    register(_activation)

__all__ = ["Activation", "register", "get", "available", "BUILTINS", "BUILTIN_ORIGIN"]
