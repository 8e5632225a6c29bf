"""One Mach section: a contiguous range of the core with its own output head, trained on its own.

Section k of S owns core layers [first_k, first_k + n_k) (the k-th shard of the model), an output head of
its own (the last section's is the model's output head; section 0 also owns the model's input head)
and, for k >= 1, a distilled input model (deepnet.nn.distill). A step of section k:

1. **Input.** Section 0 draws a minibatch and feeds it through the input head. Section k >= 1 takes a
   *real* input (the state section k-1 handed up for a minibatch, tagged with its sample indices) when
   one is waiting, else (``inputs="mixed"``) draws its own minibatch and feeds it through its distilled
   model: a *synthetic* input. With ``inputs="real"`` it waits for a real one instead. Every real
   input that arrives first trains the distilled model (one regression step), used or not.
2. **Late gradient.** With ``max_delay`` > 0, the oldest gradient section k+1 sent back (for one of
   section k's earlier minibatches) is taken; gradients whose minibatch is more than ``max_delay`` of
   section k's steps old are dropped and counted. Its minibatch's input (kept: batch x width floats, or
   the sample indices on section 0) joins the current batch, recomputed with the current weights.
3. **Forward** of [current | late] through the section's layers; the own head's loss on the current
   minibatch (the global target: the labels).
4. **Backward** with, at the top, ``local_weight`` x the own loss's gradient on the current columns
   (weight 1 on the last section, whose own loss is the model's) and ``delayed_weight`` x the late
   gradient on the late columns; with ``max_delay`` = 0 the gradient from above for the *current*
   minibatch is awaited and added to its columns instead (the synchronous, exact case). Layers are
   updated in place as in the exact step; the own head (and input head, distilled model) likewise.
5. **Messages.** A current minibatch with a real input is handed up. The gradient at a minibatch's
   input goes down once it is complete: at once on the last section and with ``max_delay`` = 0; else
   when its late gradient has been applied (the own loss's part, kept, plus the late part), or, when
   none comes within ``max_delay`` steps, the own loss's part alone.

So section i's objective is ``local_weight`` x (its own loss) + ``delayed_weight`` x (what the sections
above send); with ``local_weight`` 0, ``delayed_weight`` 1, ``max_delay`` 0 and real inputs, stepping
the sections in lock-step is exactly the exact SGD step of the whole depth (tests/test_mach.py holds
that bit for bit).

The section talks to its neighbours through a ``SectionLink`` (MPI in deepnet.mach.run; dictionaries in
one process in ``lockstep``, the tests' schedule).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from deepnet.distributed.pipeline import RankCore
from deepnet.kernels.loader import LayerKernels
from deepnet.mach.settings import MachSettings
from deepnet.nn import heads as _heads
from deepnet.nn.distill import DistilledInput
from deepnet.nn.finite import NonFiniteError
from deepnet.nn.losses import softmax_cross_entropy

#: The section's counters, as its figures and the model file name them.
COUNTERS = ("steps", "real_inputs", "synthetic_inputs", "skipped_inputs", "late_applied", "dropped",
            "unanswered", "distill_steps")


class SectionLink(Protocol):
    """A section's neighbours: states go up (to k + 1), gradients come down (to k - 1)."""

    def send_up(self, message: dict) -> None: ...
    def send_down(self, message: dict) -> None: ...
    def take_inputs(self, wait: bool) -> list[dict]: ...
    def take_gradients(self) -> list[dict]: ...
    def wait_gradient(self, minibatch: int) -> list[dict]: ...


@dataclass
class _Kept:
    """A minibatch this section handed up, kept until its late gradient comes (or ``max_delay`` passes)."""

    step: int
    idx: np.ndarray                   # sample indices
    h_in: np.ndarray | None           # the real input (w, batch) of section k >= 1; None on section 0
    below: int | None                 # the minibatch's id on section k - 1
    local: np.ndarray | None          # the own loss's gradient at the input (w, batch), if weighted


@dataclass
class _Current:
    """What a step keeps between its forward and its backward."""

    idx: np.ndarray
    real: bool
    below: int | None
    x: np.ndarray | None = None       # raw inputs of [current | late] (section 0)
    h0: np.ndarray | None = None      # input head outputs (batch, w) of [current | late] (section 0)
    h_in: np.ndarray | None = None    # the current input (w, batch), kept for a late gradient
    late: tuple[dict, _Kept] | None = None
    out: _heads.OutputGradients | None = None
    loss: float = 0.0
    accuracy: float = 0.0


@dataclass
class StepFigures:
    """One step's figures: the own head's loss and batch accuracy, whether the input was real."""

    loss: float
    accuracy: float
    real: bool


