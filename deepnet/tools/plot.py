"""Training curves of a model file: loss and accuracy versus step, with the evaluations training made.

Works for every kind of model file. The upper panel is the loss, the lower the accuracy; each shows the
per-step batch figures of /train/log (thin as logged, plus a trailing moving average) and, as markers,
the evaluations of /train/evals (deepnet.formats.evals): the held-out ones (joined by a line) and the
test ones. Files from before /train/evals show their /train/heldout measurements instead. Every axis
has labelled ticks; the loss axis is logarithmic when the loss spans a factor of LOG_SCALE_SPAN or more
(and says so in its label), else linear. The title names the model's shape and step.

:func:`build_figure` makes the matplotlib Figure without writing anything and :func:`figure_facts`
reads back what a reader of the image sees (labels, scales, tick labels, legends, title);
:func:`plot_training` writes the image. matplotlib is an optional dependency
(``pip install 'deepnet[plot]'``) and is imported only here, when a plot is drawn, through its object
API and the Agg canvas: no pyplot, no global backend switch, no display needed.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deepnet.errors import ConfigError, ModelFileError
from deepnet.flags import int_at_least
from deepnet.formats import evals as _evals
from deepnet.formats.hdf5 import ModelFile
from deepnet.formats.layout import EVAL_HELDOUT, EVAL_TEST, HELDOUT_DTYPE, KIND_DENSE, KIND_MLP
from deepnet.formats.mlp_file import model_kind, not_a_model, read_mlp_file

#: Smallest and largest automatic moving-average window (steps); automatic = about 1/50 of the log.
AUTO_SMOOTH_MIN, AUTO_SMOOTH_MAX = 1, 1000


#: The loss axis is logarithmic when its largest value is at least this many times its smallest.
LOG_SCALE_SPAN = 5.0
#: Tick positions within a decade tried on a logarithmic axis, fewest first, until at least MIN_TICKS fit.
LOG_SUBS = ((1.0,), (1.0, 2.0, 5.0), (1.0, 2.0, 3.0, 5.0, 7.0), tuple(float(m) for m in range(1, 10)))
#: Labelled ticks every axis gets at least.
MIN_TICKS = 3


@dataclass
class Curves:
    """What a plot draws from one model file."""

    log: np.ndarray                 # /train/log rows (step, loss, batch_acc, seconds), committed ones
    evals: np.ndarray               # evaluations (layout.EVAL_DTYPE)
    attrs: dict[str, Any] = field(default_factory=dict)  # kind, step, and layers/width/activation or hidden


def read_curves(path: str | os.PathLike) -> Curves:
    """The log, the evaluations and the shape of the model file at `path` (dense or mlp)."""
    path = os.fspath(path)
    kind = model_kind(path)
    if kind is None:
        not_a_model(path)
    if kind == KIND_MLP:
        contents = read_mlp_file(path)
        return Curves(contents.log, contents.evals,
                      {"kind": kind, "step": contents.step, "hidden": int(contents.params["w1"].shape[1])})
    if kind != KIND_DENSE:
        raise ModelFileError(f"{path} holds a model of kind {kind!r}, which this deepnet cannot plot")
    with ModelFile.open(path) as f:
        return Curves(f.read_log(), _evals.with_heldout_dataset(f.read_evaluations(), f.h5),
                      {"kind": kind, "step": f.step, "layers": f.layers, "width": f.width,
                       "activation": f.activation})


def read_train_log(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """The training log of any deepnet model file with the held-out figures joined on the step (columns
    heldout_loss, heldout_acc: NaN where none was measured), and the attributes the title uses."""
    curves = read_curves(path)
    held = _evals.of_kind(curves.evals, EVAL_HELDOUT)
    table = np.empty(held.shape[0], HELDOUT_DTYPE)
    table["step"], table["heldout_loss"], table["heldout_acc"] = held["step"], held["loss"], held["accuracy"]
    return merge_heldout(curves.log, table), curves.attrs


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


def describe(attrs: dict[str, Any]) -> str:
    """The model's shape and step, for a title: "1,000,000 layers x width 4, softsign, step 1,000"."""
    kind = attrs.get("kind")
    if kind == KIND_DENSE and "layers" in attrs:
        shape = f"{int(attrs['layers']):,} layers x width {int(attrs['width'])}, {attrs.get('activation', '?')}"
    elif kind == KIND_MLP and "hidden" in attrs:
        shape = f"mlp, hidden {int(attrs['hidden'])}"
    else:
        shape = str(kind)
    return f"{shape}, step {int(attrs['step']):,}" if "step" in attrs else shape


