"""`mpiexec -n S deepnet train ROOT --mode mach --sections S`: S sections of one core, each an MPI rank,
training asynchronously (deepnet.mach.section says what a section's step is).

No section waits for another during training (with the default mixed inputs and a delay bound above
zero): messages go out with non-blocking sends and come in when a section looks between its steps; the
time any section does spend waiting for another (``blocked``) is measured and reported.

The model is a sharded model with one shard per section (deepnet.formats.shards), the Mach state in its
root (deepnet.formats.mach_state). Commits are the sharded model's two-phase commits at a step every
section passes, a *round*: each section writes its shard version when it reaches the round's step (no
waiting), and sends rank 0 its small state (heads, distilled model, generator, counters, log rows);
rank 0 commits the root once every section's version of the round has come. Rounds come every
--checkpoint-every steps, else about every RECIPE.checkpoint_seconds of rank 0's steps, and at the end.
A killed section leaves the root at the last complete round: resume works from there.

The end: every section runs to the planned step and makes the last round there. Ctrl-C or SIGTERM (or
--time-limit) on any rank: rank 0 asks every section for its step, every section then runs on to the
furthest one (E) and the last round is made at E. Then every rank drains its messages (so that no send
is left pending), the test set goes through the sections (each section's own head on the stack below
it, and each distilled input model as a shortcut), and rank 0 returns the figures.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from deepnet.data.dataset import Dataset
from deepnet.distributed.mpi import RankLost, Ranks, launched_size, world
from deepnet.distributed.run import check_options as check_distributed
from deepnet.distributed.run import open_data, open_run, plan_run, release_locks
from deepnet.errors import ConfigError, DeepnetError
from deepnet.formats import layout, shards
from deepnet.formats.mach_state import MachState, SectionState, read_mach, write_mach
from deepnet.formats.h5io import open_h5
from deepnet.kernels.loader import kernels_for
from deepnet.mach.evaluate import evaluate_sections
from deepnet.mach.link import MAX_PAUSE, TAG_CONTROL, TAG_DOWN, TAG_UP, Abandon, MpiSectionLink
from deepnet.mach.section import MachSection
from deepnet.mach.settings import MachSettings
from deepnet.nn.distill import DistilledInput
from deepnet.training import loop
from deepnet.training.loop import ProgressBar, mean_rows
from deepnet.training.options import RECIPE, RunOptions, TrainOptions
from deepnet.training.reporting import OnReport
from deepnet.training.signals import Interrupted, StopSignal

log = logging.getLogger(__name__)

#: The tag of the sections' figures gathered on rank 0 (above the sections' message tags).
TAG_TOTALS = 7 << 20

#: Steps rank 0 times before it sets the rounds' spacing from RECIPE.checkpoint_seconds.
ROUND_WARMUP_STEPS = 3

def _seed_rng(seed: int, index: int, state: dict | None) -> np.random.Generator:
    """Section ``index``'s minibatch generator: section 0's is the model's (as one process draws)."""
    if index == 0:
        return loop.minibatch_rng(seed, state, lambda exc: f"the stored minibatch generator state is unusable ({exc})")
    rng = np.random.default_rng([seed, 2, index])
    if state is not None:
        rng.bit_generator.state = state
    return rng


