"""Learning-rate schedules: the learning rate of each step, for the dense model and the MLP baseline.

Dense training multiplies the core's and the heads' base learning rates by a schedule's factor at each
global step; the MLP baseline's ``--schedule`` (:func:`parse_run_schedule`) is a Schedule over the steps
of one run, with a ``step`` kind that sets learning rates outright.

A ``Schedule`` is a small frozen value: ``kind`` (constant, cosine or linear), ``warmup_steps``,
``decay_steps``, ``final_ratio`` and ``start_step``. Steps are *global*: the step numbers of the model
file, so a schedule stored with the model continues exactly where it stopped when training resumes.
``factor(t)`` is the factor for the step taken from committed step ``t`` (the model's step before it:
the first step of a new model has t = 0)::

    s = start_step, w = warmup_steps, e = decay_steps
    t <  s + w:             (t - s + 1) / w                          linear warmup to 1
    constant:               1
    cosine (after warmup):  r + (1 - r) * (1 + cos(pi * p)) / 2      p = clip((t - s - w) / (e - s - w), 0, 1)
    linear (after warmup):  1 - (1 - r) * p                          r = final_ratio

so a decay reaches ``final_ratio`` at step ``e`` and stays there. ``step``: the base rate until
``start_step + T1``, then LR1 until ``start_step + T2``, and so on (``points``, learning rates not factors). ``decay_steps`` None means "the end of
the run that sets the schedule": :func:`resolve` fills it in when training starts, and the resolved value
is what the model file stores.

How training chooses its schedules (:func:`resolve`), and why: the schedules in force are stored with
every committed step (in the commit record's training settings, beside the base learning rates), so

- a run given none of ``--schedule --warmup --final-lr-ratio --decay-steps`` continues the stored
  schedules exactly (a new model gets ``RECIPE``'s: constant);
- a run given any of them makes a schedule starting at the model's current step: the flags given, the
  other fields as stored (``decay_steps`` as given, else the end of this run: the model's step plus
  --steps, or the --until-step given). If that schedule is the stored one but for its start (the same
  kind, warmup, final ratio, decay end and, for ``step``, the same points), the stored one continues
  unchanged; otherwise the new one starts now. So re-running the command of an interrupted run
  finishes its schedule when the run's end is a global step (``--until-step N``, or
  ``--decay-steps``), while ``--steps K --schedule cosine`` given again starts a new decay over the K
  more steps.

Dense ``--schedule step:T1=LR1[,T2=LR2...]``: the values are new values of the layer rate from step
``start + T`` on (T counts from the start of the schedule, the first step of the run that set it, as
for the MLP); the head rate keeps its ratio to the layer rate (:func:`rates`). It takes no warmup,
final ratio or decay end. It is stored and continued like the other kinds.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Mapping

from deepnet.errors import ConfigError

KINDS = ("constant", "cosine", "linear")
#: Dense training's --schedule values.
DENSE_SCHEDULES = "constant, cosine, linear or step:T=LR[,T=LR...]"
#: The MLP baseline's --schedule values (each a Schedule over the run; see parse_run_schedule).
RUN_SCHEDULES = "cosine, linear, constant or step:T=LR[,T=LR...]"


def _int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) and not hasattr(value, "__index__"):
        raise ConfigError(f"--{name} must be an integer >= {minimum}, got {value!r}")
    value = int(value)
    if value < minimum:
        raise ConfigError(f"--{name} must be an integer >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class Schedule:
    """A learning-rate factor over global steps (see the module docstring for the formulas)."""

    kind: str = "constant"
    warmup_steps: int = 0
    #: The global step where the decay ends (``final_ratio`` from then on); None: the end of the run.
    decay_steps: int | None = None
    final_ratio: float = 0.0
    #: The global step where the schedule (its warmup) begins.
    start_step: int = 0
    #: kind "step": (steps after start_step, learning rate) pairs, the steps increasing.
    points: tuple[tuple[int, float], ...] = ()
    #: cosine: the angle as pi * t / span rather than pi * (t / span). The two roundings differ in the
    #: last bit; the MLP baseline has always used this one, dense training the other.
    angle_first: bool = False

    def __post_init__(self) -> None:
        kind = self.kind.strip().lower() if isinstance(self.kind, str) else None
        if kind not in KINDS and not (kind == "step" and self.points):
            raise ConfigError(f"--schedule must be one of {', '.join(KINDS)}, got {self.kind!r}")
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "points", tuple((int(at), float(lr)) for at, lr in self.points))
        object.__setattr__(self, "angle_first", bool(self.angle_first))
        object.__setattr__(self, "warmup_steps", _int("warmup", self.warmup_steps, 0))
        object.__setattr__(self, "start_step", _int("start-step", self.start_step, 0))
        if self.decay_steps is not None:
            object.__setattr__(self, "decay_steps", _int("decay-steps", self.decay_steps, 1))
        ratio = self.final_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not math.isfinite(ratio) \
                or not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"--final-lr-ratio must be a number in [0, 1], got {ratio!r}")
        object.__setattr__(self, "final_ratio", float(ratio))

    @property
    def decays(self) -> bool:
        """Whether the factor decays towards ``final_ratio`` (cosine, linear)."""
        return self.kind in ("cosine", "linear")

    def lr(self, base: float, step: int, end: int | None = None) -> float:
        """The learning rate of the step taken from committed ``step``, for base rate ``base``."""
        if self.kind == "step":
            current = base
            for at, value in self.points:
                if step - self.start_step >= at:
                    current = value
            return current
        return base * self.factor(step, end)

    def factor(self, step: int, end: int | None = None) -> float:
        """The factor for the step taken from committed step ``step``; ``end`` stands in for an unresolved
        ``decay_steps``."""
        if self.kind == "step":
            raise ConfigError("a step schedule sets learning rates, not factors: use Schedule.lr")
        t = int(step) - self.start_step
        if t < 0:
            t = 0
        w = self.warmup_steps
        if t < w:
            return (t + 1) / w
        if not self.decays:
            return 1.0
        stop = self.decay_steps if self.decay_steps is not None else end
        if stop is None:
            raise ConfigError(f"a {self.kind} schedule needs decay_steps (the step where its decay ends)")
        span = stop - self.start_step - w
        p = 1.0 if span <= 0 else min(1.0, max(0.0, (t - w) / span))
        r = self.final_ratio
        if self.kind == "cosine":
            angle = math.pi * (t - w) / span if self.angle_first and 0 < p < 1 else math.pi * p
            return r + (1.0 - r) * 0.5 * (1.0 + math.cos(angle))
        return 1.0 - (1.0 - r) * p

    def resolved(self, end: int) -> "Schedule":
        """This schedule with an unset ``decay_steps`` of a decaying kind set to ``end``."""
        if self.decays and self.decay_steps is None:
            return replace(self, decay_steps=int(end))
        return self

    def describe(self) -> str:
        """One line for people: 'cosine from step 0 to 0.1x at step 2000, warmup 100'."""
        parts = [self.kind]
        if self.kind == "step":
            parts.append(", ".join(f"{lr:g} from step {self.start_step + at}" for at, lr in self.points))
        elif self.decays:
            end = "the end of the run" if self.decay_steps is None else f"step {self.decay_steps}"
            parts.append(f"from step {self.start_step} to {self.final_ratio:g}x at {end}")
        elif self.start_step:
            parts.append(f"from step {self.start_step}")
        if self.warmup_steps:
            parts.append(f"warmup {self.warmup_steps}")
        return " ".join(parts[:1]) + (" " + ", ".join(parts[1:]) if len(parts) > 1 else "")

    # -- storage -----------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict; the MLP-only fields only when set, so a dense model's stored
        schedules read as they always have."""
        out = asdict(self)
        if not self.points:
            del out["points"]
        if not self.angle_first:
            del out["angle_first"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Schedule":
        if not isinstance(data, Mapping):
            raise ConfigError(f"a stored schedule must be a JSON object, got {type(data).__name__}")
        known = {"kind", "warmup_steps", "decay_steps", "final_ratio", "start_step", "points", "angle_first"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"a stored schedule has unknown fields {', '.join(unknown)}")
        return cls(**dict(data))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Schedule":
        try:
            data = json.loads(text)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"a stored schedule is not valid JSON ({exc})") from None
        return cls.from_dict(data)


