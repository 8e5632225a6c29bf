"""`deepnet info`: what a model file holds (shape, activation, step, size, last logged figures, the last
held-out and test evaluations, and for a dense model its training settings, schedules, branch and
weight average), as a JSON-able dict (:func:`model_info`) and as aligned text (:func:`format_info`)."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from deepnet.data.teacher import read_teacher_info
from deepnet.errors import ConfigError
from deepnet.formats.data_record import DataRecord, read_data_record
from deepnet.formats import evals as _evals
from deepnet.formats import shards as _shards
from deepnet.formats.atomic import format_bytes
from deepnet.formats.hdf5 import ModelFile
from deepnet.formats.layout import EVAL_HELDOUT, EVAL_TEST
from deepnet.formats.mach_state import mach_summary
from deepnet.formats.mlp_file import model_kind, read_mlp_file
from deepnet.nn import branch as _branch
from deepnet.nn.mlp import MLP
from deepnet.training import ema as _ema
from deepnet.training import schedule as _schedule


def model_info(model: str | os.PathLike) -> dict:
    """The summary of a dense or MLP model file: plain Python values (JSON-able), nested dicts for the
    parts (last_log, train_settings, last_heldout, last_test, ...)."""
    if model_kind(model) == "mlp":
        net = MLP.load(model)
        summary = net.summary(model)
        summary["data"] = data_summary(net.data)
        summary.update(evaluation_summary(read_mlp_file(model).evals))
    else:
        with ModelFile.open(model) as f:
            summary = f.summary()
            teacher = read_teacher_info(f)
            if teacher is None:
                summary["data"] = data_summary(read_data_record(f.h5, f.path))
            else:  # a teacher is data, and learns from none
                summary["teacher"] = teacher
            summary.update(_shards.shard_summary(f))
            summary.update(mach_summary(f))
            summary.update(training_summary(f))
            summary.update(evaluation_summary(_evals.with_heldout_dataset(f.read_evaluations(), f.h5)))
    return _plain(summary)


def data_summary(record: DataRecord) -> str:
    """What a model learns from, in one line: its source, input transform and loss."""
    loss = "cross-entropy on labels" if record.loss == "xent" else "mean squared error on targets"
    inputs = "" if record.coarsen == 1 else f", {record.transform} inputs"
    return f"{record.source}{inputs}, {loss}"


def training_summary(model_file: ModelFile) -> dict:
    """What a dense model adds: training settings with the schedules, branch, average."""
    out: dict = {}
    settings = model_file.train_settings
    if settings:
        out["train_settings"] = {k: v for k, v in settings.items() if k not in _schedule.SETTINGS_KEYS}
        for key in _schedule.SETTINGS_KEYS:
            if settings.get(key):
                try:
                    out[key] = _schedule.Schedule.from_dict(settings[key]).describe()
                except ConfigError as exc:
                    out[key] = f"unusable ({exc})"
    out.update(_branch.summary(model_file))
    out.update(_ema.summary(model_file))
    return out


def evaluation_summary(rows: np.ndarray) -> dict:
    """The evaluations (layout.EVAL_DTYPE rows): how many, and the last of each kind as last_heldout /
    last_test = {step, loss, acc, samples (0: not known), measurements (of that kind)}."""
    if not rows.size:
        return {}
    out: dict[str, Any] = {"evaluations": int(rows.size)}
    for kind in (EVAL_HELDOUT, EVAL_TEST):
        of_kind = _evals.of_kind(rows, kind)
        if of_kind.size:
            last = of_kind[-1]
            out[f"last_{kind}"] = {"step": int(last["step"]), "loss": float(last["loss"]),
                                   "acc": float(last["accuracy"]), "samples": int(last["samples"]),
                                   "measurements": int(of_kind.size)}
    return out


def _plain(value: Any) -> Any:
    """`value` with numpy scalars and arrays made plain Python, through dicts and lists."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


# ------------------------------------------------------------------------------------------------
# text


def _number(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:,.6g}" if abs(value) >= 1e4 else f"{value:.6g}"


def _value(value: Any) -> str:
    """One value as text: thousands separated integers, 6 significant digits, "none", lists joined."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, (list, tuple)):
        return ", ".join(_value(v) for v in value) or "none"
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {_value(v)}" for k, v in value.items()) or "none"
    return str(value)


def _evaluation(figures: Mapping[str, Any]) -> str:
    samples = figures.get("samples") or 0
    on = f" on {samples:,} images" if samples else ""
    count = figures.get("measurements")
    of = f" (last of {count})" if count and count > 1 else ""
    return (f"accuracy {figures['acc']:.4f}, loss {figures['loss']:.4f} at step {figures['step']:,}{on}{of}")


def _last_log(figures: Mapping[str, Any]) -> str:
    return (f"step {figures['step']:,}: loss {figures['loss']:.4f}, batch accuracy {figures['batch_acc']:.4f}, "
            f"{figures['seconds']:.3g} s")


def _size(n: int) -> str:
    return f"{format_bytes(n)} ({n:,} bytes)" if n >= 1000 else f"{n:,} bytes"


#: Labels of the summary's keys (others: the key with spaces), and the keys shown on one line their own way.
LABELS = {"path": "model", "file_size_bytes": "file size", "last_log": "last step", "last_heldout": "last held-out",
          "last_test": "last test", "train_settings": "training settings"}
ONE_LINE: dict[str, Callable[[Any], str]] = {"last_heldout": _evaluation, "last_test": _evaluation,
                                              "last_log": _last_log, "file_size_bytes": _size}


def _lines(summary: Mapping[str, Any], depth: int, out: list[tuple[str, str]]) -> None:
    for key, value in summary.items():
        label = "  " * depth + LABELS.get(key, str(key).replace("_", " "))
        special = ONE_LINE.get(key)
        if special is not None and value is not None:
            try:
                out.append((label, special(value)))
                continue
            except (KeyError, TypeError, ValueError):
                pass  # not the shape expected: shown generically
        if isinstance(value, Mapping) and value:
            out.append((label, ""))
            _lines(value, depth + 1, out)
        else:
            out.append((label, _value(value)))


def format_info(summary: Mapping[str, Any]) -> str:
    """:func:`model_info`'s dict as aligned text: one "label  value" line per figure, the values in one
    column, nested parts as indented labels under their name, sizes in human units, the evaluations
    on one line each."""
    lines: list[tuple[str, str]] = []
    _lines(summary, 0, lines)
    width = max((len(label) for label, _ in lines), default=0)
    return "\n".join(f"{label:<{width}}  {value}".rstrip() for label, value in lines)
