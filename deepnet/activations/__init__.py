"""The activation registry.

An ``Activation`` is a name, its forward as a C expression of ``z``, its derivative as a C expression of
``z`` and ``a = act(z)``, and NumPy versions of both (the reference the tests and ``deepnet activations
check`` compare the kernels with). The kernel template (``deepnet/kernels/layer_loops.h.tp``) substitutes the
C expressions into one loop per activation, so every registered activation runs as compiled code, never
as a Python callback: the built-ins (``builtin.py``) are compiled when the package is built, any other
activation the first time it is used (``deepnet.kernels.jit``, cached on disk).

The modules: ``definition.py`` (the ``Activation`` type), ``builtin.py`` (the built-ins),
``registry.py`` (name -> definition), ``plugins.py`` (entry points); this module is the front door.

Where activations come from:

- the built-ins, registered when this module is imported;
- third-party packages, through the entry-point group ``deepnet.activations`` (``plugins.py``), loaded
  the first time a name is looked up that is not registered yet, or ``available()`` is called;
- ``register()`` called from Python.

A model file stores only an activation's *name*; the definition always comes from this registry, and
nothing read from a file is ever compiled.
"""

from __future__ import annotations

from deepnet.activations.plugins import errors as plugin_errors
from deepnet.activations.plugins import load as load_plugins
from deepnet.activations.builtin import BUILTINS
from deepnet.activations.definition import BUILTIN_ORIGIN, Activation
from deepnet.activations.registry import is_builtin, register, unregister
from deepnet.activations.registry import lookup as _lookup
from deepnet.activations.registry import names as _names
from deepnet.errors import ActivationError


def get(name: str) -> Activation:
    """The registered activation called ``name``.

    A name that is not registered yet makes the plugins load (once); a name nobody provides is an
    error naming it and the installed activations.
    """
    found = _lookup(name)
    if found is None:
        load_plugins()
        found = _lookup(name)
    if found is not None:
        return found
    hint = "install the package that provides it, or register() it"
    broken = plugin_errors()
    if broken:
        hint += f"; {len(broken)} plugin(s) failed to load: " + "; ".join(broken)
    raise ActivationError(f"activation {name!r} is not registered (installed: {', '.join(available())}); {hint}")


def available() -> list[str]:
    """Names of all registered activations (the plugins loaded first), sorted."""
    load_plugins()
    return _names()


__all__ = ["Activation", "register", "unregister", "get", "available", "is_builtin", "BUILTINS", "BUILTIN_ORIGIN"]