def _images(rows: np.ndarray) -> str:
    """How many images a series of evaluations used, for a legend: " (1,000 images)", or "" if unknown or mixed."""
    sizes = set(rows["samples"].tolist())
    if len(sizes) != 1 or 0 in sizes:
        return ""
    n = sizes.pop()
    return f" ({n:,} image{'s' if n != 1 else ''})"


def _latest(curves: Curves, window: int) -> str:
    """The last figures of each series, for the second line of the title."""
    log = curves.log
    parts = []
    if log.size:
        tail = log[-window:]
        over = f" (mean of the last {tail.size} steps)" if tail.size > 1 else ""
        parts.append(f"batch loss {float(np.mean(tail['loss'])):.4g}, accuracy {float(np.mean(tail['batch_acc'])):.4g}{over}")
    for kind, name in ((EVAL_HELDOUT, "held-out"), (EVAL_TEST, "test")):
        rows = _evals.of_kind(curves.evals, kind)
        if rows.size:
            last = rows[-1]
            parts.append(f"{name} accuracy {float(last['accuracy']):.4g} at step {int(last['step']):,}")
    return "; ".join(parts)


def _log_ticks(low: float, high: float) -> tuple[float, ...] | None:
    """The first of LOG_SUBS that puts at least MIN_TICKS ticks in [low, high], or None."""
    for subs in LOG_SUBS:
        ticks = [m * 10.0 ** e for e in range(int(np.floor(np.log10(low))), int(np.ceil(np.log10(high))) + 1)
                 for m in subs]
        if sum(low <= t <= high for t in ticks) >= MIN_TICKS:
            return subs
    return None


def _loss_axis(ax: Any, values: np.ndarray) -> None:
    """A logarithmic loss axis with plain labelled ticks when the loss spans LOG_SCALE_SPAN, else linear."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    finite = values[np.isfinite(values)]
    if finite.size and finite.min() > 0 and finite.max() >= LOG_SCALE_SPAN * finite.min():
        ax.set_yscale("log")
        low, high = ax.get_ylim()
        subs = _log_ticks(low, high)
        if subs is not None:
            ax.yaxis.set_major_locator(LogLocator(base=10.0, subs=subs))
            ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_ylabel("loss (log scale)")
            return
        ax.set_yscale("linear")
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6, min_n_ticks=MIN_TICKS))
    ax.set_ylabel("loss")


def build_figure(curves: Curves, *, name: str, smooth: int = 0, width: int = 1200, height: int = 800,
                 dpi: int = 100) -> tuple[Any, dict]:
    """The Figure of `curves` (a model file called `name`) on an Agg canvas, and what was drawn:
    {"columns": the series drawn, "smooth": the moving-average window, "title": the title}.
    Nothing is written. A ConfigError if matplotlib is missing or the log is empty."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ConfigError("plot needs matplotlib: pip install 'deepnet[plot]' (or matplotlib>=3.5)") from None
    log = curves.log
    if log.size == 0:
        raise ConfigError(f"{name} has an empty training log: nothing to plot (train it first)")
    window = smooth or int(np.clip(log.size // 50, AUTO_SMOOTH_MIN, AUTO_SMOOTH_MAX))
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    loss_ax, acc_ax = fig.subplots(2, 1, sharex=True)
    steps = log["step"].astype(np.float64)
    drawn: list[str] = []
    batch_color, held_color, test_color = "tab:blue", "tab:orange", "tab:green"
    mean = f" (mean of {window} steps)" if window > 1 else ""
    for ax, col, label in ((loss_ax, "loss", "batch loss"), (acc_ax, "batch_acc", "batch accuracy")):
        values = log[col].astype(np.float64)
        ok = np.isfinite(values)
        if ok.any():
            ax.plot(steps[ok], values[ok], color=batch_color, linewidth=0.5, alpha=0.3)
            ax.plot(steps[ok], moving_average(values[ok], window), color=batch_color, linewidth=1.6,
                    label=label + mean)
            drawn.append(col)
    held = _evals.of_kind(curves.evals, EVAL_HELDOUT)
    test = _evals.of_kind(curves.evals, EVAL_TEST)
    for rows, kind, color, style in ((held, "heldout", held_color, dict(marker="o", markersize=4, linewidth=1.2)),
                                     (test, "test", test_color, dict(marker="*", markersize=12, linestyle="none"))):
        if not rows.size:
            continue
        order = np.argsort(rows["step"], kind="stable")
        x = rows["step"][order].astype(np.float64)
        shown = "held-out" if kind == "heldout" else "test"
        for ax, col, what in ((loss_ax, "loss", "loss"), (acc_ax, "accuracy", "accuracy")):
            ax.plot(x, rows[col][order], color=color, label=f"{shown} {what}{_images(rows)}", **style)
            drawn.append(f"{kind}_{'loss' if what == 'loss' else 'acc'}")
    _loss_axis(loss_ax, np.concatenate([log["loss"], held["loss"], test["loss"]]).astype(np.float64))
    acc_values = np.concatenate([moving_average(log["batch_acc"][np.isfinite(log["batch_acc"])], window),
                                 held["accuracy"], test["accuracy"]])
    acc_values = acc_values[np.isfinite(acc_values)]
    if acc_values.size:
        # The first few percent of a run climb from chance; give the rest of the axis to the part where
        # the curves differ (the loss panel shows the whole climb).
        low = min(float(np.percentile(acc_values, 5)), float(acc_values[-1]), float(np.min(held["accuracy"], initial=1)),
                  float(np.min(test["accuracy"], initial=1)))
        acc_ax.set_ylim(bottom=max(0.0, low - 0.02) if low > 0.5 else None, top=1.005)
    acc_ax.set_ylabel("accuracy")
    acc_ax.yaxis.set_major_locator(MaxNLocator(nbins=6, min_n_ticks=MIN_TICKS))
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True, min_n_ticks=MIN_TICKS))
        ax.tick_params(labelbottom=True)  # the step axis labelled under both panels
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3, which="major")
        ax.legend(loc="best", fontsize="small")
    title = f"{name}: {describe(curves.attrs)}"
    latest = _latest(curves, window)
    fig.suptitle(f"{title}\n{latest}" if latest else title, fontsize="medium")
    fig.tight_layout()
    return fig, {"columns": drawn, "smooth": window, "title": title}


