"""Training curves from a model file's /train/log: loss and accuracy versus step, raw and smoothed.

Works for every kind of model file (dense and mlp share the log table). Whatever columns the log
has are drawn: those whose name contains "loss" on the upper panel, those containing "acc" (batch
accuracy now; a held-out accuracy column, NaN on the steps without an evaluation, would join it) on
the lower one. Each series is drawn thin as logged plus a trailing moving average.

matplotlib is an optional dependency (``pip install 'deepnet[plot]'``) and is imported only here, when
a plot is drawn, through its object API and the Agg canvas: no pyplot, no global backend switch, no
display needed.
"""

from __future__ import annotations

import os
from typing import Any

import h5py
import numpy as np

from deepnet.errors import ConfigError, ModelFileError
from deepnet.flags import int_at_least
from deepnet.formats.layout import TRAIN_HELDOUT, TRAIN_LOG
from deepnet.formats.mlp_file import model_kind, not_a_model
from deepnet.formats.values import decode

#: Smallest and largest automatic moving-average window (steps); automatic = about 1/50 of the log.
AUTO_SMOOTH_MIN, AUTO_SMOOTH_MAX = 1, 1000


def read_train_log(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """The /train/log table of any deepnet model file, and a few attributes to title the plot with."""
    path = os.fspath(path)
    kind = model_kind(path)
    if kind is None:
        not_a_model(path)
    try:
        with h5py.File(path, "r") as f:
            log = f.get(TRAIN_LOG)
            if not isinstance(log, h5py.Dataset) or log.ndim != 1 or log.dtype.names is None \
                    or "step" not in log.dtype.names:
                raise ModelFileError(f"{path} has no training log table (/train/log with a step column)")
            rows = log[()]
            held = f.get(TRAIN_HELDOUT)
            if isinstance(held, h5py.Dataset) and held.dtype.names and "step" in held.dtype.names:
                rows = merge_heldout(rows, held[()])
            attrs = {k: (decode(v) if isinstance(v, (bytes, str, np.bytes_)) else v) for k, v in f.attrs.items()
                     if k in ("kind", "layers", "width", "activation", "hidden", "step")}
    except OSError as exc:
        raise ModelFileError(f"could not read {path}: {' '.join(str(exc).split())}") from exc
    attrs["kind"] = kind
    return rows, attrs


def merge_heldout(rows: np.ndarray, held: np.ndarray) -> np.ndarray:
    """The log rows with the held-out columns of /train/heldout (deepnet.training.heldout) joined on the step:
    NaN on the steps without a measurement, so they are drawn as sparse series."""
    extra = [n for n in held.dtype.names if n != "step"]
    if not extra or not held.size:
        return rows
    out = np.empty(rows.shape, dtype=np.dtype(rows.dtype.descr + [(n, "<f8") for n in extra]))
    for name in rows.dtype.names:
        out[name] = rows[name]
    for name in extra:
        out[name] = np.nan
    order = np.argsort(rows["step"], kind="stable")
    sorted_steps = rows["step"][order]
    at = np.searchsorted(sorted_steps, held["step"])
    found = (at < sorted_steps.size) & (sorted_steps[np.minimum(at, sorted_steps.size - 1)] == held["step"])
    for name in extra:
        out[name][order[at[found]]] = held[name][found]
    return out


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` values (fewer at the start), same length as ``values``."""
    values = np.asarray(values, dtype=np.float64)
    if window <= 1 or values.size == 0:
        return values.copy()
    csum = np.concatenate([[0.0], np.cumsum(values)])
    idx = np.arange(1, values.size + 1)
    lo = np.maximum(0, idx - window)
    return (csum[idx] - csum[lo]) / (idx - lo)


def _minor_log_label(ax, value: float) -> str:
    """A minor tick's label on a log axis: all of them within 0.4 decades, 2/3/5 within 1.2, else none."""
    low, high = ax.get_ylim()
    if not (value > 0 and low > 0 and high > low):
        return ""
    decades = np.log10(high / low)
    mantissa = round(value / 10 ** np.floor(np.log10(value)), 6)
    if decades < 0.4 or (decades < 1.2 and mantissa in (2, 3, 5)):
        return f"{value:g}"
    return ""


def _describe(attrs: dict[str, Any]) -> str:
    kind = attrs.get("kind")
    if kind == "dense" and "layers" in attrs:
        return f"dense, {int(attrs['layers']):,} layers x width {int(attrs['width'])}, {attrs.get('activation', '?')}"
    if kind == "mlp" and "hidden" in attrs:
        return f"mlp, hidden {int(attrs['hidden'])}"
    return str(kind)


def plot_training(
    model: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    smooth: int = 0,
    width: int = 1200,
    height: int = 800,
    dpi: int = 100,
) -> dict:
    """Draw the training curves of ``model`` into ``out`` (PNG, or SVG/PDF by extension).

    ``out`` defaults to the model's path with the suffix ``.png``; ``smooth`` is the moving-average
    window in steps (0: about 1/50 of the log); ``width`` x ``height`` is the image size in pixels.
    The image is written under a temporary name and renamed into place. Returns what was drawn.
    """
    for name, value, minimum in (("smooth", smooth, 0), ("width", width, 100), ("height", height, 100),
                                 ("dpi", dpi, 10)):
        int_at_least(name, value, minimum)
    if width > 20_000 or height > 20_000:
        raise ConfigError(f"--width and --height must be <= 20000 pixels, got {width} x {height}")
    model = os.fspath(model)
    out = os.path.splitext(model)[0] + ".png" if out is None else os.fspath(out)
    ext = os.path.splitext(out)[1].lower().lstrip(".")
    directory = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out):
        raise ConfigError(f"--out {out} is a directory")
    if not os.path.isdir(directory):
        raise ConfigError(f"--out {out}: directory {directory} does not exist")

    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FuncFormatter
    except ImportError:
        raise ConfigError("plot needs matplotlib: pip install 'deepnet[plot]' (or matplotlib>=3.5)") from None

    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    supported = canvas.get_supported_filetypes()
    if ext not in supported:
        raise ConfigError(f"--out {out}: unknown image type {ext or '(no extension)'!r}; "
                          f"use one of {', '.join(sorted(supported))}")

    rows, attrs = read_train_log(model)
    if rows.size == 0:
        raise ConfigError(f"{model} has an empty training log: nothing to plot (train it first)")
    names = rows.dtype.names
    loss_cols = [n for n in names if "loss" in n]
    acc_cols = [n for n in names if "acc" in n]
    steps = rows["step"].astype(np.float64)
    window = smooth or int(np.clip(rows.size // 50, AUTO_SMOOTH_MIN, AUTO_SMOOTH_MAX))

    panels = [(cols, label) for cols, label in ((loss_cols, "loss"), (acc_cols, "accuracy")) if cols]
    if not panels:
        raise ConfigError(f"{model}: the training log has no loss or accuracy column (columns: {', '.join(names)})")
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]
    drawn: list[str] = []
    latest: dict[str, float] = {}  # each series' last smoothed value, for the title
    for ax, (cols, label) in zip(axes, panels):
        smoothed_all = []
        for i, col in enumerate(cols):
            values = rows[col].astype(np.float64)
            ok = np.isfinite(values)
            if not ok.any():
                continue
            x, v = steps[ok], values[ok]
            color = colors[i % len(colors)]
            sparse = ok.sum() < 0.5 * rows.size  # e.g. held-out figures logged every few hundred steps
            if sparse:
                ax.plot(x, v, "o-", color=color, markersize=3, linewidth=1, label=col)
                smoothed = v
            else:
                smoothed = moving_average(v, window)
                ax.plot(x, v, color=color, linewidth=0.5, alpha=0.3)
                ax.plot(x, smoothed, color=color, linewidth=1.6,
                        label=f"{col} (mean of {window})" if window > 1 else col)
            smoothed_all.append(smoothed)
            latest[col] = float(smoothed[-1])
            drawn.append(col)
        finite = np.concatenate([rows[c][np.isfinite(rows[c])] for c in cols])
        if label == "loss" and finite.size and np.all(finite > 0):
            ax.set_yscale("log")
            # Plain numbers (0.3, 1, 2 rather than 3x10^-1); minor ticks labelled only as far as they
            # fit: all of them within 0.4 decades, a few within 1 decade, none beyond.
            ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax.yaxis.set_minor_formatter(FuncFormatter(lambda value, _, ax=ax: _minor_log_label(ax, value)))
        if label == "accuracy" and smoothed_all:
            # The first few percent of a run climb from chance; give the rest of the axis to the
            # part where the curves differ (the loss panel shows the whole climb).
            low = float(np.percentile(np.concatenate(smoothed_all), 5))
            ax.set_ylim(bottom=max(0.0, low - 0.02) if low > 0.5 else None, top=1.005)
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(loc="best", fontsize="small")
    axes[-1].set_xlabel("step")
    summary = ", ".join(f"{c} {v:.4g}" for c, v in latest.items())
    over = f" (mean of the last {window})" if window > 1 else ""
    fig.suptitle(f"{os.path.basename(model)}: {_describe(attrs)}\nstep {int(rows[-1]['step']):,}{over}: {summary}",
                 fontsize="medium")
    fig.tight_layout()

    tmp = os.path.join(directory, f".{os.path.basename(out)}.tmp-{os.getpid()}.{ext}")
    try:
        fig.savefig(tmp, format=ext, dpi=dpi)
        os.replace(tmp, out)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise ConfigError(f"could not write {out}: {exc.strerror or exc}") from exc
        raise
    return {"event": "plot", "model": model, "out": out, "rows": int(rows.size), "columns": drawn,
            "smooth": window, "width": width, "height": height}
