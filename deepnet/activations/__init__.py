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

A model file stores an activation's *name* (and, for a plugin's, the name and version of the package
that provided it, for the error when it is missing: ``require``); the definition always comes from this
registry, and nothing read from a file is ever compiled.
"""

from __future__ import annotations

from deepnet.activations.plugins import errors as plugin_errors
from deepnet.activations.plugins import Package
from deepnet.activations.plugins import installed_version as _installed_version
from deepnet.activations.plugins import load as load_plugins
from deepnet.activations.plugins import package_of as _package_of
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


def require(name: str, *, used_by: str, package: Package | None) -> Activation:
    """``get(name)`` for the model file ``used_by``, which records that ``package`` provided the
    activation (None: it records nothing, and the error is ``get``'s). If the name is not registered,
    the error says which package to install."""
    try:
        return get(name)
    except ActivationError:
        if package is None:
            raise
    installed = _installed_version(package.name)
    what = f"{used_by} uses activation {name!r} from package {package}"
    if installed is None:
        message = f"{what}, which is not installed (pip install {package.name})"
    else:
        message = f"{what}, but the installed {Package(package.name, installed)} does not provide it"
        if package.version and installed != package.version:
            message += f" (pip install '{package.name}=={package.version}')"
    broken = plugin_errors()
    if broken:
        message += f"; {len(broken)} plugin(s) failed to load: " + "; ".join(broken)
    raise ActivationError(message) from None


def package_of(name: str) -> Package | None:
    """The package (distribution name and version) whose plugin provides the registered activation
    ``name``; None for a built-in, an activation registered with ``register()``, or an unknown name.
    Plugins are not loaded for this."""
    found = _lookup(name)
    return None if found is None else _package_of(found)


def available() -> list[str]:
    """Names of all registered activations (the plugins loaded first), sorted."""
    load_plugins()
    return _names()


__all__ = ["Activation", "Package", "register", "unregister", "get", "require", "package_of", "available", "is_builtin",
           "BUILTINS", "BUILTIN_ORIGIN"]
