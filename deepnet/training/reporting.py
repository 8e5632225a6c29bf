"""The report rows of a dense run (train and speedrun): means over the steps since the last report.

A row is a dict, the same one ``deepnet train --json`` prints: event, step, loss, batch_acc,
seconds_per_step, layer_samples_per_s, eta_seconds and, when held-out evaluation is on, heldout_acc
(None in a row where it was not measured). Rows go to an ``on_report`` callback; nothing is printed.
"""

from __future__ import annotations

import time
from typing import Callable

from deepnet.nn.network import DeepNet, StepResult
from deepnet.training.loop import Hook, StepClock, StepEvent, mean_rows

#: Receives each report row (see the module docstring).
OnReport = Callable[[dict], None]


def ignore_report(row: dict) -> None:
    """The default ``on_report``: drop the row."""


class StepLog(Hook):
    """Reports every ``report_every`` steps and after each held-out measurement (streamed: also commits
    the carried log rows and mirrors the step into the file's attributes, see DeepNet.save).

    ETA: the steps left of ``total`` times the steady-state time per step (loop.StepClock)."""

    def __init__(self, net: DeepNet, report_every: int, on_report: OnReport, *, total: int, batch: int,
                 heldout: bool = False) -> None:
        self.net = net
        self.report_every = report_every
        self.on_report = on_report
        self.total = total
        self.batch = batch  # the training batch: the engine's own is the evaluation batch after a measurement
        self.show_heldout = heldout
        self.window: list[StepResult] = []
        self.last_loss = float("nan")
        self.last_acc = float("nan")
        self.done = 0
        self.started = time.perf_counter()
        self.clock = StepClock()
        self.heldout: float | None = None

    def eta(self) -> float:
        """Seconds left, from the steady-state time per step (NaN before the first step)."""
        return self.clock.eta(self.total - self.done) if self.done else float("nan")

    def after_step(self, event: StepEvent) -> None:
        self.window.append(event.result)
        self.clock.tick()
        self.done += 1
        if event.heldout is not None:
            self.heldout = event.heldout
        if self.done % self.report_every == 0 or event.heldout is not None:
            self.report()
            if not self.net.in_memory:
                self.net.save()

    def at_end(self) -> None:
        self.report()

    def report(self) -> None:
        """Send the row of the steps since the last report (nothing if there were none)."""
        if not self.window:
            return
        loss, acc, seconds = mean_rows([(r.loss, r.batch_acc, r.seconds) for r in self.window])
        self.last_loss, self.last_acc = loss, acc
        row = {"event": "report", "step": self.window[-1].step, "loss": loss, "batch_acc": acc,
               "seconds_per_step": seconds, "layer_samples_per_s": self.net.layers * self.batch / seconds,
               "eta_seconds": self.eta()}
        if self.show_heldout:
            row["heldout_acc"] = self.heldout
        self.heldout = None
        self.window = []
        self.on_report(row)
