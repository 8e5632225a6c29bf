"""The CPU's cache sizes, read at run time, for the sizes the engine chooses (how many layers one
recomputed segment spans): one machine's tuning does not fit a CPU with another L2.

Linux reports them in /sys/devices/system/cpu/cpu0/cache/index*/ (level, type, size). Where they cannot
be read, a 512 KiB L2 (the smallest of the CPUs deepnet is measured on) is assumed. ``$DEEPNET_L2_BYTES``
overrides the L2 size (to measure the effect of the segment length; bench/README.md).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from deepnet.errors import ConfigError

L2_ENV = "DEEPNET_L2_BYTES"
DEFAULT_L2_BYTES = 512 * 1024
_SYSFS = Path("/sys/devices/system/cpu/cpu0/cache")
_UNITS = {"K": 1024, "M": 1024 * 1024, "G": 1024 * 1024 * 1024}


def _parse_size(text: str) -> int:
    """"512K" -> 524288 (sysfs' form: a number and an optional K/M/G suffix)."""
    text = text.strip()
    scale = _UNITS.get(text[-1:].upper(), 1)
    return int(text[:-1] if scale != 1 else text) * scale


@functools.lru_cache(maxsize=None)
def cache_sizes() -> dict[int, int]:
    """Bytes of the data (or unified) cache of each level that cpu0 has, e.g. {1: 32768, 2: 524288, ...};
    empty where the system does not say."""
    sizes: dict[int, int] = {}
    try:
        entries = sorted(_SYSFS.glob("index*"))
        for entry in entries:
            if (entry / "type").read_text().strip() == "Instruction":
                continue
            sizes[int((entry / "level").read_text())] = _parse_size((entry / "size").read_text())
    except (OSError, ValueError):
        return {}
    return sizes


def l2_bytes() -> int:
    """The L2 cache of one core: $DEEPNET_L2_BYTES, else what the system reports, else DEFAULT_L2_BYTES."""
    value = os.environ.get(L2_ENV, "").strip()
    if value:
        try:
            size = _parse_size(value)
        except ValueError:
            size = 0
        if size < 4096:
            raise ConfigError(f"${L2_ENV} must be a size of at least 4096 bytes (e.g. 524288 or 512K), "
                              f"got {value!r}")
        return size
    return cache_sizes().get(2, DEFAULT_L2_BYTES)
