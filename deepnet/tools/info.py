"""`deepnet info`: what a model file holds, as a dict (shape, activation, step, size, last logged figures,
and for a dense model its training settings, schedules, branch, weight average and held-out figure)."""

from __future__ import annotations

import os

from deepnet.errors import ConfigError
from deepnet.formats.hdf5 import ModelFile
from deepnet.nn import branch as _branch
from deepnet.formats.mlp_file import model_kind
from deepnet.nn.mlp import MLP
from deepnet.training import ema as _ema
from deepnet.training import heldout as _heldout
from deepnet.training import schedule as _schedule


def model_info(model: str | os.PathLike) -> dict:
    """The summary of a dense or MLP model file (values may be numpy scalars, as read)."""
    if model_kind(model) == "mlp":
        summary = MLP.load(model).summary(model)
    else:
        with ModelFile.open(model) as f:
            summary = f.summary()
            summary.update(training_summary(f))
    return summary


def training_summary(model_file: ModelFile) -> dict:
    """What a dense model adds: training settings with the schedules, branch, average, last held-out figure."""
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
    out.update(_heldout.summary(model_file))
    return out
