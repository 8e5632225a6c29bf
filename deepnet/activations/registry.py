"""The registry itself: which definition each activation name stands for in this process.

It holds the built-ins from the start; plugins (``plugins.py``) and ``register()`` add to it. Lookups
that should load the plugins first go through ``deepnet.activations.get``/``available``.
"""

from __future__ import annotations

import dataclasses
import sys
import threading

from deepnet.activations.builtin import BUILTINS
from deepnet.activations.definition import Activation
from deepnet.errors import ActivationError

_REGISTRY: dict[str, Activation] = {}
_LOCK = threading.RLock()
_BUILTIN_BY_NAME: dict[str, Activation] = {a.name: a for a in BUILTINS}


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


def add_if_free(activation: Activation) -> Activation | None:
    """Register ``activation`` unless its name is taken; returns the activation holding the name if taken."""
    with _LOCK:
        taken = _REGISTRY.get(activation.name)
        if taken is None:
            _REGISTRY[activation.name] = activation
        return taken


def unregister(name: str) -> Activation | None:
    """Remove ``name`` from the registry (a no-op if it is not there); returns what was removed."""
    with _LOCK:
        return _REGISTRY.pop(name, None)


def lookup(name: str) -> Activation | None:
    """The definition registered as ``name``, or None (plugins are not loaded for this)."""
    with _LOCK:
        try:
            return _REGISTRY.get(name)
        except TypeError:  # an unhashable "name"
            return None


def names() -> list[str]:
    """The registered names, sorted (plugins are not loaded for this)."""
    with _LOCK:
        return sorted(_REGISTRY)


def snapshot() -> dict[str, Activation]:
    """The whole registry as it is now (for ``restore``: tests that register throwaway activations)."""
    with _LOCK:
        return dict(_REGISTRY)


def restore(saved: dict[str, Activation]) -> None:
    """Put back a ``snapshot()``."""
    with _LOCK:
        _REGISTRY.clear()
        _REGISTRY.update(saved)


def is_builtin(activation: Activation) -> bool:
    """Whether this is the built-in definition compiled into the package (not just its name)."""
    builtin = _BUILTIN_BY_NAME.get(activation.name)
    return builtin is not None and builtin == activation


for _activation in BUILTINS:
    register(_activation)
