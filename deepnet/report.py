"""How results reach the user: aligned text for people, one JSON object per line for scripts."""

from __future__ import annotations

import json
import math
import sys
from typing import Any, Callable, Sequence, TextIO


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


def jsonable(fields: dict) -> dict:
    """``fields`` with numpy values made plain Python (lists, ints, floats) for JSON."""
    return {k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in fields.items()}


def _eta(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 10 else format_seconds(seconds)


def _optional(text: str) -> Callable[[Any], str]:
    return lambda value: "" if value is None else text.format(value)


#: The columns of a training report table, in order: row key, header, width, cell format.
REPORT_COLUMNS: list[tuple[str, str, int, Callable[[Any], str]]] = [
    ("section", "section", 7, str),
    ("step", "step", 9, str),
    ("loss", "loss", 8, "{:.4f}".format),
    ("batch_acc", "batch_acc", 9, "{:.3f}".format),
    ("heldout_acc", "heldout_acc", 11, _optional("{:.4f}")),
    ("lr", "lr", 9, "{:.4g}".format),
    ("real_share", "real", 5, "{:.2f}".format),
    ("seconds_per_step", "s/step", 8, "{:.4f}".format),
    ("blocked_seconds", "blocked s", 9, "{:.3f}".format),
    ("layer_samples_per_s", "layer-samples/s", 15, format_rate),
    ("eta_seconds", "ETA", 8, _eta),
]


class ReportTable:
    """Training report rows (dicts) as a Table with the columns of the first row's keys."""

    def __init__(self, first: dict, write: Callable[[str], None]) -> None:
        self.columns = [(key, fmt) for key, _, _, fmt in REPORT_COLUMNS if key in first]
        self.table = Table([(header, width) for key, header, width, _ in REPORT_COLUMNS if key in first],
                           write=write)

    def row(self, row: dict) -> None:
        self.table.row(*(fmt(row[key]) for key, fmt in self.columns))


def run_fields(final: dict) -> dict:
    """The extra lines of the text summary of a dense run: held-out figure, weight average."""
    fields = {}
    if "heldout_acc" in final:
        fields["held-out"] = (f"accuracy {final['heldout_acc']:.4f} at step {final['heldout_step']} on the last "
                              f"{final['heldout_samples']} training images")
    if final.get("best_heldout_acc") is not None:
        kept = f"; kept in {final['best_model']}" if final.get("best_model") else ""
        early = " (stopped early: --patience ran out)" if final.get("stopped_early") else ""
        fields["best held-out"] = (f"accuracy {final['best_heldout_acc']:.4f} at step {final['best_heldout_step']}"
                                   f"{kept}{early}")
    if "ema_test_acc" in final or "ema_heldout_acc" in final:
        parts = []
        if "ema_test_acc" in final:
            parts.append(f"test loss {final['ema_test_loss']:.4f}, accuracy {final['ema_test_acc']:.4f}")
        if "ema_heldout_acc" in final:
            parts.append(f"held-out accuracy {final['ema_heldout_acc']:.4f}")
        every = f", every {final['ema_every']} steps" if final.get("ema_every") else ""
        fields[f"EMA ({final['ema_decay']:g}{every})"] = "; ".join(parts)
    return fields
