"""The commit record of a model file (``/train/commit``): what makes a step durable.

Two fixed-size slots, written alternately as raw bytes (never HDF5 metadata); each slot is a magic
number, the payload's length and CRC-32, then the record as JSON: the committed step, a sequence
number, the minibatch generator's state, the training settings, a CRC-32 of the heads, how many rows of
/train/log belong to the committed history and the log rows not yet appended there, and how many rows
of /train/evals do (``eval_rows``; absent in records written before it existed: none). A slot cut short
by a kill fails its checksum and the other slot, the previous commit, is read instead. How an open
file keeps it: :mod:`deepnet.formats.record`; the file's states it defines: :func:`torn_state`.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from deepnet.errors import ConfigError, ModelFileError
from deepnet.formats.layout import CORE_CHUNK_STEP

COMMIT_SLOTS = 2
#: The record's count of committed /train/evals rows.
EVAL_ROWS = "eval_rows"
COMMIT_SLOT_BYTES = 32768
_COMMIT_MAGIC = b"DNCOMMIT"
_COMMIT_HEADER = struct.Struct("<8sII")  # magic, payload length, CRC-32 of the payload


def heads_crc32(heads: Mapping[str, np.ndarray], keys: tuple[str, ...]) -> int:
    """CRC-32 of the head arrays' bytes, in `keys` order (recorded with every commit)."""
    crc = 0
    for key in keys:
        crc = zlib.crc32(memoryview(np.ascontiguousarray(heads[key], dtype="<f4")).cast("B"), crc)
    return crc


def encode_record(record: Mapping[str, Any]) -> bytes:
    """One commit-record slot's bytes: magic, length, CRC-32, then the record as JSON."""
    payload = json.dumps(dict(record), separators=(",", ":"), default=json_default).encode("utf-8")
    return _COMMIT_HEADER.pack(_COMMIT_MAGIC, len(payload), zlib.crc32(payload)) + payload


def encode_slot(record: Mapping[str, Any], path: str) -> bytes:
    """encode_record(), refused in one line if the record is not JSON or does not fit a slot of ``path``."""
    try:
        encoded = encode_record(record)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"the commit record is not JSON-serialisable: {exc}") from None
    if len(encoded) > COMMIT_SLOT_BYTES:
        raise ModelFileError(f"{path}: the commit record would take {len(encoded)} bytes, more than a slot's "
                             f"{COMMIT_SLOT_BYTES}")
    return encoded


def decode_record(raw: bytes) -> dict | None:
    """The record in one slot, or None if the slot is empty, cut short or fails its checksum."""
    raw = bytes(raw)
    if len(raw) < _COMMIT_HEADER.size:
        return None
    magic, length, crc = _COMMIT_HEADER.unpack_from(raw)
    if magic != _COMMIT_MAGIC or length > len(raw) - _COMMIT_HEADER.size:
        return None
    payload = raw[_COMMIT_HEADER.size : _COMMIT_HEADER.size + length]
    if zlib.crc32(payload) != crc:
        return None
    try:
        record = json.loads(payload.decode("utf-8"))
    except ValueError:
        return None
    return record if _record_is_valid(record) else None


def _record_is_valid(rec: Any) -> bool:
    def nonneg_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if not isinstance(rec, dict):
        return False
    if not (nonneg_int(rec.get("seq")) and nonneg_int(rec.get("step")) and nonneg_int(rec.get("log_rows"))):
        return False
    if rec.get("rng_state") is not None and not isinstance(rec["rng_state"], dict):
        return False
    if rec.get("heads_crc32") is not None and not nonneg_int(rec["heads_crc32"]):
        return False
    if rec.get(EVAL_ROWS) is not None and not nonneg_int(rec[EVAL_ROWS]):
        return False
    if rec.get("train") is not None and not isinstance(rec["train"], dict):
        return False
    pending = rec.get("pending_log")
    if not isinstance(pending, list):
        return False
    for row in pending:
        if not (isinstance(row, list) and len(row) == 4 and isinstance(row[0], int)
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in row)):
            return False
    return True


@dataclass(frozen=True)
class FileState:
    """Whether a model file is a committed step (healthy), an interrupted one (torn), or neither."""

    status: str                 # "healthy", "torn" or "damaged"
    step: int                   # the committed step
    message: str                # one line saying so
    torn_step: int | None = None
    layers_updated: int = 0
    chunks_updated: tuple[int, int] | None = None   # first and last storage chunk already at torn_step
    heads_changed: bool = False

    @property
    def healthy(self) -> bool:
        return self.status == "healthy"


def new_record(*, step: int, heads_crc: int, updated: str) -> dict:
    """The record of a new model file (or one written before records existed), at `step`."""
    return {"seq": 0, "step": step, "rng_state": None, "log_rows": 0, "pending_log": [],
            "heads_crc32": heads_crc, "train": None, "updated": updated, EVAL_ROWS: 0}


def json_default(obj: Any) -> Any:
    """JSON for the numpy values a generator state or a setting may hold."""
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def torn_state(step: int, chunk_steps: np.ndarray, chunk_layers: int, layers: int, heads_changed: bool) -> FileState:
    """Healthy, torn or damaged, from each storage chunk's last step and whether the heads differ from
    the checksum committed with `step` (docs/DESIGN.md, "Files": chunks are marked before they change)."""
    cs = chunk_steps
    n = cs.shape[0]
    wrong = np.flatnonzero((cs < 0) | (cs > step + 1))
    if wrong.size:
        c = int(wrong[0])
        return FileState("damaged", step, f"storage chunk {c} of /{CORE_CHUNK_STEP} says step {int(cs[c])} "
                         f"but the committed step is {step} ({wrong.size} such chunks)")
    ahead = np.flatnonzero(cs == step + 1)
    if not ahead.size:
        if heads_changed:
            return FileState("damaged", step, f"the heads differ from the checksum committed with step {step}",
                             heads_changed=True)
        return FileState("healthy", step, f"healthy: step {step}")
    sizes = np.minimum(chunk_layers, layers - ahead * chunk_layers)
    updated = int(sizes.sum())
    first, last = int(ahead[0]), int(ahead[-1])
    where = f"storage chunk {first}" if first == last else f"storage chunks {first}..{last}"
    message = (f"torn step {step + 1}: {updated} of {layers} layers updated ({where} of {n})"
               + ("; heads updated" if heads_changed else "")
               + f"; the rest is step {step}")
    return FileState("torn", step, message, torn_step=step + 1, layers_updated=updated,
                     chunks_updated=(first, last), heads_changed=heads_changed)
