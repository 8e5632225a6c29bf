"""The settings of a Mach run (``deepnet train --mode mach``): how sections mix real and synthetic
inputs, how they weigh their own loss against the late gradients from above, how late a gradient may
be, and the distilled input models' size and rate. Stored with the model (/mach), so that a resumed run
goes on with them; each flag given replaces its stored value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from deepnet.errors import ConfigError
from deepnet.flags import int_at_least, non_negative_number, positive

#: How a section k >= 1 takes its inputs: "mixed" (a real one when waiting, else synthetic) or "real"
#: (wait for a real one: forward-locked, as exact SGD is).
INPUT_MODES = ("mixed", "real")


@dataclass(frozen=True)
class MachSettings:
    """See ``deepnet.api.train``'s --mach-inputs, --local-weight, --delayed-weight, --max-delay,
    --distill-hidden and --distill-lr."""

    inputs: str = "mixed"
    local_weight: float = 1.0
    delayed_weight: float = 1.0
    max_delay: int = 8
    distill_hidden: int = 32
    distill_lr: float = 0.01

    def check(self) -> "MachSettings":
        """Refuse a bad value with one line naming its flag; returns the settings with floats as floats."""
        if self.inputs not in INPUT_MODES:
            raise ConfigError(f"--mach-inputs must be one of {', '.join(INPUT_MODES)}, got {self.inputs!r}")
        non_negative_number("local-weight", self.local_weight)
        non_negative_number("delayed-weight", self.delayed_weight)
        int_at_least("max-delay", self.max_delay, 0)
        positive("distill-hidden", self.distill_hidden)
        non_negative_number("distill-lr", self.distill_lr)
        return replace(self, local_weight=float(self.local_weight), delayed_weight=float(self.delayed_weight),
                       distill_lr=float(self.distill_lr), max_delay=int(self.max_delay),
                       distill_hidden=int(self.distill_hidden))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def resolve(cls, given: dict[str, Any], stored: dict[str, Any] | None) -> "MachSettings":
        """The flags ``given`` (None: not given) over the ``stored`` settings over the defaults, checked."""
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in (stored or {}).items() if k in names}
        values.update({k: v for k, v in given.items() if k in names and v is not None})
        return cls(**values).check()
