"""Tests see only the activation plugins they install themselves, whatever else is installed.

deepnet finds plugins through ``deepnet.activations.plugins.installed_entry_points`` (the installed
metadata). Under the tests it is replaced by ``declared_entry_points``: the entry points of the
distributions on the ``sys.path`` entries a test added (a temporary site directory it put a plugin
into), never those of the environment (site-packages, an editable install, $PYTHONPATH as pytest
started). ``tests/conftest.py`` installs it in the pytest process.

A subprocess is narrowed the same way by running it through this file, with the directories it may
find plugins in as its $PYTHONPATH::

    python tests/plugin_isolation.py -c CODE [ARG ...]
    python tests/plugin_isolation.py -m deepnet [ARG ...]

which runs CODE or the module as ``python -c`` / ``python -m`` would (the current directory first on
``sys.path``), with plugin discovery limited to the $PYTHONPATH entries.
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Callable, Iterable
from importlib import metadata

GROUP = "deepnet.activations"  # deepnet.activations.plugins.GROUP, without importing deepnet here


def entry_points_on(paths: Iterable[str]) -> list[metadata.EntryPoint]:
    """The entry points of the group declared by the distributions found on ``paths`` (and no others)."""
    paths = [p for p in paths if p]
    if not paths:
        return []
    found = []
    for dist in metadata.distributions(path=paths):
        found.extend(ep for ep in dist.entry_points if ep.group == GROUP)
    return found


def declared_entry_points(environment: Iterable[str]) -> Callable[[], list[metadata.EntryPoint]]:
    """A replacement for ``plugins.installed_entry_points`` that ignores the ``environment`` paths: it
    sees the distributions on the ``sys.path`` entries added since."""
    ignored = set(environment)

    def installed_entry_points() -> list[metadata.EntryPoint]:
        return entry_points_on(p for p in sys.path if p not in ignored)

    return installed_entry_points


def _main(argv: list[str]) -> None:
    if len(argv) < 2 or argv[0] not in ("-c", "-m"):
        raise SystemExit("usage: plugin_isolation.py -c CODE [ARG ...] | -m MODULE [ARG ...]")
    flag, target, rest = argv[0], argv[1], argv[2:]
    declared = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[0] = "" if flag == "-c" else os.getcwd()  # as `python -c` / `python -m` set it, not this file's directory
    from deepnet.activations import plugins

    plugins.installed_entry_points = lambda: entry_points_on(declared)
    if flag == "-c":
        sys.argv = ["-c", *rest]
        exec(compile(target, "<string>", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
    else:
        sys.argv = [target, *rest]
        runpy.run_module(target, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    _main(sys.argv[1:])
