"""The data half of the public API: fetch and coarsen MNIST, make teachers, look inside a trained core,
and the LuckMatters reproduction. deepnet.api re-exports every function here; the CLI's commands are
their signatures and docstrings (Args: one line each)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from deepnet.data import coarse as _coarse
from deepnet.data.mnist import default_data_dir, fetch_mnist
from deepnet.data.sources import coarse_dir
from deepnet.data.teacher import make_teacher
from deepnet.errors import ConfigError
from deepnet.tools.diagnose import build_depth_figure, diagnose_depth
from deepnet.tools.plot import check_image_out, save_figure
from deepnet.training.reporting import OnReport

PathLike = str | os.PathLike


def fetch_data(dest: PathLike | None = None, *, coarsen: int | tuple | None = None, progress: bool = False) -> dict:
    """Fetch MNIST (checked against its sha256) into a directory, and with --coarsen write its coarse
    cells once beside it; returns what is there.

    Args:
        dest: target directory; default $DEEPNET_DATA, else a per-user cache directory.
        coarsen: cell sides to coarsen MNIST at, e.g. 2,3,4: one byte file holds them all (sha256 in its
            .sha256 sidecar); training with --coarsen K writes it on first use too.
        progress: show download progress on stderr.
    """
    ks = _cell_sides(coarsen)
    directory = fetch_mnist(dest if dest is not None else default_data_dir(), progress=progress)
    out: dict[str, Any] = {"data_dir": os.fspath(directory)}
    if ks:
        path = _coarse.ensure_coarse_mnist(directory, ks, out_dir=coarse_dir(directory))
        info = _coarse.coarse_file_info(path)
        out.update(coarse_file=os.fspath(path), coarse_ks=list(info["ks"]),
                   coarse_bytes=os.path.getsize(path),
                   coarse_sha256=_coarse.sidecar_path(path).read_text().split()[0])
    return out


def _cell_sides(value: Any) -> list[int]:
    """--coarsen as a list of cell sides: 4, "2,3,4" or (2, 3, 4) (fire's reading of 2,3,4)."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value) if isinstance(value, (tuple, list)) else [value]
    try:
        ks = [int(str(k).strip()) for k in items]
    except ValueError:
        raise ConfigError(f"--coarsen must be cell sides such as 2,3,4, got {value!r}") from None
    if not ks or any(k < 2 for k in ks):
        raise ConfigError(f"--coarsen must be cell sides >= 2 such as 2,3,4, got {value!r}")
    return sorted(set(ks))


def teacher(model: PathLike, *, layers: int = 100, width: int = 4, activation: str = "relu", input_dim: int = 20,
            outputs: int = 100, data_std: float = 10.0, init_scale: float = 1.0, alpha: float | None = None,
            seed: int = 0, overwrite: bool = False) -> dict:
    """Make a teacher: a deepnet model with fixed random weights whose outputs on Gaussian inputs are the
    data a student learns (`deepnet train S.h5 --data teacher:T.h5`, regression with --loss mse).

    Its weights are drawn from the seed: core W, b ~ N(0, init_scale^2 / width); input head
    N(0, 1 / (data_std^2 input_dim)) (unit-variance pre-activations on the student's inputs); output
    head N(0, 1 / width); zero head biases. Students get inputs ~ N(0, data_std^2), fresh every step.

    Args:
        model: the teacher file to write.
        layers: core layers.
        width: core width.
        activation: core activation (default relu).
        input_dim: inputs per sample.
        outputs: outputs per sample (the targets' dimension, d_output).
        data_std: standard deviation of the Gaussian inputs (default 10).
        init_scale: scale of the core weights (W, b ~ N(0, init_scale^2 / width)).
        alpha: residual scale; default 1/sqrt(layers).
        seed: seed of the weights and of the test set.
        overwrite: replace an existing file.
    """
    return make_teacher(model, layers=layers, width=width, activation=activation, input_dim=input_dim,
                        outputs=outputs, data_std=data_std, init_scale=init_scale, alpha=alpha, seed=seed,
                        overwrite=overwrite)


def diagnose(model: PathLike, *, bands: int = 100, probe_samples: int = 64, gradient: bool = True,
             teacher: PathLike | None = None, plot: PathLike | None = None, data: str | None = None,
             data_dir: PathLike | None = None) -> dict:
    """Across the depth of a model's core, band by band, for a probe batch of test samples: the norms of h,
    of an update alpha*act(hW+b), of the gradient going back, of the weights and their change since init;
    with --teacher, how well the student's units match the teacher's at the same relative depth.

    Args:
        model: HDF5 model file (dense, or a sharded root); its core is streamed in chunks.
        bands: bands of consecutive layers (default 100).
        probe_samples: the first N test samples make the probe batch.
        gradient: send the probe's gradient back through the core for the ||grad|| column (a backward
            pass: about three forwards' work).
        teacher: a teacher file (`deepnet teacher`): per band, each teacher unit's best correlation with a
            student unit, the student units' weight norms (W_row_norm), matched and unmatched.
        plot: also draw the figures against depth into this image (.png, .svg, .pdf; needs matplotlib).
        data: probe with another source of the same inputs and classes; default the model's own.
        data_dir: MNIST directory; default $DEEPNET_DATA, else a per-user cache (fetched if empty).
    """
    if plot is not None:
        check_image_out(os.fspath(plot), "--plot")
    result = diagnose_depth(model, bands=bands, probe_samples=probe_samples, gradient=gradient, teacher=teacher,
                            data=data, data_dir=data_dir)
    if plot is not None:
        save_figure(build_depth_figure(result), os.fspath(plot), 100)
        result["plot"] = os.fspath(plot)
    return result


#: The two LuckMatters experiments `deepnet luckmatters` reproduces (deepnet.tools.luckmatters).
EXPERIMENTS = ("correlation", "row-norm")


def luckmatters(*, experiment: str = "correlation", iterations: int | None = None, d_output: int | None = None,
                node_multi: int | None = None, lr: float | None = None, seed: int = 0,
                on_report: OnReport | None = None) -> dict:
    """Reproduce LuckMatters (Tian et al., teacher-student training of deep ReLU networks) in NumPy: a
    plain multi-layer ReLU student, node_multi times wider, learns a fixed random ReLU teacher from
    Gaussian inputs; reports each teacher unit's best correlation with a student unit of its layer and
    the student units' W_row_norm, matched against unmatched.

    "correlation" is recon_multilayer.py's run (teacher widths 10-15-20-25, inputs of std 10, d_output
    100, node_multi 10, lr 0.05, 40 epochs of a fixed 100,000-sample set: about 75 s);
    "row-norm" is test_multilayer.py's (a perturbed, fan-in-normalised student, node_multi 2, fresh N(0,1)
    inputs, 20,000 steps), where the unmatched units' W_row_norm falls.

    Args:
        experiment: correlation or row-norm.
        iterations: SGD steps (default the experiment's).
        d_output: teacher and student outputs (default 100 for correlation, 30 for row-norm).
        node_multi: student width / teacher width per layer (default 10 for correlation, 2 for row-norm).
        lr: SGD learning rate (default 0.05).
        seed: seed of the teacher, the student and the data.
    """
    from deepnet.tools import luckmatters as _lm  # NumPy only; loaded when asked for

    if experiment not in EXPERIMENTS:
        raise ConfigError(f"--experiment must be one of {', '.join(EXPERIMENTS)}, got {experiment!r}")
    given = {k: v for k, v in (("iterations", iterations), ("d_output", d_output), ("node_multi", node_multi),
                               ("lr", lr)) if v is not None}
    for name, value in given.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or \
                (name != "lr" and not isinstance(value, int)):
            raise ConfigError(f"--{name.replace('_', '-')} must be a positive {'number' if name == 'lr' else 'integer'}"
                              f", got {value!r}")

    def record(row: dict) -> None:
        if on_report is not None:
            flat = {"event": "record", "iteration": row["iteration"], "train_loss": row["train_loss"],
                    "heldout_loss": row["heldout_loss"]}
            flat.update({f"corr_layer{i}": c for i, c in enumerate(row["best_corr_mean"])})
            on_report(flat)

    run = _lm.reproduce if experiment == "correlation" else _lm.reproduce_row_norm
    result = run(seed=seed, on_record=record, **given)
    result["experiment"] = experiment
    return result
