"""`deepnet diagnose S --teacher T`: how a student's units match its teacher's, band by band (LuckMatters'
correlation and W_row_norm diagnostics, for deep residual cores).

A unit of layer d is one coordinate of the layer's activation act(h_d W_d + b_d) (what the residual adds,
before alpha). For each band of the student, the band's first layer s is matched with the teacher's layer
at the same relative depth, t = floor(s * L_teacher / L_student); over the probe batch, each teacher unit
gets its best Pearson correlation with any student unit of layer s (deepnet.tools.correlation). Per band:

- ``corr_mean``, ``corr_min``: the mean and the worst of the teacher units' best correlations;
- ``row_norm_matched``: the mean norm of the incoming weights (the column of W_s) of the student units
  that are some teacher unit's best match; ``row_norm_unmatched``: of the others (None if every unit is
  matched). LuckMatters' W_row_norm: in an over-parameterised student the units that matter keep their
  norm while the others shrink.
"""

from __future__ import annotations

import os

import numpy as np

from deepnet import activations
from deepnet.data.teacher import read_teacher_info
from deepnet.errors import ConfigError
from deepnet.formats import layout
from deepnet.formats.hdf5 import ModelFile
from deepnet.kernels.loader import kernels_for
from deepnet.nn import heads as _heads
from deepnet.tools.correlation import best_matches, unit_correlations

#: Layers per kernel call (and per read) when the teacher is run forward.
CHUNK_LAYERS = 10_000


def layer_activations(mf: ModelFile, x: np.ndarray, layers: list[int]) -> dict[int, np.ndarray]:
    """act(h_d W_d + b_d) as float64 (samples, width) at each layer d of ``layers`` of the open model,
    its core streamed once in chunks."""
    width, alpha, ww = mf.width, float(mf.alpha), mf.width * mf.width
    kernels = kernels_for(mf.activation, width)
    act = activations.get(mf.activation).forward_np
    weights = mf.h5[layout.CORE_WEIGHTS]
    h = np.ascontiguousarray(_heads.input_head(mf.read_heads(), x).T)
    out: dict[int, np.ndarray] = {}
    done = 0
    for d in sorted(set(layers)):
        for lo in range(done, d, CHUNK_LAYERS):
            kernels.forward(np.asarray(weights[lo:min(d, lo + CHUNK_LAYERS)], dtype=np.float32), h, alpha)
        done = d
        row = np.asarray(weights[d], dtype=np.float32)
        out[d] = act((h.T @ row[:ww].reshape(width, width) + row[ww:]).astype(np.float64))
    return out


def match_bands(teacher: str | os.PathLike, x: np.ndarray, student_layers: int, firsts: list[int],
                student_acts: list[np.ndarray], student_weights: list[np.ndarray]) -> tuple[dict, list[dict]]:
    """The teacher's description and, per band (its first layer in ``firsts``, the student's activations
    and W there), the figures of the module docstring."""
    with ModelFile.open(teacher, "r") as tf:
        if read_teacher_info(tf) is None:
            raise ConfigError(f"--teacher {teacher}: a model but not a teacher (make one with `deepnet teacher`)")
        if tf.input_dim != x.shape[1]:
            raise ConfigError(f"--teacher {teacher} takes {tf.input_dim} inputs but the student {x.shape[1]}")
        t_layers = [min(tf.layers - 1, first * tf.layers // student_layers) for first in firsts]
        teacher_acts = layer_activations(tf, x, t_layers)
        info = {"path": os.fspath(teacher), "layers": tf.layers, "width": tf.width, "activation": tf.activation}
    rows = []
    for t_layer, s_acts, w in zip(t_layers, student_acts, student_weights):
        best, index = best_matches(unit_correlations(teacher_acts[t_layer], s_acts))
        norms = np.linalg.norm(w.astype(np.float64), axis=0)   # column j: the weights into unit j
        matched = np.zeros(norms.shape[0], bool)
        matched[index] = True
        rows.append({"teacher_layer": t_layer, "corr_mean": float(best.mean()), "corr_min": float(best.min()),
                     "row_norm_matched": float(norms[matched].mean()),
                     "row_norm_unmatched": float(norms[~matched].mean()) if (~matched).any() else None})
    return info, rows
