"""Which data a run feeds a model: the record it is created with, or the one it keeps, and the dataset
opened from it (deepnet.data.sources), checked against the model's inputs and outputs."""

from __future__ import annotations

import os
from pathlib import Path

from deepnet.data.dataset import Dataset
from deepnet.data.sources import new_record, open_dataset, parse_source, run_record
from deepnet.formats.data_record import DataRecord, read_data_record
from deepnet.formats.hdf5 import ModelFile


def stored_record(path: str | os.PathLike, mode: str = "r+") -> DataRecord:
    """The data record of the existing model file at ``path``, opened in ``mode`` (a run that will write
    it opens it as a writer, so a file another run holds is refused as a writer's open refuses it)."""
    with ModelFile.open(path, mode) as model_file:
        return read_data_record(model_file.h5, model_file.path)


def training_data(model: str | os.PathLike, *, data: str | None, coarsen: int | None, decode: str | None,
                  loss: str | None, data_dir: str | os.PathLike | None, mode: str = "r+") -> tuple[DataRecord, Dataset]:
    """The record a training run of ``model`` uses (a new model's from the flags; an existing one's
    own, read opening it in ``mode``, flags checked against it) and its dataset, opened."""
    if Path(model).exists():
        record = run_record(stored_record(model, mode), model, source=data, coarsen=coarsen, decode=decode, loss=loss)
    else:
        record = new_record(source=data, coarsen=coarsen, decode=decode, loss=loss)
    return record, open_dataset(record, data_dir)


def model_data(model_file: ModelFile, data: str | None, data_dir: str | os.PathLike | None) -> Dataset:
    """The dataset to evaluate or diagnose an open model with: the source it records (or ``data``),
    through its own transform, checked to fit it."""
    record = read_data_record(model_file.h5, model_file.path)
    if data is not None:
        record = record.with_(source=parse_source(data))
    dataset = open_dataset(record, data_dir)
    try:
        dataset.fits(model_file.path, model_file.input_dim, model_file.n_classes)
    except BaseException:
        dataset.close()
        raise
    return dataset


def refuse_generative(dataset: Dataset, **flags: object) -> None:
    """Refuse flags that need a fixed training set (given, i.e. not None) with a generative source."""
    for name, value in flags.items():
        if value:
            dataset.require_fixed(f"--{name.replace('_', '-')}")
