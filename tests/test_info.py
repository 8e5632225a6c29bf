"""`deepnet info` (deepnet.tools.info): the JSON-able summary with the evaluations, and its aligned text."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np

import deepnet
from deepnet.formats import layout
from deepnet.formats.hdf5 import ModelFile
from deepnet.formats.mlp_file import append_mlp_evaluation
from deepnet.nn.mlp import MLP
from deepnet.tools.info import format_info, model_info


def _dense(path: Path) -> Path:
    deepnet.init(path, layers=1500, width=4, activation="softsign", progress=False)
    with ModelFile.open(path, "r+") as f:
        f.append_log([1, 2], [2.5, 2.25], [0.125, 0.25], [0.01, 0.02])
        f.step = 2
        f.record_evaluation(1, "heldout", 1000, 2.4, 0.1875)
        f.record_evaluation(2, "heldout", 1000, 2.2, 0.3125)
        f.record_evaluation(2, "test", 10_000, 2.3, 0.28125)
    return path


def _check_aligned(text: str) -> list[tuple[str, str]]:
    """Every line is "label  value" with the values in one column; returns (label, value) pairs."""
    lines = text.splitlines()
    assert lines and "{" not in text and "[" not in text and "'" not in text
    column = None
    pairs = []
    for line in lines:
        m = re.match(r"^( *\S(?:.*?\S)?)(?:( {2,})(\S.*))?$", line)
        assert m, line
        label, gap, value = m.group(1), m.group(2), m.group(3)
        if value is None:  # a heading of a nested part
            pairs.append((label, ""))
            continue
        start = len(label) + len(gap)
        column = start if column is None else column
        assert start == column, f"value of {label!r} starts at {start}, not {column}"
        pairs.append((label, value))
    return pairs


def test_dense_info_is_json_and_has_the_last_evaluations(tmp_path):
    info = model_info(_dense(tmp_path / "d.h5"))
    json.dumps(info)  # plain values only
    assert info["evaluations"] == 3
    assert info["last_heldout"] == {"step": 2, "loss": 2.2, "acc": 0.3125, "samples": 1000, "measurements": 2}
    assert info["last_test"] == {"step": 2, "loss": 2.3, "acc": 0.28125, "samples": 10_000, "measurements": 1}
    assert info["last_log"]["step"] == 2 and info["layers"] == 1500


def test_dense_info_text(tmp_path):
    info = model_info(_dense(tmp_path / "d.h5"))
    text = format_info(info)
    pairs = dict(_check_aligned(text))
    assert pairs["layers"] == "1,500" and pairs["width"] == "4" and pairs["activation"] == "softsign"
    assert re.fullmatch(r"\d+\.\d kB \([\d,]+ bytes\)", pairs["file size"]), pairs["file size"]
    assert pairs["alpha"] == "0.0258199"  # 1/sqrt(1500) to 6 significant digits
    assert pairs["last held-out"] == "accuracy 0.3125, loss 2.2000 at step 2 on 1,000 images (last of 2)"
    assert pairs["last test"] == "accuracy 0.2812, loss 2.3000 at step 2 on 10,000 images"
    assert pairs["last step"] == "step 2: loss 2.2500, batch accuracy 0.2500, 0.02 s"
    assert pairs["model"] == str(tmp_path / "d.h5") and pairs["state"] == "healthy: step 2"


def test_nested_parts_are_indented_under_their_name():
    text = format_info({"model": "x.h5", "train_settings": {"batch": 16, "layer_lr": 0.05, "holdout": 1000},
                        "ratio": 1 / 3, "big": 123456.789, "none": None, "flags": [1, 2], "empty": {}})
    lines = text.splitlines()
    pairs = _check_aligned(text)
    assert ("training settings", "") in pairs
    at = lines.index("training settings")
    assert [line.split()[:2] for line in lines[at + 1 : at + 4]] == [["batch", "16"], ["layer", "lr"], ["holdout", "1,000"]]
    assert all(line.startswith("  ") for line in lines[at + 1 : at + 4])
    values = dict(pairs)
    assert values["ratio"] == "0.333333" and values["big"] == "123,457" and values["none"] == "none"
    assert values["flags"] == "1, 2" and values["empty"] == "none"


def test_mlp_info_and_a_file_from_before_the_evaluations(tmp_path):
    path = tmp_path / "m.h5"
    MLP.new(8, seed=1).save(path)
    append_mlp_evaluation(path, 0, "test", 500, 2.31, 0.09)
    info = model_info(path)
    json.dumps(info)
    assert info["last_test"]["samples"] == 500 and "last_heldout" not in info
    pairs = dict(_check_aligned(format_info(info)))
    assert pairs["kind"] == "mlp" and pairs["hidden"] == "8" and pairs["last test"].startswith("accuracy 0.0900")

    dense = tmp_path / "old.h5"
    deepnet.init(dense, layers=10, width=2, activation="tanh", progress=False)
    with h5py.File(dense, "r+") as h:  # held-out figures from before /train/evals
        del h[layout.TRAIN_EVALS]
        h.create_dataset(layout.TRAIN_HELDOUT, data=np.array([(0, 2.0, 0.5)], layout.HELDOUT_DTYPE))
    info = model_info(dense)
    assert info["last_heldout"] == {"step": 0, "loss": 2.0, "acc": 0.5, "samples": 0, "measurements": 1}
    assert dict(_check_aligned(format_info(info)))["last held-out"] == "accuracy 0.5000, loss 2.0000 at step 0"
    deepnet.init(tmp_path / "new.h5", layers=10, width=2, activation="tanh", progress=False)
    assert "evaluations" not in model_info(tmp_path / "new.h5")
