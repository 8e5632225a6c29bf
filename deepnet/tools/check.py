"""`deepnet check`: is a model file a committed step (healthy), a step its writer died in (torn), or
neither (damaged)?

Opening the file already verifies the format, version, attributes, and every dataset's shape and
dtype (formats/validate.py: a file failing that cannot be read at all, and the error says why). This adds
what only reading everything can tell: the commit record against /core/chunk_step and the heads'
checksum (see formats/commit.py), every weight finite, the stored generator state usable, the training
log consistent, and leftovers of interrupted writers beside the file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deepnet import activations
from deepnet.errors import DamagedFileError, DeepnetError
from deepnet.formats.atomic import stale_temporaries
from deepnet.formats import evals as _evals
from deepnet.formats import shards as _shards
from deepnet.formats.layout import EVAL_KINDS, HEAD_KEYS, HEAD_PATHS, KIND_MLP, TRAIN_EVALS, TRAIN_LOG
from deepnet.formats.mlp_file import model_kind, read_mlp_file
from deepnet.formats.model_file import ModelFile


@dataclass
class CheckReport:
    """What `deepnet check` found. ``status`` is "healthy", "torn" or "damaged"."""

    path: str
    status: str
    step: int | None
    summary: str
    findings: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def healthy(self) -> bool:
        return self.status == "healthy"

    def text(self) -> str:
        return "\n".join([*self.findings, self.summary])

    def as_dict(self) -> dict[str, Any]:
        return {"event": "check", "model": self.path, "status": self.status, "step": self.step,
                "summary": self.summary, "findings": list(self.findings), **self.details}


def check_model(path: str | os.PathLike) -> CheckReport:
    """Check the model file at `path` (dense or mlp). Raises a DeepnetError if it cannot be read at all."""
    path = os.fspath(path)
    if model_kind(path) == KIND_MLP:
        return _check_mlp(path)
    try:
        f = ModelFile.open(path)
    except DamagedFileError as exc:  # readable as deepnet's, but its state cannot be trusted
        return CheckReport(path, "damaged", None, f"damaged: {str(exc).removeprefix(f'{path}: ')}", [])
    with f:
        return _check_dense(f)


def _check_dense(f: ModelFile) -> CheckReport:
    findings: list[str] = []
    problems: list[str] = []
    details: dict[str, Any] = {}
    findings.append(f"model: dense, {f.layers:,} layers x width {f.width}, {f.activation}, alpha {f.alpha:g}, "
                    f"{f.input_dim} inputs, {f.n_classes} classes; format deepnet v1")
    try:
        activations.get(f.activation)
    except DeepnetError:
        findings.append(f"note: activation {f.activation!r} is not registered here (see `deepnet activations`); "
                        f"this deepnet cannot train or evaluate it")

    if not f.has_commit_record:
        findings.append("commit record: none (written before deepnet kept one); step and generator state "
                        "come from the attributes")
    else:
        findings.append(f"commit record: step {f.step}, written {f.updated}")
    note = f.torn_accepted
    if note:
        findings.append(f"note: this history includes torn step {note.get('step')} accepted with --resume-torn "
                        f"({note.get('layers_updated')} layers had been updated)")

    state = f.state()
    details.update(torn_step=state.torn_step, layers_updated=state.layers_updated,
                   chunks_updated=list(state.chunks_updated) if state.chunks_updated else None,
                   heads_updated=state.heads_changed)
    cs = f.chunk_steps()
    findings.append(f"core: {f.n_storage_chunks} storage chunks of {f.storage_chunk_layers} layers; "
                    f"chunk steps {int(cs.min())}..{int(cs.max())}")
    if state.status == "damaged":
        problems.append(state.message)

    bad_layers = f.non_finite_layers()
    details["non_finite_layers"] = int(bad_layers.size)
    if bad_layers.size:
        problems.append(f"{bad_layers.size} core layers hold non-finite weights (first {int(bad_layers[0])}, "
                        f"last {int(bad_layers[-1])})")
    else:
        findings.append("core weights: all finite")
    heads = f.read_heads()
    bad_heads = [k for k in HEAD_KEYS if not np.isfinite(heads[k]).all()]
    if bad_heads:
        problems.append(f"non-finite values in the head(s) {', '.join(bad_heads)}")
    else:
        findings.append("heads: all finite")
    # The optional parts (branch, weight average) are weights too.
    head_names = {HEAD_PATHS[k] for k in HEAD_KEYS}
    bad_parts = [name for name in f.non_finite_parts() if name not in head_names]
    if bad_parts:
        problems.append(f"non-finite values in {', '.join('/' + n for n in bad_parts)}")

    try:
        rng_state = f.rng_state
    except DeepnetError as exc:
        problems.append(str(exc))
        rng_state = None
    if rng_state is not None:
        try:
            np.random.default_rng().bit_generator.state = rng_state
        except (TypeError, ValueError, KeyError) as exc:
            problems.append(f"the stored minibatch generator state is unusable ({exc})")

    log = f.read_log()
    stored_rows = f.stored_log_rows
    details["log_rows"] = int(log.shape[0])
    if log.shape[0]:
        steps = log["step"]
        findings.append(f"training log: {log.shape[0]} rows, steps {int(steps[0])}..{int(steps[-1])}")
        if steps.max() > f.step:
            problems.append(f"the training log has rows for step {int(steps.max())}, after the committed step {f.step}")
        if np.any(np.diff(steps) <= 0):
            findings.append("note: the training log's steps do not always increase")
    else:
        findings.append("training log: empty")
    committed_rows = int(f.record["log_rows"])
    if stored_rows > committed_rows:
        findings.append(f"note: /{TRAIN_LOG} has {stored_rows - committed_rows} rows past the committed ones "
                        f"(an append that was interrupted; they are ignored and overwritten)")

    _check_evaluations(f, findings, problems, details)

    shards = _shards.shard_count(f)
    if shards:  # the root of a sharded model: its shard files' cores and the stray versions beside them
        shard_findings, shard_problems = _shards.verify_shards(f)
        findings += shard_findings
        problems += shard_problems
        details["shards"] = shards

    for tmp in stale_temporaries(f.path):
        findings.append(f"note: {tmp} is a leftover of an interrupted write (deepnet train removes it)")

    if state.status == "torn":
        status = "torn"
        summary = state.message
        if problems:
            summary += "; also " + "; ".join(problems)
    elif problems:
        status = "damaged"
        summary = "damaged: " + "; ".join(problems)
    else:
        status = "healthy"
        summary = f"healthy: step {f.step}" + (f", {shards} shards" if shards else "")
    return CheckReport(f.path, status, f.step, summary, findings, details)


def describe_evaluations(rows: np.ndarray) -> str:
    """One line of what /train/evals holds: per kind, how many and at which steps."""
    if not rows.size:
        return "evaluations: none"
    parts = []
    for kind in dict.fromkeys(_evals.kinds(rows)):
        steps = _evals.of_kind(rows, kind)["step"]
        at = f"step {int(steps[0])}" if steps.size == 1 else f"steps {int(steps.min())}..{int(steps.max())}"
        parts.append(f"{steps.size} {kind} ({at})")
    return "evaluations: " + ", ".join(parts)


def _check_evaluations(f: ModelFile, findings: list[str], problems: list[str], details: dict[str, Any]) -> None:
    """/train/evals (its dtype and shape were checked on opening): the committed rows against the step."""
    rows = f.read_evaluations()
    details["eval_rows"] = int(rows.shape[0])
    findings.append(describe_evaluations(rows))
    if rows.size:
        if rows["step"].max() > f.step:
            problems.append(f"/{TRAIN_EVALS} has an evaluation of step {int(rows['step'].max())}, after the "
                            f"committed step {f.step}")
        unknown = sorted(set(_evals.kinds(rows)) - set(EVAL_KINDS))
        if unknown:
            findings.append(f"note: /{TRAIN_EVALS} has evaluations of a kind this deepnet does not know: "
                            f"{', '.join(map(repr, unknown))}")
    stored = _evals.stored_count(f.h5)
    if stored > rows.shape[0]:
        findings.append(f"note: /{TRAIN_EVALS} has {stored - rows.shape[0]} rows past the committed ones "
                        f"(an append that was interrupted; they are ignored and overwritten)")


def _check_mlp(path: str) -> CheckReport:
    contents = read_mlp_file(path)  # validates format, attributes, shapes and dtypes
    findings = [f"model: mlp, hidden {contents.params['w1'].shape[1]}; format deepnet v1 (written whole and "
                f"renamed into place, so it is never torn)"]
    bad = [name for name, value in contents.params.items() if not np.isfinite(value).all()]
    if bad:
        summary = f"damaged: non-finite values in {', '.join(bad)}"
        return CheckReport(path, "damaged", contents.step, summary, findings)
    findings.append("weights: all finite")
    return CheckReport(path, "healthy", contents.step, f"healthy: step {contents.step}", findings)
