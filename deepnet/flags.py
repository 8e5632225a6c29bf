"""Checks of flag values shared by the commands: a bad value is refused with one line naming the flag."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from deepnet.errors import ConfigError


def int_at_least(name: str, value: Any, minimum: int, meaning: str = "") -> int:
    """``value`` as an int if it is an integer >= ``minimum`` (a bool is not), else ConfigError naming
    ``--name``; ``meaning`` is added to the message (e.g. what 0 means)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"--{name} must be an integer >= {minimum}{meaning}, got {value!r}")
    return int(value)


def positive(name: str, value: Any, kind: type = int) -> None:
    """Refuse anything but an integer > 0 (``kind=float``: a finite number > 0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise ConfigError(f"--{name} must be {'an integer' if kind is int else 'a finite number'}, got {value!r}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"--{name} must be finite, got {value!r}")
    if value <= 0:
        raise ConfigError(f"--{name} must be > 0, got {value!r}")


def non_negative_number(name: str, value: Any) -> None:
    """Refuse anything but a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"--{name} must be a finite number >= 0, got {value!r}")


def integer(name: str, value: Any) -> int:
    """``value`` as an int if it is an integer (a bool is not), else ConfigError naming ``--name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"--{name} must be an integer, got {value!r}")
    return int(value)


def finite_number(name: str, value: Any) -> float:
    """``value`` as a float if it is a finite number (not nan or inf; a bool is not a number), else
    ConfigError naming ``--name``."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value):
        raise ConfigError(f"--{name} must be a finite number, got {value!r}")
    return float(value)


def number_in(name: str, value: Any, low: float, high: float, *, low_open: bool = False) -> float:
    """``value`` as a float if it is a finite number in [low, high] (``low_open``: (low, high])."""
    number = finite_number(name, value)
    if number < low or number > high or (low_open and number == low):
        raise ConfigError(f"--{name} must be in {'(' if low_open else '['}{low:g}, {high:g}], got {value!r}")
    return number


def writable_directory(name: str, value: Any) -> None:
    """Refuse a ``--name`` that is not an existing directory this process can write in (None: not given)."""
    if value is None:
        return
    if not os.path.isdir(value):
        raise ConfigError(f"--{name} {value} is not a directory")
    if not os.access(value, os.W_OK | os.X_OK):
        raise ConfigError(f"--{name} {value} is not writable")