def figure_facts(fig: Any) -> dict:
    """What a reader of the drawn figure sees (the figure is drawn first): its title, and per panel the
    axis labels, the y scale, the labels of the ticks inside the view, and the legend's entries."""
    fig.canvas.draw()
    title = fig._suptitle.get_text() if fig._suptitle is not None else ""

    def labels(axis: Any, limits: tuple[float, float]) -> list[str]:
        low, high = sorted(limits)
        return [t.get_text() for t in axis.get_ticklabels()
                if t.get_visible() and t.get_text() and low <= t.get_position()[axis.axis_name == "y"] <= high]

    panels = []
    for ax in fig.axes:
        legend = ax.get_legend()
        panels.append({
            "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(), "yscale": ax.get_yscale(),
            "xticklabels": labels(ax.xaxis, ax.get_xlim()), "yticklabels": labels(ax.yaxis, ax.get_ylim()),
            "legend": [t.get_text() for t in legend.get_texts()] if legend is not None else [],
        })
    return {"title": title, "axes": panels}


def parse_size(size: str) -> tuple[int, int]:
    """``"1200x800"`` -> (1200, 800), or a one-line ConfigError."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(size))
    if match is None or not all(0 < int(n) <= 20_000 for n in match.groups()):
        raise ConfigError(f"--size must be WIDTHxHEIGHT in pixels (each 1 to 20000), e.g. 1200x800; got {size!r}")
    return int(match[1]), int(match[2])


def check_image_out(out: str, flag: str = "--out") -> None:
    """Refuse an image path that cannot be written (a directory, a missing directory, an unknown image
    type, no matplotlib) in one line, before anything is computed."""
    ext = os.path.splitext(out)[1].lower().lstrip(".")
    directory = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out):
        raise ConfigError(f"{flag} {out} is a directory")
    if not os.path.isdir(directory):
        raise ConfigError(f"{flag} {out}: directory {directory} does not exist")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install 'deepnet[plot]' (or matplotlib>=3.5)") from None
    supported = FigureCanvasAgg.get_supported_filetypes()
    if ext not in supported:
        raise ConfigError(f"{flag} {out}: unknown image type {ext or '(no extension)'!r}; "
                          f"use one of {', '.join(sorted(supported))}")


def save_figure(fig: Any, out: str, dpi: int) -> None:
    """Write ``fig`` to ``out`` (checked by check_image_out) under a temporary name, renamed into place."""
    ext = os.path.splitext(out)[1].lower().lstrip(".")
    tmp = os.path.join(os.path.dirname(os.path.abspath(out)), f".{os.path.basename(out)}.tmp-{os.getpid()}.{ext}")
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
    check_image_out(out)
    curves = read_curves(model)
    fig, drawn = build_figure(curves, name=os.path.basename(model), smooth=smooth, width=width, height=height,
                              dpi=dpi)
    save_figure(fig, out, dpi)
    return {"event": "plot", "model": model, "out": out, "rows": int(curves.log.size), "columns": drawn["columns"],
            "evaluations": int(curves.evals.size), "smooth": drawn["smooth"], "width": width, "height": height}
