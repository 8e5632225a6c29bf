"""Shared fixtures: where MNIST is (set as $DEEPNET_DATA, so nothing is ever fetched)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# tests/reference.py and tests/helpers.py are imported by name from the test modules.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import MNIST_DIR, have_mnist, require_mnist_in_ci  # noqa: E402


def pytest_configure(config) -> None:
    require_mnist_in_ci()


@pytest.fixture
def mnist_dir(monkeypatch) -> Path:
    """The MNIST directory, also set as $DEEPNET_DATA (so nothing is ever fetched)."""
    if not have_mnist():
        pytest.skip(f"MNIST is not in {MNIST_DIR}")
    monkeypatch.setenv("DEEPNET_DATA", str(MNIST_DIR))
    return MNIST_DIR