class _Runner:
    """One rank's run: its section's steps, the control protocol, the rounds."""

    def __init__(self, ranks: Ranks, section: MachSection, *, root: Path, first: int, until: int,
                 plan: RunOptions, settings: dict, state: MachState, report_every: int,
                 round_every: int | None, time_limit: float | None, on_report: OnReport, stop: StopSignal) -> None:
        self.ranks, self.comm, self.section = ranks, ranks.comm, section
        self.root, self.first, self.until, self.end = root, first, until, until
        self.plan, self.settings, self.state = plan, settings, state
        self.report_every, self.on_report, self.stop = report_every, on_report, stop
        self.round_every = round_every
        self.fixed_rounds = round_every is not None
        self.next_round = self._round_after(first) if round_every else None
        self.time_limit = time_limit
        self.rank, self.size = ranks.rank, ranks.size
        self.halted = self.asked = self.done = self.exit = False
        self.stop_at: dict[int, int] = {}
        self.rates: dict[int, dict] = {}
        self.rate_mark: tuple[int, float] | None = None  # (steps, time) after the warm-up steps
        self.planned = False
        self.rounds: dict[int, dict[int, dict]] = {}
        self.committed = first
        self.sent_from: set[int] = set()
        self.log_rows: list[tuple] = []
        self.window: list[tuple[float, float, float, bool]] = []  # the report window's steps
        self.reached_end_at: float | None = None
        self.end_wait = 0.0
        self.started = time.perf_counter()
        self.made: set[int] = set()
        from mpi4py import MPI  # a Mach run is an MPI run
        self.MPI = MPI

    @property
    def step_now(self) -> int:
        return self.first + self.section.t

    def _round_after(self, step: int) -> int:
        every = self.round_every
        return self.first + ((step - self.first) // every + 1) * every

    # ------------------------------------------------------------------ control messages

    def control(self, message: dict, dest: int) -> None:
        self.section.link.isend(message, dest, TAG_CONTROL)

    def to_all(self, message: dict) -> None:
        for dest in range(self.size):
            if dest != self.rank:
                self.control(message, dest)

    def poll(self) -> None:
        """Handle every control message waiting (any rank may call it at any moment between kernel calls),
        and this rank's own stop request or time limit."""
        status = self.MPI.Status()
        while self.comm.iprobe(source=self.MPI.ANY_SOURCE, tag=TAG_CONTROL, status=status):
            source = status.Get_source()
            self.handle(self.comm.recv(source=source, tag=TAG_CONTROL), source)
        if self.stop.count and not self.asked:
            self.asked = True
            if self.rank == 0:
                self.begin_stop()
            else:
                self.control({"kind": "stop?"}, 0)
        if self.time_limit is not None and not self.planned and self.rank == 0 \
                and time.perf_counter() - self.started >= self.time_limit / 2:
            self.planned = True
            self.rates[0] = self.rate()
            self.to_all({"kind": "rate?"})
            self._maybe_plan()

    def handle(self, message: dict, source: int) -> None:
        kind = message["kind"]
        if kind == "every" and not self.fixed_rounds and self.round_every is None:
            self.round_every = message["steps"]
            self.next_round = self._round_after(self.step_now)
        elif kind == "rate?":
            self.control({"kind": "rate", **self.rate()}, 0)
        elif kind == "rate":
            self.rates[source] = {"step": message["step"], "per_s": message["per_s"]}
            self._maybe_plan()
        elif kind == "stop?" and not self.asked:
            self.asked = True
            self.begin_stop()
        elif kind == "stop":
            self.asked = self.halted = True
            self.control({"kind": "at", "step": self.step_now}, 0)
        elif kind == "at":
            self.stop_at[source] = message["step"]
            self._maybe_end()
        elif kind == "end":
            self.end, self.halted = message["step"], False
        elif kind == "round":
            self.rounds.setdefault(message["step"], {})[source] = message
            self._maybe_commit()
        elif kind == "report":
            self.on_report(message["row"])
        elif kind == "done":
            self.done = True
        elif kind == "sent":
            self.sent_from.add(source)
        elif kind == "exit":
            self.exit = True

    def rate(self) -> dict:
        """This section's step and its steps per second since its warm-up steps (or since the start)."""
        done, since = self.rate_mark or (0, self.started)
        return {"step": self.step_now,
                "per_s": (self.section.t - done) / max(time.perf_counter() - since, 1e-9)}

    def _maybe_plan(self) -> None:
        """Rank 0, halfway through --time-limit: the end is the step the slowest section reaches at the
        limit, so that every section ends by then (the faster ones wait at the end, measured)."""
        if len(self.rates) < self.size or self.asked:
            return
        left = self.time_limit - (time.perf_counter() - self.started)
        end = min(r["step"] + int(r["per_s"] * max(left, 0.0)) for r in self.rates.values())
        end = max(end, max(r["step"] for r in self.rates.values()))
        if end < self.end:
            self.end = end
            self.to_all({"kind": "end", "step": end})

    def begin_stop(self) -> None:
        """Rank 0: every section stops, says its step, and runs on to the furthest."""
        if self.halted or self.done:
            return
        self.halted = True
        self.stop_at[0] = self.step_now
        self.to_all({"kind": "stop"})
        self._maybe_end()

    def _maybe_end(self) -> None:
        if self.rank == 0 and self.halted and len(self.stop_at) == self.size:
            self.end = min(self.end, max(self.stop_at.values()))
            self.halted = False
            self.to_all({"kind": "end", "step": self.end})

    def while_waiting(self) -> bool:
        """What a waiting step does between two looks: answer the control messages. Returns whether it is
        to be abandoned: the run ends at the step it would take (every other section stopped at or below
        it, so what it waits for will not come)."""
        self.poll()
        return not self.halted and self.step_now >= self.end

    # ------------------------------------------------------------------ rounds

    def make_round(self, step: int) -> None:
        """Write this section's shard version of ``step`` and send its state to rank 0 (no waiting)."""
        s = self.section
        version = shards.write_core_version(self.root, self.rank, step, s.params)
        own_head = {k: s.heads[k].copy() for k in layout.MACH_HEAD_KEYS}
        message = {"kind": "round", "step": step, "version": str(version), "head": own_head,
                   "input_head": {k: v.copy() for k, v in s.heads.items() if k.startswith("input")} if s.first else None,
                   "distill": None if s.distill is None else {k: v.copy() for k, v in s.distill.params().items()},
                   "rng": s.rng.bit_generator.state, "counters": self.counters(), "log": self.log_rows}
        self.log_rows = []
        if self.rank == 0:
            self.handle(message, 0)
        else:
            self.control(message, 0)

    def counters(self) -> dict[str, int]:
        base = self.state.sections[self.rank].counters if self.state.sections else {}
        return {k: int(base.get(k, 0)) + v for k, v in self.section.counters.items()}

    def _maybe_commit(self) -> None:
        """Rank 0: commit the newest complete round (older incomplete ones are dropped)."""
        complete = [t for t, parts in self.rounds.items() if len(parts) == self.size and t > self.committed]
        if not complete:
            return
        step = max(complete)
        parts = self.rounds[step]
        for t in [t for t in self.rounds if t <= step]:
            del self.rounds[t]
        last = parts[self.size - 1]
        heads = {**parts[0]["input_head"], **last["head"]}
        sections = [SectionState(None if k == self.size - 1 else parts[k]["head"], parts[k]["distill"],
                                 parts[k]["rng"], parts[k]["counters"]) for k in range(self.size)]
        rows = [(k, *row) for k in range(self.size) for row in parts[k]["log"]]
        new_log = np.array(rows, dtype=layout.MACH_LOG_DTYPE) if rows else np.empty(0, layout.MACH_LOG_DTYPE)
        state = MachState(step, self.section.settings.as_dict(), sections, np.concatenate([self.state.log, new_log]))
        model_rows = [(r[0], r[1], r[2], r[3]) for r in last["log"]]
        shards.commit_root(self.root, step=step, versions=[Path(parts[k]["version"]) for k in range(self.size)],
                           heads=heads, rng_state=parts[0]["rng"], train_settings=self.settings,
                           log_rows=np.array(model_rows, dtype=layout.LOG_DTYPE) if model_rows else None,
                           extra=lambda f: write_mach(f, state))
        self.state.log = state.log
        self.committed = step

    # ------------------------------------------------------------------ the run

    def run(self, bar: ProgressBar) -> None:
        """Step until the end, answering messages; make the rounds; rank 0 commits them. Waiting for the
        others (for the end step of a stop, or at the end) has the --rank-timeout deadline."""
        pause = 1e-5
        idle_since: float | None = None
        while not self.done:
            self.poll()
            if self.halted or self.step_now >= self.end:
                if not self.halted and self.step_now >= self.end and self.reached_end_at is None:
                    self.reached_end_at = time.perf_counter()
                    if self.committed < self.end and self.end not in self.made:
                        self.made.add(self.end)
                        self.make_round(self.end)
                if self.rank == 0 and self.committed >= self.end and not self.halted and self.step_now >= self.end:
                    self.to_all({"kind": "done"})
                    self.done = True
                    break
                now = time.perf_counter()
                idle_since = idle_since or now
                if now - idle_since > self.ranks.timeout:
                    waiting = "the step every section stops at" if self.halted else "the other sections' last round"
                    raise RankLost(f"rank {self.rank} waited {self.ranks.timeout:g} s for {waiting}; a section died "
                                   "or hangs (see --rank-timeout)")
                time.sleep(pause)
                pause = min(MAX_PAUSE, pause * 2)
                self.end_wait += time.perf_counter() - now
                continue
            idle_since = None
            pause = 1e-5
            self._step(bar)

    def _step(self, bar: ProgressBar) -> None:
        s = self.section
        step = self.step_now
        rates = self.plan.lrs(step)
        started = time.perf_counter()
        rng_state = s.rng.bit_generator.state
        try:
            figures = s.step(rates["layer_lr"], rates["head_lr"])
        except Abandon:
            s.rng.bit_generator.state = rng_state
            s.now = None
            return
        seconds = time.perf_counter() - started
        self.log_rows.append((step + 1, figures.loss, figures.accuracy, seconds, figures.real))
        self.window.append((figures.loss, figures.accuracy, seconds, figures.real))
        bar.after_step(loop.StepEvent(s.t, None))
        if s.t % self.report_every == 0:
            means = dict(zip(("loss", "batch_acc", "seconds_per_step", "real_share"), mean_rows(self.window)))
            self.window = []
            row = {"section": self.rank, "step": step + 1, **means,
                   "blocked_seconds": s.link.blocked}
            self.on_report(row) if self.rank == 0 else self.control({"kind": "report", "row": row}, 0)
        if s.t == ROUND_WARMUP_STEPS:
            self.rate_mark = (s.t, time.perf_counter())
        if self.rank == 0 and not self.fixed_rounds and self.round_every is None and s.t == ROUND_WARMUP_STEPS:
            per_step = (time.perf_counter() - self.started) / s.t
            self.round_every = max(1, int(RECIPE.checkpoint_seconds / max(per_step, 1e-9)))
            self.next_round = self._round_after(self.step_now)
            self.to_all({"kind": "every", "steps": self.round_every})
        if self.next_round is not None and self.step_now == self.next_round:
            if self.step_now < self.end:
                self.made.add(self.step_now)
                self.make_round(self.step_now)
            self.next_round = self._round_after(self.step_now)

    def drain(self) -> None:
        """After the last round: keep receiving (and dropping) messages until every rank's sends are done."""
        link = self.section.link
        deadline = time.perf_counter() + self.ranks.timeout
        told = False
        while not self.exit:
            link.drain(self.rank - 1, TAG_UP) if self.rank > 0 else None
            link.drain(self.rank + 1, TAG_DOWN) if self.rank < self.size - 1 else None
            self.poll()
            if link.sends_done() and not told:
                told = True
                if self.rank != 0:
                    self.control({"kind": "sent"}, 0)
            if self.rank == 0 and told and len(self.sent_from) == self.size - 1:
                self.to_all({"kind": "exit"})
                self.exit = True
            if time.perf_counter() > deadline:
                raise RankLost(f"rank {self.rank} waited {self.ranks.timeout:g} s for the other sections to finish")
            time.sleep(MAX_PAUSE)
        while not link.sends_done():
            time.sleep(MAX_PAUSE)


def check_options(options: TrainOptions, ranks: Ranks) -> MachSettings | None:
    """The Mach flags checked (and the flags a run over ranks refuses), before anything is written."""
    check_distributed(options, ranks)
    if options.micro_batches is not None:
        raise ConfigError("--micro-batches applies to --mode exact (Mach sections take whole minibatches)")
    if options.sections is None:
        raise ConfigError(f"--mode mach needs --sections S (one MPI rank each): mpiexec -n {ranks.size} deepnet "
                          f"train MODEL --mode mach --sections {ranks.size}")
    if options.sections != ranks.size:
        raise ConfigError(f"--sections {options.sections} but mpiexec started {ranks.size} ranks (one per section)")
    return None


def train_mach(options: TrainOptions, *, progress: bool, on_report: OnReport) -> dict:
    """Train ``options.model`` as ``options.sections`` Mach sections, this process being one of the MPI
    ranks (see the module docstring); returns the final figures on rank 0 and ``{"rank": r}`` elsewhere.

    Ctrl-C and SIGTERM are handled as a stop from before MPI starts: a rank signalled while the others
    are still starting (or have started) takes part in the stop instead of leaving them waiting."""
    if launched_size() <= 1:
        count = options.sections or 2
        raise ConfigError(f"--mode mach runs one MPI rank per section: mpiexec -n {count} deepnet train "
                          f"{os.fspath(options.model)} --mode mach --sections {count}")
    with StopSignal() as stop:
        stop.arm()
        ranks = world(options.rank_timeout)
        return _train_armed(options, ranks, stop, progress, on_report)


def _train_armed(options: TrainOptions, ranks: Ranks, stop: StopSignal, progress: bool,
                 on_report: OnReport) -> dict:
    check_options(options, ranks)
    given = {"inputs": options.mach_inputs, "local_weight": options.local_weight,
             "delayed_weight": options.delayed_weight, "max_delay": options.max_delay,
             "distill_hidden": options.distill_hidden, "distill_lr": options.distill_lr}
    MachSettings.resolve(given, None)  # the values alone, before anything is read or written
    dataset, test = open_data(options)
    try:
        root, opened = open_run(options, ranks, dataset)
        try:
            return _train(options, ranks, root, opened, given, dataset, test, stop, progress, on_report)
        except DeepnetError as exc:
            exc.abort = ranks.abort
            raise
    finally:
        release_locks()


def _mach_state(root: Path, opened: Any) -> MachState | None:
    with open_h5(str(root), "r") as f:
        return read_mach(f, str(root), width=opened.width, input_dim=opened.heads["input_weight"].shape[0],
                         n_classes=opened.heads["output_bias"].shape[0])


def _new_section_state(k: int, count: int, heads: dict, seed: int, hidden: int) -> SectionState:
    """A section's state when the model has none yet: its own head drawn like the model's output head
    (Xavier-uniform from a stream of its own), its distilled model predicting h_0 exactly."""
    rng = np.random.default_rng([seed, 3, k])
    width, classes = heads["output_weight"].shape
    limit = math.sqrt(6.0 / (width + classes))
    head = None if k == count - 1 else {"output_weight": rng.uniform(-limit, limit, (width, classes)).astype(np.float32),
                                        "output_bias": np.zeros(classes, np.float32)}
    distill = None if k == 0 else DistilledInput.new(heads, hidden, rng).params()
    return SectionState(head, distill)


def _train(options: TrainOptions, ranks: Ranks, root: Path, opened: Any, given: dict, dataset: Dataset,
           test: tuple[np.ndarray, np.ndarray] | None, stop: StopSignal, progress: bool,
           on_report: OnReport) -> dict:
    first, steps, until, plan, settings = plan_run(options, opened, dataset.n_train)
    batch = settings["batch"]
    state = _mach_state(root, opened)
    mach = MachSettings.resolve(given, None if state is None else state.settings)
    if state is not None and len(state.sections) != ranks.size:
        raise ConfigError(f"{root} holds the state of {len(state.sections)} Mach sections, not {ranks.size}")
    if state is not None and state.step != first:
        log.warning("%s: its Mach state is of step %d but the model is at step %d (trained since without "
                    "--mode mach): the sections' heads and distilled models go on from step %d",
                    root, state.step, first, state.step)
    if state is None:
        state = MachState(first, mach.as_dict(), [])
    k = ranks.rank
    mine = state.sections[k] if state.sections else _new_section_state(k, ranks.size, opened.heads, opened.seed,
                                                                     mach.distill_hidden)
    heads = {key: v.copy() for key, v in (mine.head or {}).items()}
    if k == ranks.size - 1:
        heads.update({key: opened.heads[key].copy() for key in layout.MACH_HEAD_KEYS})
    if k == 0:
        heads.update({key: v.copy() for key, v in opened.heads.items() if key.startswith("input")})
    distill = None if mine.distill is None else DistilledInput(mine.distill)
    if distill is not None and distill.hidden != mach.distill_hidden:
        raise ConfigError(f"{root}: section {k}'s distilled input model has {distill.hidden} hidden units but "
                          f"--distill-hidden {mach.distill_hidden} was given (it is chosen when the sections start)")
    rng = _seed_rng(opened.seed, k, opened.rng_state if k == 0 else mine.rng_state)
    limit = settings["train_limit"]
    x_train, y_train = dataset.train_slice(0, limit)
    link = MpiSectionLink(ranks)
    section = MachSection(k, ranks.size, opened.core, kernels_for(opened.activation, opened.width), opened.width,
                          opened.alpha, options.chunk_layers, batch, mach, heads, distill, rng, x_train,
                          y_train, link)
    runner = _Runner(ranks, section, root=root, first=first, until=until, plan=plan, settings=settings, state=state,
                     report_every=options.report_every, round_every=options.checkpoint_every,
                     time_limit=options.time_limit, on_report=on_report, stop=stop)
    link.while_waiting = runner.while_waiting
    with ProgressBar(steps, "train", progress and k == 0) as bar:
        runner.run(bar)
    run_seconds = (runner.reached_end_at or time.perf_counter()) - runner.started
    runner.drain()
    held = runner.end
    if held < until and not (options.time_limit is not None and stop.count == 0):
        raise Interrupted(f"stopped after step {held} of {until}; {root} holds step {held}", stop.signum,
                          held_step=held, until_step=until)
    evaluated = evaluate_sections(section, ranks, test) if test is not None else None
    own = {"section": k, "layers": opened.layers_here, "steps": section.t, "seconds": run_seconds,
           "steps_per_s": section.t / run_seconds if run_seconds > 0 else math.nan,
           "blocked_seconds": link.blocked, "end_wait_seconds": runner.end_wait,
           "sent_bytes_per_step": link.sent_bytes / max(section.t, 1),
           "distill_loss": None if math.isnan(section.distill_loss) else section.distill_loss,
           **section.counters, **(evaluated or {})}
    totals = ranks.gather_obj(own, TAG_TOTALS)
    if k != 0:
        return {"rank": k}
    last = totals[-1]
    final = {"event": "final", "model": str(root), "mode": "mach", "sections": ranks.size, "steps": held - first,
             "step": held, "seconds": max(t["seconds"] for t in totals),
             "steps_per_s_summed": sum(t["steps_per_s"] for t in totals),
             "section_steps_per_wall_s": sum(t["steps"] for t in totals) / max(t["seconds"] for t in totals),
             "settings": mach.as_dict(),
             "per_section": totals}
    if evaluated is not None:
        final.update(test_loss=last["test_loss"], test_acc=last["test_acc"], test_samples=int(test[1].shape[0]))
    return final