@dataclass
class MachSection:
    """Section ``index`` of ``count``: its layers (``params``, updated in place), heads and state."""

    index: int
    count: int
    params: np.ndarray
    kernels: LayerKernels
    width: int
    alpha: float
    chunk_layers: int
    batch: int
    settings: MachSettings
    heads: dict[str, np.ndarray]               # output_* (own head); input_* too on section 0
    distill: DistilledInput | None             # sections k >= 1
    rng: np.random.Generator
    x_train: np.ndarray                        # (n, 784) float32
    y_train: np.ndarray
    link: SectionLink
    threads: int = 1
    counters: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    distill_loss: float = math.nan             # the latest regression loss
    t: int = 0                                 # steps taken by this section in this run (minibatch ids)

    def __post_init__(self) -> None:
        sizes = [self.batch] + ([2 * self.batch] if self.settings.max_delay > 0 and not self.last else [])
        self.cores = {n: RankCore(self.params, self.kernels, self.width, self.alpha, self.chunk_layers, [n],
                                  self.threads) for n in sizes}
        self.inputs: list[dict] = []
        self.late: list[dict] = []
        self.kept: OrderedDict[int, _Kept] = OrderedDict()
        self.now: _Current | None = None

    @property
    def first(self) -> bool:
        return self.index == 0

    @property
    def last(self) -> bool:
        return self.index == self.count - 1

    # ------------------------------------------------------------------ one step

    def step(self, layer_lr: float, head_lr: float) -> StepFigures:
        """One whole step (``begin`` then ``finish``)."""
        self.begin()
        return self.finish(layer_lr, head_lr)

    def begin(self) -> None:
        """Take an input (and a late gradient), run the forward and the own head's loss, hand the state up."""
        s = self.settings
        self._receive(wait=not self.first and s.inputs == "real" and not self.inputs)
        cur = self._take_input()
        h_cur = cur.h_in
        if s.max_delay > 0 and not self.last:
            cur.late = self._take_late()
        if cur.late is not None:
            kept = cur.late[1]
            if self.first:
                x_late = self.x_train[kept.idx]
                cur.x = np.concatenate([cur.x, x_late])
                cur.h0 = np.concatenate([cur.h0, _heads.input_head(self.heads, x_late)])
                h_late = np.ascontiguousarray(cur.h0[self.batch:].T)
            else:
                h_late = kept.h_in
            h = np.concatenate([h_cur, h_late], axis=1)
        else:
            h = h_cur.copy()
        self.cores[h.shape[1]].forward(h, 0)
        top = h[:, :self.batch].T
        cur.loss, cur.accuracy, dlogits = softmax_cross_entropy(_heads.output_head(self.heads, top),
                                                                self.y_train[cur.idx])
        cur.out = _heads.output_gradients(self.heads, top, dlogits)
        if not math.isfinite(cur.loss):
            raise NonFiniteError(f"the loss of section {self.index} is {cur.loss}")
        if not cur.out.finite():
            raise NonFiniteError(f"the gradient reaching section {self.index}'s layers is not finite")
        if cur.real and not self.last:
            self.link.send_up({"id": self.t, "idx": cur.idx, "h": np.ascontiguousarray(h[:, :self.batch])})
        self.now = cur

    def finish(self, layer_lr: float, head_lr: float) -> StepFigures:
        """The backward and the updates of the step ``begin`` started; the gradients sent down."""
        cur, s, b = self.now, self.settings, self.batch
        self.now = None
        late = cur.late
        g = np.zeros((self.width, b * (2 if late else 1)), np.float32)
        if self.last:
            g[:, :b] = cur.out.core
        elif s.local_weight != 0:
            g[:, :b] = np.float32(s.local_weight) * cur.out.core
        if s.max_delay == 0 and cur.real and not self.last:
            above = self._await_gradient(self.t)
            if above is not None:
                part = np.float32(s.delayed_weight) * above["g"]
                if s.local_weight != 0:
                    g[:, :b] += part
                else:
                    g[:, :b] = part
        if late is not None:
            g[:, b:] = np.float32(s.delayed_weight) * late[0]["g"]
        self.cores[g.shape[1]].backward(g, 0, layer_lr)
        new = _heads.stepped_output(self.heads, cur.out, head_lr)
        if self.first:
            new.update(_heads.stepped_input(self.heads, cur.x, cur.h0, g, head_lr))
        _heads.assign_stepped(self.heads, new, f" of section {self.index}")
        self._hand_down(cur, g)
        self.counters["steps"] += 1
        self.counters["real_inputs" if cur.real else "synthetic_inputs"] += 1
        self.t += 1
        return StepFigures(cur.loss, cur.accuracy, cur.real)

    # ------------------------------------------------------------------ the parts

    def _receive(self, wait: bool) -> None:
        """Every real input and late gradient that arrived; each real input trains the distilled model."""
        if not self.first:
            for message in self.link.take_inputs(wait):
                self.distill_loss = self.distill.step(self.x_train[message["idx"]], message["h"].T,
                                                      self.settings.distill_lr)
                self.counters["distill_steps"] += 1
                self.inputs.append(message)
        if not self.last:
            self.late.extend(self.link.take_gradients())

    def _draw(self) -> np.ndarray:
        return self.rng.integers(0, self.x_train.shape[0], size=self.batch)

    def _take_input(self) -> _Current:
        if self.first:
            idx = self._draw()
            x = self.x_train[idx]
            h0 = _heads.input_head(self.heads, x)
            return _Current(idx, True, None, x=x, h0=h0, h_in=np.ascontiguousarray(h0.T))
        if self.inputs:
            if self.settings.inputs == "real":
                message = self.inputs.pop(0)           # every real input, in order
            else:
                message = self.inputs.pop()            # the newest; the older ones only trained the distillation
                self.counters["skipped_inputs"] += len(self.inputs)
                self.inputs.clear()
            return _Current(message["idx"], True, message["id"], h_in=np.ascontiguousarray(message["h"]))
        idx = self._draw()
        synthetic = self.distill.predict(self.x_train[idx])
        return _Current(idx, False, None, h_in=np.ascontiguousarray(synthetic.T))

    def _take_late(self) -> tuple[dict, _Kept] | None:
        """The oldest usable late gradient and what was kept of its minibatch (too old ones dropped)."""
        self._expire()
        while self.late:
            message = self.late.pop(0)
            kept = self.kept.pop(message["id"], None)
            if kept is None:
                self.counters["dropped"] += 1
                continue
            self.counters["late_applied"] += 1
            return message, kept
        return None

    def _expire(self) -> None:
        """Forget minibatches older than ``max_delay`` steps; hand down their own loss's part alone."""
        while self.kept:
            oldest = next(iter(self.kept.values()))
            if self.t - oldest.step <= self.settings.max_delay:
                break
            self.kept.popitem(last=False)
            self.counters["unanswered"] += 1
            if oldest.local is not None and oldest.below is not None:
                self.link.send_down({"id": oldest.below, "g": oldest.local})

    def _await_gradient(self, minibatch: int) -> dict | None:
        """The gradient from above for ``minibatch`` (``max_delay`` 0: the synchronous case)."""
        found = None
        for message in self.link.wait_gradient(minibatch):
            if message["id"] == minibatch and found is None:
                found = message
            else:
                self.counters["dropped"] += 1
        return found

    def _hand_down(self, cur: _Current, g: np.ndarray) -> None:
        """Send the complete input gradients down; keep the current minibatch for its late gradient."""
        b = self.batch
        if cur.late is not None:
            message, kept = cur.late
            if kept.below is not None:
                bottom = g[:, b:] if kept.local is None else g[:, b:] + kept.local
                self.link.send_down({"id": kept.below, "g": np.ascontiguousarray(bottom)})
        if not cur.real:
            return
        complete = self.last or self.settings.max_delay == 0
        if complete:
            if cur.below is not None:
                self.link.send_down({"id": cur.below, "g": np.ascontiguousarray(g[:, :b])})
            return
        local = np.ascontiguousarray(g[:, :b]) if self.settings.local_weight != 0 and cur.below is not None else None
        self.kept[self.t] = _Kept(self.t, cur.idx, None if self.first else cur.h_in, cur.below, local)


