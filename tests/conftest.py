"""Shared fixtures: where MNIST is (set as $DEEPNET_DATA, so nothing is ever fetched), and the isolation of
the tests from what else is installed: the activation plugins they see (only those they install), and the
kernel cache plugins compile into (never the user's)."""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# tests/reference.py and tests/helpers.py are imported by name from the test modules.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from crash_harness import make_small_mnist  # noqa: E402
from helpers import MNIST_DIR, have_mnist, require_mnist_in_ci  # noqa: E402
from plugin_isolation import declared_entry_points  # noqa: E402

CACHE_ENV = "DEEPNET_CACHE"  # deepnet.kernels.jit.CACHE_ENV
_cache_base: Path | None = None
_cache_default: str | None = None
_restore: list = []
_numbers = itertools.count()


def pytest_configure(config) -> None:
    require_mnist_in_ci()
    _isolate()


def pytest_unconfigure(config) -> None:
    while _restore:
        _restore.pop()()


def _isolate() -> None:
    """Before any test module is collected (collection may look activations up): plugin discovery sees
    only the distributions on sys.path entries the tests add (see plugin_isolation.py), and the kernel
    cache is a directory of this run's own, for the tests and their subprocesses alike."""
    global _cache_base, _cache_default
    from deepnet.activations import plugins

    real = plugins.installed_entry_points
    plugins.installed_entry_points = declared_entry_points(list(sys.path))
    _restore.append(lambda: setattr(plugins, "installed_entry_points", real))
    plugins.reload()  # forget anything found before (nothing has looked yet, unless a plugin imported deepnet)

    old_cache = os.environ.get(CACHE_ENV)
    _cache_base = Path(tempfile.mkdtemp(prefix="deepnet-test-cache-"))
    _cache_default = str(_cache_base / "default")
    os.environ[CACHE_ENV] = _cache_default
    _restore.append(lambda: os.environ.__setitem__(CACHE_ENV, old_cache) if old_cache is not None
                    else os.environ.pop(CACHE_ENV, None))
    _restore.append(lambda: shutil.rmtree(_cache_base, ignore_errors=True))


@pytest.fixture(autouse=True)
def _kernel_cache_per_test(monkeypatch) -> None:
    """Each test compiles into a cache of its own (empty at its start), unless a fixture of a wider scope
    chose one (test_plugins.py compiles once per module into its own)."""
    if os.environ.get(CACHE_ENV) == _cache_default:
        monkeypatch.setenv(CACHE_ENV, str(_cache_base / f"test-{next(_numbers)}"))


@pytest.fixture
def mnist_dir(monkeypatch) -> Path:
    """The MNIST directory, also set as $DEEPNET_DATA (so nothing is ever fetched)."""
    if not have_mnist():
        pytest.skip(f"MNIST is not in {MNIST_DIR}")
    monkeypatch.setenv("DEEPNET_DATA", str(MNIST_DIR))
    return MNIST_DIR


@pytest.fixture(scope="module")
def mini(tmp_path_factory) -> Path:
    """A small MNIST (1000 training, 200 test images) so that subprocesses start quickly."""
    if not have_mnist():
        pytest.skip(f"MNIST is not in {MNIST_DIR}")
    return make_small_mnist(MNIST_DIR, tmp_path_factory.mktemp("mini-mnist"), 1000, 200)


@pytest.fixture
def mini_env(mini, monkeypatch) -> Path:
    """``mini`` as $DEEPNET_DATA for the test."""
    monkeypatch.setenv("DEEPNET_DATA", str(mini))
    return mini
