"""What a model learns from, recorded in its file: the data source, the input transform and the loss.

The root attribute ``data`` (a JSON object; dense and MLP model files, copied into shards)::

    {"source": "mnist" | "idx:<dir>" | "npz:<file>" | "teacher:<file>",
     "coarsen": k,            # 1: the pixels as they are; k >= 2: k x k cells as (max, VAL2) bytes
     "decode": "ratio",       # how coarse bytes become inputs (deepnet.data.coarse.DECODINGS)
     "loss": "xent" | "mse"}  # softmax cross-entropy on labels, or mean squared error on target vectors

A file written before the attribute existed learns from MNIST pixels with cross-entropy: reading it
gives the default record. Evaluation, the speedrun, the MLP baseline and diagnose take the transform
and the loss from here, so a model is always fed inputs of the kind it was trained on.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace

import h5py

from deepnet.errors import DamagedFileError

DATA_ATTR = "data"

#: The losses a model can be trained with: softmax cross-entropy on class labels, mean squared error on
#: target vectors (a teacher's outputs).
LOSSES = ("xent", "mse")


@dataclass(frozen=True)
class DataRecord:
    """A model's data source, input transform and loss (see the module docstring)."""

    source: str = "mnist"
    coarsen: int = 1
    decode: str = "ratio"
    loss: str = "xent"

    def with_(self, **changes: object) -> "DataRecord":
        """A copy with ``changes``."""
        return replace(self, **changes)

    @property
    def transform(self) -> str:
        """The input transform in words: "pixels" or "coarsen 4x4 (ratio)"."""
        return "pixels" if self.coarsen == 1 else f"coarsen {self.coarsen}x{self.coarsen} ({self.decode})"

    def to_json(self) -> str:
        """The attribute's text."""
        return json.dumps(asdict(self), sort_keys=True)


def read_data_record(h5: h5py.File | h5py.Group, path: str) -> DataRecord:
    """The record of an open model file (the default one if it has none); a damaged one is a
    DamagedFileError naming ``path``."""
    raw = h5.attrs.get(DATA_ATTR)
    if raw is None:
        return DataRecord()
    try:
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        value = json.loads(text)
        known = {f.name for f in fields(DataRecord)}
        record = DataRecord(**{k: v for k, v in value.items() if k in known})
        if not isinstance(record.source, str) or not isinstance(record.coarsen, int) or record.coarsen < 1 \
                or record.loss not in LOSSES or not isinstance(record.decode, str):
            raise ValueError(value)
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise DamagedFileError(f"{path}: the root attribute {DATA_ATTR!r} is not a data record ({exc})") from None
    return record


def write_data_record(h5: h5py.File | h5py.Group, record: DataRecord) -> None:
    """Store ``record`` in an open, writable model file."""
    h5.attrs[DATA_ATTR] = record.to_json()