# ------------------------------------------------------------------ in one process


class QueueSectionLink:
    """A section's neighbours in one process: each section's inbox is a list in shared dicts."""

    def __init__(self, index: int, ups: dict[int, list], downs: dict[int, list]) -> None:
        self.index, self.ups, self.downs = index, ups, downs

    def send_up(self, message: dict) -> None:
        self.ups[self.index + 1].append({**message, "h": message["h"].copy()})

    def send_down(self, message: dict) -> None:
        self.downs[self.index - 1].append({**message, "g": message["g"].copy()})

    def take_inputs(self, wait: bool) -> list[dict]:
        out, self.ups[self.index][:] = list(self.ups[self.index]), []
        if wait and not out:
            raise RuntimeError(f"section {self.index} waits for an input that the schedule did not send")
        return out

    def take_gradients(self) -> list[dict]:
        out, self.downs[self.index][:] = list(self.downs[self.index]), []
        return out

    def wait_gradient(self, minibatch: int) -> list[dict]:
        out = self.take_gradients()
        if not any(m["id"] == minibatch for m in out):
            raise RuntimeError(f"section {self.index} waits for a gradient that the schedule did not send")
        return out


def queue_links(count: int) -> list[QueueSectionLink]:
    """The links of ``count`` sections in one process."""
    ups: dict[int, list] = {k: [] for k in range(count + 1)}
    downs: dict[int, list] = {k: [] for k in range(-1, count)}
    return [QueueSectionLink(k, ups, downs) for k in range(count)]


def lockstep(sections: list[MachSection], layer_lr: float, head_lr: float) -> list[StepFigures]:
    """One step of every section in one process: every ``begin`` bottom-up, then every ``finish``
    top-down (with ``max_delay`` 0 each section's gradient from above is then there)."""
    for section in sections:
        section.begin()
    return [section.finish(layer_lr, head_lr) for section in reversed(sections)][::-1]
