"""Small value helpers of the model-file modules: argument checks, attribute decoding, one-line messages."""

from __future__ import annotations

import datetime as _dt
import json
import math
import operator
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from deepnet.errors import ConfigError
from deepnet.formats.commit import json_default


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """`value` as an int (numpy integers accepted, bools refused), at least `minimum`; else ConfigError."""
    if isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{name} must be an integer, got {show(value)}")
    try:
        value = operator.index(value)
    except TypeError:
        raise ConfigError(f"{name} must be an integer, got {show(value)}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_float(name: str, value: Any, *, positive: bool = False, nonnegative: bool = False) -> float:
    """`value` as a finite float (bools refused), optionally > 0 or >= 0; else ConfigError."""
    if isinstance(value, (bool, np.bool_)):
        raise ConfigError(f"{name} must be a number, got {show(value)}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {show(value)}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value}")
    if positive and not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value}")
    if nonnegative and not value >= 0:
        raise ConfigError(f"{name} must be >= 0, got {value}")
    return value


def is_int(value: Any) -> bool:
    """True for Python and numpy integers (not bools)."""
    try:
        operator.index(value)
        return not isinstance(value, (bool, np.bool_))
    except TypeError:
        return False


def is_int_attr(value: Any) -> bool:
    """True for an integer attribute as h5py returns it (not a bool)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def now() -> str:
    """Current UTC time as ISO-8601 with a fixed length (25 characters)."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def one_line(text: Any) -> str:
    return " ".join(str(text).split())


def decode(value: Any) -> str:
    """A string attribute as str, whether h5py returns str, bytes or a 0-d array."""
    if isinstance(value, np.ndarray) and value.shape == ():
        value = value[()]
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    return str(value)


def show(value: Any) -> str:
    """An attribute value for a one-line message: plain Python repr, shortened."""
    if isinstance(value, (np.generic, np.ndarray)):
        value = value.tolist()
    if isinstance(value, (bytes, np.bytes_)):
        value = decode(value)
    text = one_line(repr(value))
    return text if len(text) <= 60 else text[:57] + "..."


def os_reason(exc: BaseException | str) -> str:
    """The one formatter of an error text that reaches the user: a short one-line reason for an OSError,
    including those h5py builds from HDF5's multi-line error stack; any other error's text on one line."""
    strerror = getattr(exc, "strerror", None)
    if isinstance(strerror, str) and strerror:
        return one_line(strerror)
    err = getattr(exc, "errno", None)
    if not err:
        m = re.search(r"errno = (\d+)", str(exc))
        if m:
            err = int(m.group(1))
    if err:
        try:
            return os.strerror(err)
        except ValueError:
            pass
    return one_line(str(exc)) or type(exc).__name__


def rng_text(state: Any) -> str:
    """A generator state as the JSON text of the rng_state attribute ("" for None)."""
    if state is None:
        return ""
    if not isinstance(state, Mapping):
        raise ConfigError(f"rng_state must be a dict (a bit_generator.state) or None, got {type(state).__name__}")
    try:
        return json.dumps(dict(state), default=json_default)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"rng_state is not JSON-serialisable: {exc}") from None
