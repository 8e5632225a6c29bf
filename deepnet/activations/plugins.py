"""Third-party activations, found through the entry-point group ``deepnet.activations``.

The contract for a plugin package (see ``examples/deepnet-activation-example``)::

    [project.entry-points."deepnet.activations"]
    isru = "my_package:ISRU"                  # an Activation: the entry point's name must be its name
    more = "my_package:activations"           # or a function returning an Activation or a list of them

Entry points are loaded once, the first time a name is looked up that is not registered yet (or the
full list is asked for), in a fixed order (by distribution, then entry-point name). Each activation's
``origin`` is set to the distribution's name, and the distribution's name and version are kept
(``package_of``: a model file created with the activation records them, so a missing plugin can be
named when the file is opened). A plugin never replaces a built-in, nor an activation
another plugin registered first: such a clash, a failing import or a wrong object is recorded (see
``errors()``), reported once as a warning, and the rest of the plugins still load. Loading a plugin
runs its Python code but compiles nothing: its kernel is built the first time it is used
(``deepnet.kernels.jit``).
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import sys
import threading
import warnings
from dataclasses import dataclass
from importlib import metadata
from typing import Iterable

from deepnet.activations.registry import add_if_free, unregister
from deepnet.activations.definition import Activation
from deepnet.errors import ActivationError

GROUP = "deepnet.activations"

_lock = threading.RLock()
_loaded = False
_loading = False
_errors: list[str] = []
_plugin_names: list[str] = []  # names this module registered, for reload()
_warned: set[str] = set()  # each problem is warned about once per process


@dataclass(frozen=True)
class Package:
    """The distribution that provides a plugin's activation: its name (as ``pip install`` takes it) and
    version ("" if its metadata has none)."""

    name: str
    version: str

    def __str__(self) -> str:
        return f"{self.name} {self.version}" if self.version else self.name


# name -> (the definition a plugin registered, its package): for package_of
_packages: dict[str, tuple[Activation, Package]] = {}


def installed_entry_points() -> list[metadata.EntryPoint]:
    """Every entry point of the group that the distributions on ``sys.path`` declare, as found (the one
    place the installed metadata is read; the tests narrow it to the plugins they install)."""
    if sys.version_info >= (3, 10):
        return list(metadata.entry_points(group=GROUP))
    return list(metadata.entry_points().get(GROUP, []))  # pragma: no cover - Python 3.9


def entry_points() -> list[metadata.EntryPoint]:
    """The entry points of the group, in a fixed order (distribution name, then entry-point name)."""
    eps = installed_entry_points()
    # The same distribution can be found twice on sys.path (e.g. a source tree and an install): keep one.
    unique = {(distribution_name(ep), ep.name, ep.value): ep for ep in eps}
    return sorted(unique.values(), key=lambda ep: (distribution_name(ep), ep.name))


def distribution_name(ep: metadata.EntryPoint) -> str:
    """The name of the distribution that declares ``ep`` (its module's top package if unknown)."""
    package = package_of_entry_point(ep)
    return package.name if package is not None else ep.value.split(":")[0].split(".")[0]


def package_of_entry_point(ep: metadata.EntryPoint) -> Package | None:
    """The distribution that declares ``ep``, or None if it has no readable name (an entry point made
    by hand)."""
    dist = getattr(ep, "dist", None)
    if dist is None:
        return None
    try:
        name = dist.metadata["Name"]
        version = dist.metadata["Version"]
    except Exception:  # a distribution without readable metadata
        return None
    if not isinstance(name, str) or not name.strip():
        return None
    return Package(name.strip(), version.strip() if isinstance(version, str) else "")


def package_of(activation: Activation) -> Package | None:
    """The distribution whose entry point registered this very definition, or None (a built-in, one
    registered with ``register()``, or a plugin whose distribution is unknown)."""
    with _lock:
        found = _packages.get(activation.name)
    return found[1] if found is not None and found[0] is activation else None


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_version(name: str) -> str | None:
    """The version of the distribution ``name`` among those declaring activations (see
    ``installed_entry_points``), "" if it has none, or None if no such distribution is installed."""
    wanted = _normalized(name)
    for ep in installed_entry_points():
        package = package_of_entry_point(ep)
        if package is not None and _normalized(package.name) == wanted:
            return package.version
    return None


def activations_of(ep: metadata.EntryPoint) -> list:
    """The Activations an entry point provides, with their origin set (ActivationError if it is wrong)."""
    where = f"entry point {ep.name!r} ({ep.value}) of {distribution_name(ep)}"
    try:
        obj = ep.load()
    except Exception as exc:
        raise ActivationError(f"{where} failed to import: {type(exc).__name__}: {exc}") from None
    if isinstance(obj, Activation):
        if obj.name != ep.name:
            raise ActivationError(f"{where} is activation {obj.name!r}: the entry point must be named after it")
        found: Iterable = [obj]
    elif callable(obj):
        try:
            found = obj()
        except Exception as exc:
            raise ActivationError(f"{where} raised {type(exc).__name__}: {exc}") from None
        if isinstance(found, Activation):
            found = [found]
    else:
        raise ActivationError(f"{where} is a {type(obj).__name__}, not an Activation or a function returning some")
    try:
        found = list(found)
    except TypeError:
        raise ActivationError(f"{where} returned a {type(found).__name__}, not Activations") from None
    bad = [type(a).__name__ for a in found if not isinstance(a, Activation)]
    if bad:
        raise ActivationError(f"{where} returned {', '.join(bad)} where Activations were expected")
    origin = distribution_name(ep)
    return [dataclasses.replace(a, origin=origin) for a in found]


def load() -> None:
    """Register the activations of every entry point, once per process (``reload()`` does it again)."""
    global _loaded, _loading
    with _lock:
        if _loaded or _loading:
            return
        _loading = True
        try:
            for ep in entry_points():
                try:
                    provided = activations_of(ep)
                except ActivationError as exc:
                    _errors.append(str(exc))
                    continue
                package = package_of_entry_point(ep)
                for act in provided:
                    taken = add_if_free(act)
                    if taken is not None:
                        _errors.append(f"{act.origin} provides activation {act.name!r}, which is already "
                                       f"registered (from {taken.origin}): ignored")
                        continue
                    _plugin_names.append(act.name)
                    if package is not None:
                        _packages[act.name] = (act, package)
        finally:
            _loading = False
            _loaded = True
        fresh = [e for e in _errors if e not in _warned]
        _warned.update(fresh)
    for message in fresh:
        warnings.warn(f"activation plugin not loaded: {message}", RuntimeWarning, stacklevel=3)


def errors() -> list[str]:
    """What went wrong loading the plugins (one line each), in the order it happened."""
    return list(_errors)


def reload() -> None:
    """Forget the plugins' activations and errors and load the entry points again (after installing one,
    or in tests that change ``sys.path``)."""
    global _loaded
    with _lock:
        for name in _plugin_names:
            unregister(name)
        _plugin_names.clear()
        _packages.clear()
        _errors.clear()
        _loaded = False
        metadata_cache_clear()
        load()


def metadata_cache_clear() -> None:
    importlib.invalidate_caches()
