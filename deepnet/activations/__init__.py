"""The activation registry.

An ``Activation`` is a name, its forward as a C expression of ``z``, its derivative as a C expression of
``z`` and ``a = act(z)``, and NumPy versions of both (the reference the tests check the kernels
against). The kernel template (``deepnet/_layer_loops.pxi.tp``) substitutes the C expressions into one
loop per activation, so every registered activation runs as compiled code, never as a Python callback.

A model file stores only an activation's *name*; the definition always comes from this registry.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from deepnet.errors import ActivationError

# Names become part of C identifiers in the generated kernels, so they are restricted to that alphabet.
_NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,31}$")


@dataclass(frozen=True)
class Activation:
    """One activation function, as C expressions for the kernels and NumPy functions for reference."""

    name: str
    forward_c: str
    derivative_c: str
    forward_np: Callable[[np.ndarray], np.ndarray] = field(compare=False)
    derivative_np: Callable[[np.ndarray, np.ndarray], np.ndarray] = field(compare=False)
    description: str = ""
    origin: str = "built-in"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME_PATTERN.match(self.name):
            raise ActivationError(
                f"invalid activation name {self.name!r}: use 1-32 characters of a-z, 0-9 and _, starting with a letter"
            )
        for what, expr in (("forward_c", self.forward_c), ("derivative_c", self.derivative_c)):
            if not isinstance(expr, str) or not expr.strip():
                raise ActivationError(f"activation {self.name!r}: {what} must be a non-empty C expression")
            # The expression is pasted into a C function body: forbid what could end it early.
            if any(bad in expr for bad in (";", "{", "}", "#", "/*", "//", "\n")):
                raise ActivationError(
                    f"activation {self.name!r}: {what} must be a single C expression (no ; {{ }} # or comments): {expr!r}"
                )


_REGISTRY: dict[str, Activation] = {}


def register(activation: Activation, *, replace: bool = False) -> Activation:
    """Add an activation to the registry; registering a taken name is an error unless ``replace``."""
    if not isinstance(activation, Activation):
        raise ActivationError(f"register() takes an Activation, not {type(activation).__name__}")
    if activation.name in _REGISTRY and not replace:
        raise ActivationError(f"activation {activation.name!r} is already registered (pass replace=True to replace it)")
    _REGISTRY[activation.name] = activation
    return activation


def get(name: str) -> Activation:
    """The registered activation called ``name``; an unknown name is an error that lists the known ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ActivationError(
            f"unknown activation {name!r}; available: {', '.join(available())}"
        ) from None


def available() -> list[str]:
    """Names of all registered activations, sorted."""
    return sorted(_REGISTRY)


from deepnet.activations import builtin as _builtin  # noqa: E402  (registers the built-ins)

BUILTINS: tuple[Activation, ...] = _builtin.BUILTINS
for _activation in BUILTINS:
    register(_activation)

__all__ = ["Activation", "register", "get", "available", "BUILTINS"]
