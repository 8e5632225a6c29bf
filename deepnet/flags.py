"""Checks of flag values shared by the commands: a bad value is refused with one line naming the flag."""

from __future__ import annotations

from typing import Any

import numpy as np

from deepnet.errors import ConfigError


def int_at_least(name: str, value: Any, minimum: int, meaning: str = "") -> int:
    """``value`` as an int if it is an integer >= ``minimum`` (a bool is not), else ConfigError naming
    ``--name``; ``meaning`` is added to the message (e.g. what 0 means)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"--{name} must be an integer >= {minimum}{meaning}, got {value!r}")
    return int(value)
