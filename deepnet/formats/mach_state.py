"""The Mach state of a sharded model: /mach in its root (deepnet.formats.layout, "a Mach model").

Sections are the shards (ranges of the same core); what Mach adds is small and lives in the root beside
the model's heads: each section's own output head (but the last, whose head is the model's), each
section's distilled input model (but the first), each section's minibatch generator and counters, the
run's settings, and every section's step figures (/mach/log). It is written by the root's commit (the
``extra`` of deepnet.formats.shards.commit_root), so it is always of the step the root holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

from deepnet.errors import DamagedFileError
from deepnet.formats import layout


@dataclass
class SectionState:
    """One section's saved state (arrays float32)."""

    head: dict[str, np.ndarray] | None          # output_weight, output_bias; None for the last section
    distill: dict[str, np.ndarray] | None       # MACH_DISTILL_KEYS; None for section 0
    rng_state: dict | None = None
    counters: dict[str, int] = field(default_factory=dict)


@dataclass
class MachState:
    """The Mach part of a root: the sections, the settings and the step the state is of."""

    step: int
    settings: dict[str, Any]
    sections: list[SectionState]
    log: np.ndarray = field(default_factory=lambda: np.empty(0, layout.MACH_LOG_DTYPE))


def has_mach(f: h5py.File) -> bool:
    """Whether an open model file holds a Mach state."""
    return isinstance(f.get(layout.MACH_GROUP), h5py.Group)


def write_mach(f: h5py.File, state: MachState) -> None:
    """Write ``state`` as /mach of the new root being written (``f`` has no /mach yet)."""
    group = f.create_group(layout.MACH_GROUP)
    group.attrs["sections"] = np.int64(len(state.sections))
    group.attrs["step"] = np.int64(state.step)
    group.attrs["settings"] = json.dumps(state.settings, sort_keys=True)
    for k, section in enumerate(state.sections):
        g = f.create_group(layout.mach_section_group(k))
        g.attrs["rng_state"] = json.dumps(section.rng_state)
        g.attrs["counters"] = json.dumps({key: int(v) for key, v in section.counters.items()}, sort_keys=True)
        for part, arrays in (("head", section.head), ("distill", section.distill)):
            for key, value in (arrays or {}).items():
                g.create_dataset(f"{part}/{key}", data=np.asarray(value, np.float32))
    f.create_dataset(layout.MACH_LOG, data=state.log.astype(layout.MACH_LOG_DTYPE), maxshape=(None,),
                     chunks=(4096,) if state.log.shape[0] else True)


def read_mach(f: h5py.File, path: str, *, width: int, input_dim: int, n_classes: int) -> MachState | None:
    """The Mach state of an open root (None if it has none), every array's shape checked; a damaged one is
    a one-line DamagedFileError naming what is wrong."""
    if not has_mach(f):
        return None
    group = f[layout.MACH_GROUP]
    try:
        count = int(group.attrs["sections"])
        step = int(group.attrs["step"])
        settings = json.loads(group.attrs["settings"])
        sections = []
        for k in range(count):
            g = f[layout.mach_section_group(k)]
            head = None if k == count - 1 else _arrays(g, "head", layout.MACH_HEAD_KEYS,
                                                       {"output_weight": (width, n_classes),
                                                        "output_bias": (n_classes,)}, path)
            distill = None if k == 0 else _arrays(g, "distill", layout.MACH_DISTILL_KEYS, None, path)
            if distill is not None and (distill["input_weight"].shape != (input_dim, width)
                                        or distill["w2"].shape[1] != width):
                raise DamagedFileError(f"{path}: /{layout.mach_section_group(k)}/distill does not map {input_dim} "
                                       f"inputs to width {width}")
            sections.append(SectionState(head, distill, json.loads(g.attrs["rng_state"]),
                                         json.loads(g.attrs["counters"])))
        log = f[layout.MACH_LOG][()] if layout.MACH_LOG in f else np.empty(0, layout.MACH_LOG_DTYPE)
    except (KeyError, ValueError, TypeError, OSError) as exc:
        raise DamagedFileError(f"{path}: its /{layout.MACH_GROUP} state is incomplete or damaged ({exc})") from None
    if log.dtype != layout.MACH_LOG_DTYPE:
        raise DamagedFileError(f"{path}: /{layout.MACH_LOG} has dtype {log.dtype}, not {layout.MACH_LOG_DTYPE}")
    return MachState(step, settings, sections, log)


def _arrays(g: h5py.Group, part: str, keys: tuple[str, ...], shapes: dict | None, path: str) -> dict[str, np.ndarray]:
    out = {}
    for key in keys:
        ds = g[f"{part}/{key}"]
        value = np.ascontiguousarray(ds[()], dtype=np.float32)
        if ds.dtype != np.float32 or (shapes is not None and value.shape != shapes[key]) or not np.isfinite(value).all():
            raise DamagedFileError(f"{path}: /{g.name.lstrip('/')}/{part}/{key} is not finite float32"
                                   + (f" of shape {shapes[key]}" if shapes else ""))
        out[key] = value
    return out


def mach_summary(f: Any) -> dict:
    """What `deepnet info` adds for a Mach model (an open ModelFile): the sections, their settings and
    counters, and each section's latest logged step; {} for any other model."""
    state = read_mach(f.h5, f.path, width=f.width, input_dim=f.input_dim, n_classes=f.n_classes)
    if state is None:
        return {}
    out: dict[str, Any] = {"sections": len(state.sections), "state step": state.step,
                           "settings": ", ".join(f"{k} {v}" for k, v in sorted(state.settings.items()))}
    for k, section in enumerate(state.sections):
        c = section.counters
        rows = state.log[state.log["section"] == k]
        last = (f"; last step {int(rows['step'][-1])}: loss {float(rows['loss'][-1]):.4f}, batch accuracy "
                f"{float(rows['batch_acc'][-1]):.4f}") if rows.shape[0] else ""
        out[f"section {k}"] = (f"{c.get('steps', 0):,} steps ({c.get('real_inputs', 0):,} real inputs, "
                               f"{c.get('synthetic_inputs', 0):,} synthetic); late gradients {c.get('late_applied', 0):,} "
                               f"applied, {c.get('dropped', 0):,} dropped, {c.get('unanswered', 0):,} unanswered{last}")
    return {"mach": out}