#: The keys of the training settings (stored with every commit) that hold the schedules.
SETTINGS_KEYS = ("layer_schedule", "head_schedule")


def resolve(stored: Mapping[str, Any] | None, *, step: int, run_end: int, default: Schedule,
            kind: str | None = None, warmup: int | None = None, final_ratio: float | None = None,
            decay_steps: int | None = None) -> dict[str, Schedule]:
    """The layer and head schedules of a run starting at committed ``step`` and ending at ``run_end``.

    ``stored`` is the model's training settings (None for a new model); the flags are None when not
    given; ``kind`` may be a ``step:T=LR[,...]`` spec. See the module docstring for the rule.
    """
    stored = stored or {}
    flags: dict[str, Any] = {"kind": kind, "warmup_steps": warmup, "final_ratio": final_ratio,
                             "decay_steps": decay_steps}
    if isinstance(kind, str) and kind.strip().lower().startswith("step:"):
        flags.update(kind="step", points=parse_points(kind))
    elif kind is not None and (not isinstance(kind, str) or kind.strip().lower() not in KINDS):
        raise ConfigError(f"--schedule must be {DENSE_SCHEDULES}, got {kind!r}")
    given = {k: v for k, v in flags.items() if v is not None}
    if decay_steps is not None:
        _int("decay-steps", decay_steps, 1)
        if decay_steps <= step:
            raise ConfigError(f"--decay-steps is the global step where the decay ends and must be after the "
                              f"model's step {step}, got {decay_steps}")
    out = {}
    for key in SETTINGS_KEYS:
        stored_schedule = None
        if key in stored and stored[key] is not None:
            try:
                stored_schedule = Schedule.from_dict(stored[key])
            except ConfigError as exc:
                raise ConfigError(f"the model's stored {key} is unusable: {exc}") from None
        base = default if stored_schedule is None else stored_schedule
        if not given:
            out[key] = base.resolved(run_end)
            continue
        fields = base.to_dict()
        if given.get("kind", "step") != "step":
            fields.pop("points", None)  # a step schedule replaced by a decay
        fields.update(given, start_step=step)
        if decay_steps is None:
            fields["decay_steps"] = None
        if fields["kind"].strip().lower() == "step":
            if any(flags[k] is not None for k in ("warmup_steps", "final_ratio", "decay_steps")):
                raise ConfigError("a step schedule sets the rates outright: it takes no --warmup, "
                                  "--final-lr-ratio or --decay-steps")
            fields.update(warmup_steps=0, final_ratio=0.0)
        schedule = Schedule(**fields).resolved(run_end)
        if stored_schedule is not None and replace(schedule, start_step=stored_schedule.start_step) == stored_schedule:
            schedule = stored_schedule  # the same schedule: it goes on from where it started
        out[key] = schedule
    return out


