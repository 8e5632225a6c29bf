"""How results reach the user: aligned text for people, one JSON object per line for scripts."""

from __future__ import annotations

import json
import math
import sys
from typing import Any, Sequence, TextIO


def format_seconds(seconds: float) -> str:
    """A duration for people: 0.412s, 3m05s, 2h07m."""
    if not math.isfinite(seconds):
        return "?"
    if seconds < 60:
        return f"{seconds:.3g}s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def format_rate(value: float) -> str:
    """A large rate with an SI suffix: 3.52M, 812k."""
    for threshold, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= threshold:
            return f"{value / threshold:.3g}{suffix}"
    return f"{value:.3g}"


class Table:
    """Rows printed as they come, under a header, in fixed-width right-aligned columns."""

    def __init__(self, columns: Sequence[tuple[str, int]], out: TextIO | None = None, write=None) -> None:
        self.columns = list(columns)
        self.out = out or sys.stdout
        self._write = write or (lambda line: print(line, file=self.out, flush=True))
        self._header_done = False

    def row(self, *cells: Any) -> None:
        if not self._header_done:
            self._write("  ".join(f"{name:>{width}}" for name, width in self.columns))
            self._header_done = True
        self._write("  ".join(f"{str(cell):>{width}}" for cell, (_, width) in zip(cells, self.columns)))


def print_json(obj: dict, out: TextIO | None = None) -> None:
    """One JSON object on one line (NaN/inf become null so every line parses)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in obj.items()}
    print(json.dumps(clean, sort_keys=False), file=out or sys.stdout, flush=True)


def print_fields(fields: dict, out: TextIO | None = None) -> None:
    """Key/value lines with the keys padded to one width."""
    width = max((len(k) for k in fields), default=0)
    for key, value in fields.items():
        print(f"{key:<{width}}  {value}", file=out or sys.stdout)
