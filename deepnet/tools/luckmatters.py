"""A NumPy reproduction of the teacher-student experiments of LuckMatters (Tian, Jiang, Gong, Morcos,
"Luck Matters: Understanding Training Dynamics of Deep ReLU Networks", arXiv:1905.13405; code in
github.com/facebookresearch/luckmatters, top-level recon_multilayer.py, model_gen.py, theory_utils.py,
utils_corrs.py, test_multilayer.py and README.md).

A fixed random ReLU *teacher* (plain MLP: ReLU hidden layers of widths ``ks``, linear output) labels Gaussian
inputs; an over-parameterised *student* of the same depth (every hidden layer ``node_multi`` times wider)
learns the teacher's outputs by minibatch SGD on the squared error. The diagnostics are LuckMatters':

* per hidden layer, the Pearson correlation of each teacher unit's activation with each student unit's over a
  held-out set, the best (max) over the student units per teacher unit, and its mean/min over the teacher
  units (utils_corrs.act2corrMat + the "L0: min/max/mean" summary of recon_multilayer.py);
* ``W_row_norm`` (test_multilayer.py's name): with their (in, out) weight layout, row j of the weight matrix
  into layer l+1 is the *fan-out* of unit j of hidden layer l, so W_row_norm[j] is the norm of the outgoing
  weights of student unit j. Reported separately for the student units that are some teacher unit's best
  match ("matched"), for the others ("unmatched"), and for those correlating < 0.9 with every teacher unit
  ("unaligned").

Two presets, one engine:

* :func:`reproduce` -- recon_multilayer.py as their README runs it (``--data_std 10.0 --node_multi 10 --lr 0.05
  --dataset gaussian --d_output 100``): a fixed training set of 100,000 Gaussian samples reshuffled every epoch,
  batch 64, plain SGD (no momentum, no weight decay, no BatchNorm, no weight normalisation), MSE loss averaged
  over samples and outputs, PyTorch's default student initialisation. Claim: lowest layer best correlation
  0.999 within a few epochs, the next one ~0.95.
* :func:`reproduce_row_norm` -- test_multilayer.py as their README runs it for the W_row_norm split
  (``--perturb --node_multi 2 --lr 0.05 --init_std 0.1 --batchsize 64``): one hidden layer (ks = [10, 20, 30]:
  input 10, 20 hidden, 30 outputs), fresh N(0, 1) inputs every step, student = teacher + N(0, 0.1^2) noise
  on its first units and pure noise on the extra ones, and every unit's fan-in (weights and bias) rescaled to
  norm 1 after every step. Claim: fan-out norms ~1.1-1.5 for the teacher-matched units, ~1e-4 for the rest.

Training runs in float32 by default (LuckMatters trains in PyTorch float32; ``dtype="float64"`` is the
alternative), correlations are always computed in float64. Gradients are exact backprop, written by hand
(:func:`loss_and_grads`), checked against finite differences in tests/test_luckmatters.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from deepnet.nn.blas import blas_threads
from deepnet.tools.correlation import best_matches, unit_correlations

__all__ = [
    "ReluNet", "make_teacher", "make_student", "forward", "loss_and_grads", "loss_only", "normalize_fan_in",
    "layer_diagnostics", "reproduce", "reproduce_row_norm", "WEIGHT_CHOICES",
]

DTYPE = np.float64
# theory_utils.init_separate_w / model_gen.init_w: teacher weights drawn from this set, rows all distinct.
WEIGHT_CHOICES = (-0.5, -0.25, 0.0, 0.25, 0.5)
MATCH_THRESHOLD = 0.9  # stats_operator/vis_corrs "MatchCnt[>=0.9]"
Reduction = Literal["mean", "half_sum"]


@dataclass
class ReluNet:
    """A plain MLP: ReLU after every layer but the last, linear output.

    ``weights[l]`` is (fan_out, fan_in) (PyTorch's layout), ``biases[l]`` is (fan_out,).
    """

    weights: list[np.ndarray]
    biases: list[np.ndarray]

    @property
    def hidden_widths(self) -> list[int]:
        return [w.shape[0] for w in self.weights[:-1]]

    def copy(self) -> ReluNet:
        return ReluNet([w.copy() for w in self.weights], [b.copy() for b in self.biases])

    def astype(self, dtype: Any) -> ReluNet:
        """A copy with every array in ``dtype``."""
        return ReluNet([w.astype(dtype) for w in self.weights], [b.astype(dtype) for b in self.biases])


def forward(net: ReluNet, x: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """The hidden activations (post-ReLU, one (n, width) array per hidden layer) and the (n, d_out) output."""
    hidden = []
    h = x
    for w, b in zip(net.weights[:-1], net.biases[:-1]):
        h = h @ w.T
        h += b
        np.maximum(h, 0.0, out=h)
        hidden.append(h)
    y = h @ net.weights[-1].T
    y += net.biases[-1]
    return hidden, y


def _loss_scale(reduction: Reduction, n: int, d_out: int) -> float:
    if reduction == "mean":  # torch.nn.MSELoss(): mean over samples and outputs (recon_multilayer.py)
        return 1.0 / (n * d_out)
    if reduction == "half_sum":  # 1/2 sum over outputs, mean over samples (test_multilayer.py's update)
        return 0.5 / n
    raise ValueError(f"reduction must be 'mean' or 'half_sum', got {reduction!r}")


def loss_and_grads(net: ReluNet, x: np.ndarray, target: np.ndarray, reduction: Reduction = "mean"
                   ) -> tuple[float, list[np.ndarray], list[np.ndarray]]:
    """The squared-error loss of ``net`` on (x, target) and its exact gradients by backprop.

    Loss = scale * sum((y - target)^2) with scale 1/(n d_out) for ``"mean"`` and 1/(2n) for ``"half_sum"``.
    Returns (loss, weight gradients, bias gradients), gradients shaped like ``net.weights``/``net.biases``.
    The ReLU derivative at 0 is taken as 0.
    """
    hidden, y = forward(net, x)
    diff = y - target
    scale = _loss_scale(reduction, x.shape[0], y.shape[1])
    loss = scale * float(np.einsum("ij,ij->", diff, diff))
    g = diff * (2.0 * scale)  # dL/dy
    inputs = [x, *hidden]
    n_layers = len(net.weights)
    gw: list[np.ndarray] = [None] * n_layers  # type: ignore[list-item]
    gb: list[np.ndarray] = [None] * n_layers  # type: ignore[list-item]
    for layer in range(n_layers - 1, -1, -1):
        gw[layer] = g.T @ inputs[layer]
        gb[layer] = g.sum(axis=0)
        if layer > 0:
            g = g @ net.weights[layer]
            g *= inputs[layer] > 0  # ReLU gate: h > 0 exactly where the pre-activation is > 0
    return loss, gw, gb


def loss_only(net: ReluNet, x: np.ndarray, target: np.ndarray, reduction: Reduction = "mean") -> float:
    """The loss of :func:`loss_and_grads` without the gradients."""
    _, y = forward(net, x)
    diff = y - target
    return _loss_scale(reduction, x.shape[0], y.shape[1]) * float(np.einsum("ij,ij->", diff, diff))


def normalize_fan_in(net: ReluNet) -> None:
    """Rescale every unit's incoming weights and bias, together, to norm 1 (in place, every layer).

    This is test_multilayer.py's ``W /= W.norm(dim=0)`` on the bias-augmented (in+1, out) matrix. (model_gen's
    ``normalize_layer``, used by recon_multilayer's ``--normalize``, divides by the norm of the weights alone.)
    """
    for w, b in zip(net.weights, net.biases):
        norm = np.sqrt(np.einsum("ij,ij->i", w, w) + b * b)
        norm[norm == 0] = 1.0
        w /= norm[:, None]
        b /= norm


def _distinct_rows(rng: np.random.Generator, n_rows: int, n_cols: int, choices: Sequence[float]) -> np.ndarray:
    """n_rows rows of entries drawn uniformly from ``choices``, all distinct and none all-zero."""
    if len(choices) ** n_cols - 1 < n_rows:
        raise ValueError(f"cannot draw {n_rows} distinct non-zero rows of {n_cols} entries from {len(choices)} values")
    values = np.asarray(choices, dtype=DTYPE)
    seen = {tuple([0.0] * n_cols)}
    rows = np.empty((n_rows, n_cols), dtype=DTYPE)
    for i in range(n_rows):
        while True:
            row = values[rng.integers(0, len(values), n_cols)]
            key = tuple(row.tolist())
            if key not in seen:
                break
        seen.add(key)
        rows[i] = row
    return rows


def make_teacher(rng: np.random.Generator, data_d: int, ks: Sequence[int], d_output: int, *,
                 bias: float | None = None, choices: Sequence[float] = WEIGHT_CHOICES) -> ReluNet:
    """LuckMatters' random teacher (model_gen.Model.init_w + normalize, every layer incl. the output).

    Weights: each unit's row drawn from ``choices`` (distinct rows, none all-zero); bias U(-0.5, 0.5), or the
    constant ``bias`` (test_multilayer.py uses 0); then each unit's weights and bias divided by the norm of its
    weights (+1e-5), so every teacher unit has a unit-norm weight vector.
    """
    sizes = [data_d, *ks, d_output]
    weights, biases = [], []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        w = _distinct_rows(rng, fan_out, fan_in, choices)
        b = rng.uniform(-0.5, 0.5, fan_out) if bias is None else np.full(fan_out, float(bias))
        norm = np.sqrt(np.einsum("ij,ij->i", w, w)) + 1e-5
        weights.append(w / norm[:, None])
        biases.append(b / norm)
    return ReluNet(weights, biases)


def make_student(rng: np.random.Generator, data_d: int, ks: Sequence[int], d_output: int, node_multi: int, *,
                 init_std: float | None = None, perturb_from: ReluNet | None = None) -> ReluNet:
    """The student: hidden widths ``node_multi * ks``, same input and output sizes as the teacher.

    ``init_std=None``: PyTorch's nn.Linear default (weights and bias U(-1/sqrt(fan_in), 1/sqrt(fan_in))), what
    recon_multilayer.py gets from reset_parameters(). A float: weights and bias N(0, init_std^2)
    (test_multilayer.py). ``perturb_from``: add the teacher's weights and biases onto the student's first units
    (block [:k_out, :k_in] of every layer; test_multilayer.py's ``--perturb``), so student unit j < k_l of
    hidden layer l starts as a noisy copy of teacher unit j.
    """
    sizes = [data_d, *(k * node_multi for k in ks), d_output]
    weights, biases = [], []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        if init_std is None:
            bound = 1.0 / math.sqrt(fan_in)
            weights.append(rng.uniform(-bound, bound, (fan_out, fan_in)))
            biases.append(rng.uniform(-bound, bound, fan_out))
        else:
            weights.append(rng.normal(0.0, init_std, (fan_out, fan_in)))
            biases.append(rng.normal(0.0, init_std, fan_out))
    if perturb_from is not None:
        for w, b, wt, bt in zip(weights, biases, perturb_from.weights, perturb_from.biases):
            k_out, k_in = wt.shape
            w[:k_out, :k_in] += wt
            b[:k_out] += bt
    return ReluNet(weights, biases)


def _stat(values: np.ndarray, kind: str) -> float | None:
    return float(getattr(np, kind)(values)) if values.size else None


def layer_diagnostics(teacher: ReluNet, student: ReluNet, x: np.ndarray) -> list[dict]:
    """Per hidden layer: best-match correlations of the teacher units and the student units' W_row_norm split.

    On inputs ``x``: for each teacher unit the best correlation over the student units of the same layer
    (mean, min, and the mean over teacher units of how many student units reach >= 0.9, LuckMatters'
    MatchCnt); the student units that are some teacher unit's best match are "matched", the rest "unmatched"
    (which includes near-duplicates of matched units), and "unaligned" are the student units correlating
    < 0.9 with every teacher unit. W_row_norm of a student unit is the norm of its outgoing weights (its
    column in the next layer's (fan_out, fan_in) matrix): count, mean and min (matched) or max (the others).
    """
    hidden_t, _ = forward(teacher, x)
    hidden_s, _ = forward(student, x)
    out = []
    for layer, (ht, hs) in enumerate(zip(hidden_t, hidden_s)):
        corr = unit_correlations(ht, hs)
        best, index = best_matches(corr)
        w_next = student.weights[layer + 1]
        fan_out = np.sqrt(np.einsum("ij,ij->j", w_next, w_next))
        matched = np.zeros(hs.shape[1], dtype=bool)
        matched[index] = True
        with np.errstate(invalid="ignore"):
            unaligned = ~(corr.max(axis=0) >= MATCH_THRESHOLD)  # below 0.9 with every teacher unit
        out.append({
            "layer": layer,
            "teacher_units": int(ht.shape[1]),
            "student_units": int(hs.shape[1]),
            "mean_best_corr": float(best.mean()),
            "min_best_corr": float(best.min()),
            "match_count_0.9": float((corr >= MATCH_THRESHOLD).sum(axis=1).mean()),
            "best_student": index.tolist(),
            "w_row_norm": {
                "matched": {"count": int(matched.sum()), "mean": _stat(fan_out[matched], "mean"),
                            "min": _stat(fan_out[matched], "min")},
                "unmatched": {"count": int((~matched).sum()), "mean": _stat(fan_out[~matched], "mean"),
                              "max": _stat(fan_out[~matched], "max")},
                "unaligned": {"count": int(unaligned.sum()), "mean": _stat(fan_out[unaligned], "mean"),
                              "max": _stat(fan_out[unaligned], "max")},
            },
        })
    return out


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _batches(rng: np.random.Generator, data_d: int, data_std: float, batch: int, n_train: int | None,
             dtype: Any) -> Iterator[np.ndarray]:
    """Minibatches: a fixed set of n_train samples reshuffled each epoch, the last batch of an epoch partial
    (torch DataLoader(shuffle=True), drop_last False); or, with n_train None, fresh samples every step."""
    if n_train is None:
        while True:
            yield rng.normal(0.0, data_std, (batch, data_d)).astype(dtype, copy=False)
    data = rng.normal(0.0, data_std, (n_train, data_d)).astype(dtype, copy=False)
    while True:
        order = rng.permutation(n_train)
        for start in range(0, n_train, batch):
            yield data[order[start:start + batch]]


def reproduce(*, data_d: int = 20, ks: Sequence[int] = (10, 15, 20, 25), d_output: int = 100,
              node_multi: int = 10, data_std: float = 10.0, batch: int = 64, lr: float = 0.05,
              iterations: int = 62_520, seed: int = 0, record_every: int = 1_563,
              on_record: Callable[[dict], Any] | None = None, n_train: int | None = 100_000,
              n_eval: int = 1024, reduction: Reduction = "mean", normalize: bool = False,
              student_init_std: float | None = None, perturb: bool = False,
              teacher_bias: float | None = None, dtype: Literal["float32", "float64"] = "float32") -> dict:
    """Train an over-parameterised ReLU student on a random ReLU teacher and track their unit matching.

    Defaults are recon_multilayer.py's (its argparse defaults plus the README's ``--lr 0.05 --d_output 100``),
    unscaled: 40 epochs of ceil(100,000 / 64) = 1563 steps = 62,520 SGD steps, which take ~75 s in float32 on
    one core of the 2-vCPU machine (BLAS is held to one thread: the matrices are small). What differs from
    their script: the correlations use the whole 1024-sample held-out set (theirs: 3 shuffled batches of 64),
    and the default recording is once per epoch, as theirs. Prints nothing; ``on_record`` gets each record
    row as it is made.

    Args:
        data_d: input dimension.
        ks: teacher hidden widths, lowest layer first.
        d_output: output dimension (teacher and student).
        node_multi: student hidden width = node_multi x teacher width, layer by layer.
        data_std: standard deviation of the Gaussian inputs (training and held-out).
        batch: minibatch size.
        lr: SGD learning rate (no momentum, no weight decay).
        iterations: number of SGD steps.
        seed: seeds the numpy Generator (teacher, student, data and order streams are spawned from it).
        record_every: record (losses and correlations) every this many steps, and at 0 and at the end.
        on_record: called with each record row (a dict) when it is made, e.g. to print a progress table.
        n_train: size of the fixed training set (reshuffled every epoch); None draws fresh inputs every step.
        n_eval: size of the fixed held-out set (held-out loss and all correlations/diagnostics).
        reduction: "mean" (torch MSELoss: mean over samples and outputs) or "half_sum" (1/2 sum over outputs).
        normalize: rescale every student unit's fan-in (weights and bias) to norm 1 at start and after each step.
        student_init_std: None for PyTorch's default init; a float for N(0, std^2) weights and biases.
        perturb: start the first k_l student units of every layer as the teacher's weights plus the init noise.
        teacher_bias: None for teacher biases U(-0.5, 0.5); a float for that constant bias (before normalising).
        dtype: training precision, "float32" (LuckMatters' PyTorch) or "float64"; correlations are float64.

    Returns:
        JSON-serialisable dict: ``settings``; ``records`` (iteration, epoch, train_loss = mean minibatch loss
        since the previous record (at 0: the first minibatch, before training), heldout_loss, and per hidden
        layer lists best_corr_mean / best_corr_min); ``initial`` and ``final`` per-layer diagnostics (see
        :func:`layer_diagnostics`: mean/min best correlation, W_row_norm of matched units (count, mean, min),
        of unmatched and of unaligned units (count, mean, max)); ``diverged`` (loss became non-finite; training
        stopped there),
        ``iterations_done`` and ``seconds``. Non-finite numbers are reported as None.
    """
    if iterations < 0 or record_every < 1 or batch < 1 or node_multi < 1 or n_eval < 2:
        raise ValueError("need iterations >= 0, record_every >= 1, batch >= 1, node_multi >= 1, n_eval >= 2")
    if n_train is not None and n_train < 1:
        raise ValueError("n_train must be >= 1 or None")
    _loss_scale(reduction, 1, 1)  # validates
    if dtype not in ("float32", "float64"):
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    with blas_threads(1):  # small matrices: extra BLAS threads only spin (and fight other jobs for the cores)
        return _reproduce(data_d=data_d, ks=ks, d_output=d_output, node_multi=node_multi, data_std=data_std,
                          batch=batch, lr=lr, iterations=iterations, seed=seed, record_every=record_every,
                          on_record=on_record, n_train=n_train, n_eval=n_eval, reduction=reduction,
                          normalize=normalize, student_init_std=student_init_std, perturb=perturb,
                          teacher_bias=teacher_bias, dtype=dtype)


def _reproduce(*, data_d: int, ks: Sequence[int], d_output: int, node_multi: int, data_std: float, batch: int,
               lr: float, iterations: int, seed: int, record_every: int, on_record: Callable[[dict], Any] | None,
               n_train: int | None, n_eval: int, reduction: Reduction, normalize: bool,
               student_init_std: float | None, perturb: bool, teacher_bias: float | None, dtype: str) -> dict:
    started = time.perf_counter()
    teacher_seq, student_seq, eval_seq, data_seq = np.random.SeedSequence(seed).spawn(4)
    teacher = make_teacher(np.random.default_rng(teacher_seq), data_d, ks, d_output, bias=teacher_bias)
    student = make_student(np.random.default_rng(student_seq), data_d, ks, d_output, node_multi,
                           init_std=student_init_std, perturb_from=teacher if perturb else None)
    if normalize:
        normalize_fan_in(student)
    teacher, student = teacher.astype(dtype), student.astype(dtype)
    x_eval = np.random.default_rng(eval_seq).normal(0.0, data_std, (n_eval, data_d)).astype(dtype)
    _, y_eval = forward(teacher, x_eval)
    batches = _batches(np.random.default_rng(data_seq), data_d, data_std, batch, n_train, dtype)
    steps_per_epoch = None if n_train is None else -(-n_train // batch)

    settings = {
        "data_d": data_d, "ks": list(ks), "d_output": d_output, "node_multi": node_multi, "data_std": data_std,
        "batch": batch, "lr": lr, "iterations": iterations, "seed": seed, "record_every": record_every,
        "n_train": n_train, "n_eval": n_eval, "reduction": reduction, "normalize": normalize,
        "student_init_std": student_init_std, "perturb": perturb, "teacher_bias": teacher_bias,
        "student_widths": student.hidden_widths, "steps_per_epoch": steps_per_epoch, "dtype": dtype,
        "optimizer": "plain SGD (no momentum, no weight decay), exact backprop", "batchnorm": False,
    }
    records: list[dict] = []

    def record(iteration: int, train_loss: float) -> None:
        heldout = loss_only(student, x_eval, y_eval, reduction)
        layers = layer_diagnostics(teacher, student, x_eval)
        row = {
            "iteration": iteration,
            "epoch": None if steps_per_epoch is None else iteration / steps_per_epoch,
            "train_loss": _finite_or_none(train_loss),
            "heldout_loss": _finite_or_none(heldout),
            "best_corr_mean": [_finite_or_none(layer["mean_best_corr"]) for layer in layers],
            "best_corr_min": [_finite_or_none(layer["min_best_corr"]) for layer in layers],
        }
        records.append(row)
        if on_record is not None:
            on_record(row)

    x = next(batches)
    _, t = forward(teacher, x)
    initial = layer_diagnostics(teacher, student, x_eval)
    record(0, loss_only(student, x, t, reduction))
    diverged = False
    done = 0
    loss_sum, loss_n = 0.0, 0
    with np.errstate(over="ignore", invalid="ignore"):
        for it in range(1, iterations + 1):
            loss, gw, gb = loss_and_grads(student, x, t, reduction)
            if not math.isfinite(loss):  # the weights after step it-1 give a non-finite loss: stop there
                diverged = True
                if records[-1]["iteration"] != it - 1:
                    record(it - 1, math.nan)
                break
            for w, b, dw, db in zip(student.weights, student.biases, gw, gb):
                w -= lr * dw
                b -= lr * db
            if normalize:
                normalize_fan_in(student)
            done = it
            loss_sum += loss
            loss_n += 1
            if it % record_every == 0 or it == iterations:
                record(it, loss_sum / loss_n)
                loss_sum, loss_n = 0.0, 0
            if it < iterations:
                x = next(batches)
                _, t = forward(teacher, x)
        final = layer_diagnostics(teacher, student, x_eval)
    result = {"settings": settings, "records": records, "initial": initial, "final": final,
              "diverged": diverged, "iterations_done": done, "seconds": time.perf_counter() - started}
    return _sanitize(result)


def reproduce_row_norm(*, data_d: int = 10, ks: Sequence[int] = (20,), d_output: int = 30, node_multi: int = 2,
                       data_std: float = 1.0, batch: int = 64, lr: float = 0.05, iterations: int = 20_000,
                       seed: int = 0, record_every: int = 2_000, on_record: Callable[[dict], Any] | None = None,
                       init_std: float = 0.1, dtype: Literal["float32", "float64"] = "float32") -> dict:
    """The W_row_norm experiment: test_multilayer.py ``--perturb --node_multi 2 --lr 0.05 --init_std 0.1
    --batchsize 64`` (its ks = [10, 20, 30], N(0, 1) inputs fresh every step, 20,000 steps, teacher bias 0).

    Same engine and result as :func:`reproduce`, with: fresh inputs, the "half_sum" loss (their update is
    lr * E[x (y_teacher - y_student)^T]-style, no 1/d_out), student N(0, init_std^2) plus the teacher's weights
    on its first units, and every unit's fan-in (weights and bias) renormalised to 1 after every step.
    Differences from their script: exact backprop on the batch (theirs factorises E[x x^T] and the ReLU gate
    products over the batch, exact only at batch 1), and the output is linear in the loss as in their gradient
    (their forward also puts a ReLU on the output, used only in the printed loss).

    Args:
        data_d: input dimension (their ks[0]).
        ks: teacher hidden widths (their ks[1:-1]).
        d_output: output dimension (their ks[-1]).
        node_multi: student hidden width multiplier.
        data_std: standard deviation of the Gaussian inputs.
        batch: minibatch size.
        lr: SGD learning rate.
        iterations: number of SGD steps.
        seed: seeds the numpy Generator.
        record_every: record every this many steps (and at 0 and at the end).
        on_record: called with each record row.
        init_std: standard deviation of the student's initial weights and biases.
        dtype: training precision, "float32" or "float64".

    Returns:
        The dict of :func:`reproduce`.
    """
    return reproduce(data_d=data_d, ks=ks, d_output=d_output, node_multi=node_multi, data_std=data_std,
                     batch=batch, lr=lr, iterations=iterations, seed=seed, record_every=record_every,
                     on_record=on_record, n_train=None, n_eval=1024, reduction="half_sum", normalize=True,
                     student_init_std=init_std, perturb=True, teacher_bias=0.0, dtype=dtype)


def _sanitize(value: Any) -> Any:
    """Plain JSON values: numpy scalars to Python, non-finite floats to None."""
    if isinstance(value, dict):
        return {k: _sanitize(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_sanitize(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return _finite_or_none(float(value))
    return value
