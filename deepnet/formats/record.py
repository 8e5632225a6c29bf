"""The commit record of an open model file, and the training log it governs.

:mod:`deepnet.formats.commit` defines the record's bytes; this keeps the latest record of one open
file, writes the next one into the other slot, and appends the log rows it carries to /train/log at
report boundaries (an HDF5 metadata change, so not at every step). Files written before the record
existed (no /train/commit at all) are read from their root attributes and get the dataset, holding
their first record, on their first commit; a file that has the dataset but no valid slot is damaged.
"""

from __future__ import annotations

import json
from typing import Any

import h5py
import numpy as np

from deepnet.errors import ConfigError, DamagedFileError, ModelFileError
from deepnet.formats import layout
from deepnet.formats.commit import COMMIT_SLOT_BYTES, COMMIT_SLOTS, decode_record, encode_slot, json_default
from deepnet.formats.h5io import RawWriter
from deepnet.formats.values import now, os_reason

#: Log rows carried in the commit record before they are appended to /train/log (which changes HDF5
#: metadata, so it happens at report boundaries or when this many rows are waiting).
LOG_PENDING_MAX = 128


def log_rows(rows: list) -> np.ndarray:
    """Log rows [step, loss, batch_acc, seconds] as a LOG_DTYPE array."""
    out = np.empty(len(rows), dtype=layout.LOG_DTYPE)
    for i, row in enumerate(rows):
        out[i] = tuple(row)
    return out


def log_array(step: Any, loss: Any, batch_acc: Any, seconds: Any) -> np.ndarray:
    """Log columns (each a scalar or a 1-D sequence of equal length) as a LOG_DTYPE array."""
    cols = [np.atleast_1d(np.asarray(v)) for v in (step, loss, batch_acc, seconds)]
    if any(c.ndim != 1 for c in cols):
        raise ConfigError("append_log arguments must be scalars or 1-D sequences")
    n = cols[0].shape[0]
    if any(c.shape[0] != n for c in cols):
        raise ConfigError(f"append_log arguments have different lengths: {[c.shape[0] for c in cols]}")
    if n and not np.issubdtype(cols[0].dtype, np.integer):
        if not np.issubdtype(cols[0].dtype, np.floating) or not np.all(np.mod(cols[0], 1) == 0):
            raise ConfigError("append_log step values must be integers")
    rows = np.empty(n, dtype=layout.LOG_DTYPE)
    for name, col in zip(layout.LOG_DTYPE.names, cols):
        rows[name] = col
    return rows


def append_log_rows(log: h5py.Dataset, at: int, rows: np.ndarray) -> None:
    """Make /train/log `at` + len(rows) rows long with `rows` from row `at` (one hook for tests)."""
    if rows.shape[0] == 0 and log.shape[0] == at:
        return
    log.resize((at + rows.shape[0],))
    if rows.shape[0]:
        log.write_direct(rows, dest_sel=np.s_[at : at + rows.shape[0]])


def empty_commit_slots() -> np.ndarray:
    """The contents of a new /train/commit dataset: every slot empty."""
    return np.zeros((COMMIT_SLOTS, COMMIT_SLOT_BYTES), np.uint8)


