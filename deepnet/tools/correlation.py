"""Unit-to-unit activation correlation between two networks (teacher-student matching, as in LuckMatters).

:func:`unit_correlations` gives the Pearson correlation of every unit of one network (the teacher) with every
unit of another (the student) over the same inputs; :func:`best_matches` picks, for each teacher unit, the
student unit it correlates with most. Activations are 2-D, rows = samples, columns = units; for convolutional
or sequence activations, fold the spatial/time positions into the rows first (units = channels).
"""

from __future__ import annotations

import numpy as np

__all__ = ["unit_correlations", "best_matches"]


def _as_2d(name: str, acts: np.ndarray) -> np.ndarray:
    a = np.asarray(acts, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D (samples, units), got shape {a.shape}")
    return a


def unit_correlations(teacher_acts: np.ndarray, student_acts: np.ndarray) -> np.ndarray:
    """The Pearson correlation of each teacher unit with each student unit over the samples.

    Both arrays have one row per sample (the same samples, in the same order) and one column per unit. Each
    unit's activations are centred over the samples and scaled to unit norm, and the result is the
    (k_teacher, k_student) matrix of their inner products, computed in float64 and clipped to [-1, 1].

    A unit whose activation is the same on every sample (zero variance, e.g. a ReLU unit that is dead on
    these inputs) has no defined correlation; it gets 0 against every unit. Constancy is tested exactly
    (max == min), so a unit with a tiny but non-zero spread still gets its true correlation. Non-finite
    activations give NaN correlations for their unit.

    Args:
        teacher_acts: (n_samples, k_teacher) activations of the reference network's units.
        student_acts: (n_samples, k_student) activations of the other network's units, same samples.

    Returns:
        (k_teacher, k_student) float64 array of correlations.
    """
    t = _as_2d("teacher_acts", teacher_acts)
    s = _as_2d("student_acts", student_acts)
    if t.shape[0] != s.shape[0]:
        raise ValueError(f"teacher_acts has {t.shape[0]} samples, student_acts {s.shape[0]}")
    if t.shape[0] < 2:
        raise ValueError("need at least 2 samples to correlate")
    t_live = ~(np.ptp(t, axis=0) == 0)  # NaN columns count as live: NaN in, NaN out
    s_live = ~(np.ptp(s, axis=0) == 0)
    tc = t - t.mean(axis=0)
    sc = s - s.mean(axis=0)
    t_norm = np.sqrt(np.einsum("ij,ij->j", tc, tc))
    s_norm = np.sqrt(np.einsum("ij,ij->j", sc, sc))
    # Dead units: unit "norm" of 1 and zeroed activations, so their rows/columns come out exactly 0.
    tc[:, ~t_live] = 0.0
    sc[:, ~s_live] = 0.0
    t_norm[~t_live] = 1.0
    s_norm[~s_live] = 1.0
    corr = (tc / t_norm).T @ (sc / s_norm)
    return np.clip(corr, -1.0, 1.0)


def best_matches(corr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each teacher unit (row), the highest correlation over the student units (columns) and which one.

    Ties go to the lowest student index.

    Args:
        corr: (k_teacher, k_student) correlation matrix, e.g. from :func:`unit_correlations`.

    Returns:
        (best, index): float64 (k_teacher,) best correlations and int64 (k_teacher,) student unit indices.
    """
    c = np.asarray(corr, dtype=np.float64)
    if c.ndim != 2 or c.shape[1] == 0:
        raise ValueError(f"corr must be 2-D with at least one column, got shape {c.shape}")
    index = np.argmax(c, axis=1).astype(np.int64)
    best = c[np.arange(c.shape[0]), index]
    return best, index