def rates(layer: Schedule, head: Schedule, base_layer: float, base_head: float, step: int) -> tuple[float, float]:
    """The (layer, head) learning rates of the step taken from committed ``step`` of a dense run whose
    base rates are ``base_layer`` and ``base_head``. A step schedule sets the layer rate outright, and
    the head rate keeps its ratio to the layer rate (``base_head * layer / base_layer``; the base head
    rate while the base layer rate is 0)."""
    layer_lr = layer.lr(base_layer, step)
    if head.kind == "step":
        value = head.lr(base_layer, step)
        head_lr = base_head * (value / base_layer) if base_layer else base_head
    else:
        head_lr = head.lr(base_head, step)
    return layer_lr, head_lr


def settings(schedules: Mapping[str, Schedule]) -> dict:
    """The schedules as training-settings entries (plain dicts, JSON-ready)."""
    return {key: schedules[key].to_dict() for key in SETTINGS_KEYS}


def parse_run_schedule(spec: str, steps: int) -> Schedule:
    """The MLP baseline's ``--schedule`` over a run of ``steps`` steps (t = 0 .. steps-1 from its start):

    - ``cosine``: lr * (1 + cos(pi * t / steps)) / 2, from lr down towards 0;
    - ``linear``: lr * (1 - t / steps);
    - ``constant``: lr throughout;
    - ``step:T1=LR1[,T2=LR2...]``: lr until run step T1, then LR1 until T2, and so on.
    """
    if not isinstance(spec, str):
        raise ConfigError(f"--schedule must be {RUN_SCHEDULES}, got {spec!r}")
    name = spec.strip().lower()
    if name in KINDS:
        return Schedule(name, decay_steps=steps, angle_first=True)
    if not name.startswith("step:"):
        raise ConfigError(f"--schedule must be {RUN_SCHEDULES}, got {spec!r}")
    return Schedule("step", points=parse_points(spec))


def parse_points(spec: str) -> tuple[tuple[int, float], ...]:
    """The (T, LR) pairs of a ``step:T1=LR1[,T2=LR2...]`` spec: T >= 1 increasing, LR finite >= 0."""
    name = spec.strip().lower()
    points: list[tuple[int, float]] = []
    for part in name[5:].split(","):
        try:
            at, value = part.split("=")
            at_i, value_f = int(at), float(value)
        except ValueError:
            raise ConfigError(f"--schedule {spec!r}: {part!r} is not T=LR (e.g. step:2500=0.03)") from None
        if at_i < 1 or not math.isfinite(value_f) or value_f < 0:
            raise ConfigError(f"--schedule {spec!r}: {part!r} needs a step >= 1 and a finite lr >= 0")
        if points and at_i <= points[-1][0]:
            raise ConfigError(f"--schedule {spec!r}: the steps must increase")
        points.append((at_i, value_f))
    return tuple(points)