class CommitLog:
    """The latest commit record of an open file, and its /train/log.

    `meta` holds the validated root attributes (step, updated, rng_state), the record of files that
    predate it. With `record` (a just-written copy's) the record is taken as given instead of read.
    """

    def __init__(self, h5file: h5py.File, path: str, raw: RawWriter, meta: dict[str, Any],
                 record: dict | None = None) -> None:
        self._f = h5file
        self._path = path
        self._raw = raw
        self._log: h5py.Dataset = h5file[layout.TRAIN_LOG]
        commit = h5file.get(layout.TRAIN_COMMIT)
        self._commit: h5py.Dataset | None = commit if isinstance(commit, h5py.Dataset) else None
        self._rng_error: str | None = None
        self._record: dict = dict(record) if record is not None else self._load(meta)

    # ------------------------------------------------------------------ reading

    @property
    def record(self) -> dict:
        """A copy of the latest record (seq, step, rng_state, log_rows, pending_log, heads_crc32, train, ...)."""
        return json.loads(json.dumps(self._record, default=json_default))

    def get(self, key: str, default: Any = None) -> Any:
        """One field of the latest record (not copied: do not modify it)."""
        return self._record.get(key, default)

    @property
    def step(self) -> int:
        return int(self._record["step"])

    @property
    def has_dataset(self) -> bool:
        """Whether the file has /train/commit (files written before it existed get it on their first commit)."""
        return self._commit is not None

    @property
    def stored_log_rows(self) -> int:
        """Rows in the /train/log dataset, including any past the committed ones (an interrupted append)."""
        return int(self._log.shape[0])

    @property
    def log_rows(self) -> int:
        """Rows in the committed training log (appended plus carried in the record)."""
        return int(self._record["log_rows"]) + len(self._record["pending_log"])

    def rng_state(self) -> dict | None:
        """The recorded generator state (a copy), or None; a ModelFileError if the attribute it came from
        is not valid JSON."""
        if self._rng_error:
            raise ModelFileError(self._rng_error)
        state = self._record.get("rng_state")
        return None if state is None else json.loads(json.dumps(state, default=json_default))

    def read_log(self) -> np.ndarray:
        """The committed training log as a structured array (fields step, loss, batch_acc, seconds)."""
        n = int(self._record["log_rows"])
        stored = self._log[:n] if n else np.empty(0, layout.LOG_DTYPE)
        pending = self._record["pending_log"]
        return np.concatenate([stored, log_rows(pending)]) if pending else stored

    def last_log_row(self) -> np.void | None:
        """The last committed log row, or None if the log is empty."""
        pending = self._record["pending_log"]
        if pending:
            return log_rows(pending[-1:])[0]
        n = int(self._record["log_rows"])
        return self._log[n - 1] if n else None

    # ------------------------------------------------------------------ writing

    def next_record(self, **changes: Any) -> tuple[dict, bytes]:
        """The record that follows the latest one with `changes`, and its encoded bytes."""
        record = dict(self._record)
        record.update(changes)
        record["seq"] = self._record["seq"] + 1
        record["updated"] = now()
        return record, encode_slot(record, self._path)

    def write(self, **changes: Any) -> None:
        """Write the latest record with `changes` into the next slot (one raw write)."""
        record, encoded = self.next_record(**changes)
        slot = record["seq"] % COMMIT_SLOTS
        if self._commit is None:
            # A file from before the commit record: it gets the dataset now (once; a metadata change),
            # created holding this record, so a file with the dataset always has one (an empty one is damage).
            slots = empty_commit_slots()
            slots[slot, : len(encoded)] = np.frombuffer(encoded, np.uint8)
            self._commit = self._f.create_dataset(layout.TRAIN_COMMIT, data=slots)
            self._raw.forget(layout.TRAIN_COMMIT)
            self._f.flush()
        else:
            self._raw.write(layout.TRAIN_COMMIT, np.frombuffer(encoded, np.uint8), slot * COMMIT_SLOT_BYTES)
        self._record = record
        if "rng_state" in changes:
            self._rng_error = None

    def append_rows(self, rows: np.ndarray) -> None:
        """Append the carried rows and then `rows` to /train/log, and commit the new count."""
        # Rows past the committed count (left by an append a kill interrupted) are overwritten.
        rows = np.concatenate([log_rows(self._record["pending_log"]), rows])
        n = int(self._record["log_rows"])
        try:
            append_log_rows(self._log, n, rows)
            self._f.flush()
        except (OSError, RuntimeError) as exc:
            raise ModelFileError(
                f"could not append to the training log of {self._path}: {os_reason(exc)} "
                f"(the file still holds step {self.step})"
            ) from exc
        self.write(log_rows=n + rows.shape[0], pending_log=[])

    def flush_log(self) -> None:
        """Append the log rows carried in the record to /train/log."""
        if self._record["pending_log"]:
            self.append_rows(np.empty(0, layout.LOG_DTYPE))

    # ------------------------------------------------------------------ loading

    def _load(self, meta: dict[str, Any]) -> dict:
        """The latest valid record; for a file without one, the same fields from its attributes."""
        legacy = {"seq": 0, "step": meta["step"], "rng_state": None, "log_rows": self.stored_log_rows,
                  "pending_log": [], "heads_crc32": None, "train": None, "updated": meta["updated"]}
        legacy_error = None
        text = meta["rng_state"]
        if text:
            try:
                state = json.loads(text)
                if not isinstance(state, dict):
                    raise ValueError("not a JSON object")
                legacy["rng_state"] = state
            except ValueError as exc:
                legacy_error = f"{self._path}: attribute rng_state is not valid JSON ({exc})"
        if self._commit is None:
            self._rng_error = legacy_error
            return legacy
        if self._commit.dtype != np.uint8 or self._commit.shape != (COMMIT_SLOTS, COMMIT_SLOT_BYTES):
            raise ModelFileError(f"{self._path}: dataset /{layout.TRAIN_COMMIT} has dtype {self._commit.dtype} and "
                                 f"shape {self._commit.shape} but uint8 {(COMMIT_SLOTS, COMMIT_SLOT_BYTES)} is required")
        raw = self._commit[()]
        records = [r for r in (decode_record(raw[i].tobytes()) for i in range(COMMIT_SLOTS)) if r is not None]
        if not records:
            # Every writer creates the dataset holding a record, so none valid (all zeros included) is damage,
            # never the unprotected layout of a file from before the record.
            blank = "" if raw.any() else ", both are all zeros"
            raise DamagedFileError(f"{self._path}: the commit record is damaged (no slot of /{layout.TRAIN_COMMIT} "
                                   f"passes its checksum{blank})")
        record = max(records, key=lambda r: r["seq"])
        if meta["step"] > record["step"]:
            # Every writer commits the record before it mirrors the step into the attributes, so this is
            # a writer that ignores the record, or an edit; falling back to the attributes would drop the
            # heads' checksum, so it is damage.
            raise DamagedFileError(f"{self._path}: attribute step {meta['step']} is past the committed step "
                                   f"{record['step']} of /{layout.TRAIN_COMMIT}")
        if record["log_rows"] > self.stored_log_rows:
            raise ModelFileError(f"{self._path}: the commit record counts {record['log_rows']} rows of "
                                 f"/{layout.TRAIN_LOG} but the dataset has {self.stored_log_rows}")
        return record
