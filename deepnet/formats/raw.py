"""The original experiment's raw weight files: little-endian float32, no header, nothing but numbers.

Dense model (two files)::

    weights file   L rows of [W_i (w x w, row-major: input index major) | b_i (w)]
                   = exactly the rows of deepnet's /core/weights; L * (w*w + w) * 4 bytes
    head file      input_w (784 x w, pixel-major) | input_b (w) | output_w (w x 10, unit-major) | output_b (10)
                   = /head/input/weight, /head/input/bias, /head/output/weight, /head/output/bias, raveled

MLP model (one file)::

    head file      w1 (784 x hidden) | b1 (hidden) | w2 (hidden x 10) | b2 (10)   (/mlp/w1 ... /mlp/b2)

A raw file says nothing about its own shape, so the sizes are checked against the shape given on the
command line before anything is created, and a mismatch names both sizes. The weights file is
streamed a few MiB at a time (it is 0.8 GB at 10M layers x width 4), both ways. Every output is
written under a temporary name beside its target and renamed into place when complete, so a failed
or interrupted import/export never leaves a half-written file at the output path.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any

import numpy as np

from deepnet import activations
from deepnet.errors import ConfigError, ModelFileError
from deepnet.flags import int_at_least
from deepnet.formats import interrupts, layout
from deepnet.formats.atomic import atomic_path, check_output
from deepnet.formats.mlp_file import mlp_shapes, model_kind, read_mlp_file, write_mlp_file
from deepnet.formats.model_file import ModelFile
from deepnet.formats.values import now, os_reason

RAW_DTYPE = np.dtype("<f4")
#: Bytes per streamed block (rounded to whole HDF5 storage chunks of the model).
BLOCK_BYTES = 8 << 20


def dense_weights_bytes(layers: int, width: int) -> int:
    """Size of a dense weights file: L rows of w*w + w float32."""
    return layers * (width * width + width) * RAW_DTYPE.itemsize


def dense_head_bytes(width: int, input_dim: int = 784, n_classes: int = 10) -> int:
    """Size of a dense head file: input_w, input_b, output_w, output_b."""
    return (input_dim * width + width + width * n_classes + n_classes) * RAW_DTYPE.itemsize


def mlp_head_bytes(hidden: int, input_dim: int = 784, n_classes: int = 10) -> int:
    """Size of an MLP file: w1, b1, w2, b2 (the same sum as a dense head of width = hidden)."""
    return dense_head_bytes(hidden, input_dim, n_classes)


def _implied_width(nbytes: int, input_dim: int, n_classes: int) -> int | None:
    floats, rem = divmod(nbytes, RAW_DTYPE.itemsize)
    per_unit = input_dim + 1 + n_classes
    if rem or floats <= n_classes or (floats - n_classes) % per_unit:
        return None
    return (floats - n_classes) // per_unit


# ----------------------------------------------------------------------------------------------
# checks made before anything is written


def _int_flag(name: str, value: Any, minimum: int = 1) -> int:
    if value is None:
        raise ConfigError(f"--{name} is required")
    return int_at_least(name, value, minimum)


def _path_flag(name: str, value: Any) -> str:
    if value is None or value == "":
        raise ConfigError(f"--{name} is required")
    if not isinstance(value, (str, os.PathLike)):
        raise ConfigError(f"--{name} must be a path, got {value!r}")
    return os.fspath(value)


def _input_file(name: str, path: str) -> int:
    """Size of an existing regular input file (one-line error otherwise)."""
    if not os.path.exists(path):
        raise ModelFileError(f"--{name} {path} does not exist")
    if not os.path.isfile(path):
        raise ModelFileError(f"--{name} {path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise ModelFileError(f"--{name} {path} is not readable")
    return os.path.getsize(path)


def _check_size(name: str, path: str, actual: int, expected: int, shape: str, hint: str = "") -> None:
    if actual != expected:
        raise ModelFileError(
            f"--{name} {path} has {actual:,} bytes but {expected:,} bytes are expected for {shape}{hint}")


def _distinct(**paths: str | None) -> None:
    seen: dict[str, str] = {}
    for name, path in paths.items():
        if path is None:
            continue
        real = os.path.realpath(path)
        if real in seen:
            raise ConfigError(f"--{seen[real]} and --{name} are the same file ({path})")
        seen[real] = name


def _os_error(action: str, path: str, exc: OSError) -> ModelFileError:
    return ModelFileError(f"could not {action} {path}: {os_reason(exc)}")


def _read_floats(path: str, count: int, what: str) -> np.ndarray:
    try:
        data = np.fromfile(path, dtype=RAW_DTYPE, count=count)
    except OSError as exc:
        raise _os_error("read", path, exc) from exc
    if data.size != count:
        raise ModelFileError(f"{path} ended after {data.size} of {count} floats")
    _check_finite(data, path, what)
    return data.astype(np.float32, copy=False)


def _check_finite(data: np.ndarray, path: str, what: str) -> None:
    if not np.isfinite(data).all():
        bad = int(np.flatnonzero(~np.isfinite(data))[0])
        raise ModelFileError(f"{path} holds a non-finite value ({data.flat[bad]}) in {what}")


def _split(flat: np.ndarray, shapes: list[tuple[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    out, at = {}, 0
    for name, shape in shapes:
        n = math.prod(shape)
        out[name] = np.ascontiguousarray(flat[at:at + n].reshape(shape))
        at += n
    assert at == flat.size
    return out


def _dense_head_shapes(width: int, input_dim: int, n_classes: int) -> list[tuple[str, tuple[int, ...]]]:
    return [("input_weight", (input_dim, width)), ("input_bias", (width,)),
            ("output_weight", (width, n_classes)), ("output_bias", (n_classes,))]


def _write_floats(path: str, arrays: list[np.ndarray]) -> None:
    """Write the arrays one after another as raw little-endian float32."""
    with open(path, "wb") as fh:
        for a in arrays:
            fh.write(memoryview(np.ascontiguousarray(a, dtype=RAW_DTYPE)).cast("B"))


# ----------------------------------------------------------------------------------------------
# import


def import_raw(
    model: str | os.PathLike,
    *,
    head: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    kind: str = "dense",
    layers: int | None = None,
    width: int | None = None,
    activation: str | None = None,
    alpha: float | None = None,
    hidden: int | None = None,
    seed: int = 0,
    input_dim: int = 784,
    n_classes: int = 10,
    overwrite: bool = False,
    progress: bool = True,
    storage_chunk_layers: int | None = None,
) -> dict:
    """Make a deepnet model file from the original's raw files; returns what was imported.

    Dense (``kind="dense"``): ``weights`` and ``head`` files, ``layers``, ``width``, ``activation``
    required, ``alpha`` defaults to 1/sqrt(layers). MLP (``kind="mlp"``): the ``head`` file holds
    w1 | b1 | w2 | b2 and ``hidden`` is required. Sizes are checked before anything is created.
    ``storage_chunk_layers`` is passed to :meth:`ModelFile.create` (default: about 1 MiB chunks).
    """
    model = _path_flag("model", model)
    head = _path_flag("head", head)
    input_dim = _int_flag("input-dim", input_dim)
    n_classes = _int_flag("n-classes", n_classes, 2)
    seed = _int_flag("seed", seed, 0)
    if kind == "mlp":
        given = [f"--{n}" for n, v in (("weights", weights), ("layers", layers), ("width", width),
                                      ("activation", activation), ("alpha", alpha)) if v is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} apply to --kind dense only (an mlp file is its --head alone)")
        hidden = _int_flag("hidden", hidden)
        _distinct(head=head, model=model)
        size = _input_file("head", head)
        implied = _implied_width(size, input_dim, n_classes)
        _check_size("head", head, size, mlp_head_bytes(hidden, input_dim, n_classes), f"--hidden {hidden}",
                    f" (its size fits --hidden {implied})" if implied else "")
        check_output(model, overwrite=overwrite, flag="model")
        return _import_mlp(model, head, hidden, seed, input_dim, n_classes, overwrite)
    if kind != "dense":
        raise ConfigError(f"--kind must be dense or mlp, got {kind!r}")
    if hidden is not None:
        raise ConfigError("--hidden applies to --kind mlp only (a dense model has --layers and --width)")
    weights = _path_flag("weights", weights)
    layers = _int_flag("layers", layers)
    width = _int_flag("width", width)
    if activation is None:
        raise ConfigError("--activation is required (the raw files do not record it; see `deepnet activations`)")
    activations.get(activation)
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or not math.isfinite(alpha) or alpha <= 0):
        raise ConfigError(f"--alpha must be a finite number > 0, got {alpha!r}")
    _distinct(weights=weights, head=head, model=model)
    wsize = _input_file("weights", weights)
    row_bytes = (width * width + width) * RAW_DTYPE.itemsize
    hint = f" (its size fits --layers {wsize // row_bytes} at width {width})" if wsize % row_bytes == 0 else ""
    _check_size("weights", weights, wsize, dense_weights_bytes(layers, width),
                f"--layers {layers} --width {width}", hint)
    hsize = _input_file("head", head)
    implied = _implied_width(hsize, input_dim, n_classes)
    _check_size("head", head, hsize, dense_head_bytes(width, input_dim, n_classes), f"--width {width}",
                f" (its size fits --width {implied})" if implied else "")
    check_output(model, overwrite=overwrite, flag="model")
    return _import_dense(model, weights, head, layers, width, activation, alpha, seed, input_dim, n_classes,
                         overwrite, progress, storage_chunk_layers)


def _import_mlp(model: str, head: str, hidden: int, seed: int, input_dim: int, n_classes: int,
                overwrite: bool) -> dict:
    started = time.perf_counter()
    flat = _read_floats(head, mlp_head_bytes(hidden, input_dim, n_classes) // 4, "the mlp parameters")
    params = _split(flat, list(mlp_shapes(hidden, input_dim, n_classes).items()))
    write_mlp_file(model, params, step=0, seed=seed, rng_state=None, log=np.empty(0, layout.LOG_DTYPE),
                   created=now(), overwrite=overwrite, evals=np.empty(0, layout.EVAL_DTYPE))
    return {"event": "import", "model": model, "kind": "mlp", "hidden": hidden,
            "bytes": os.path.getsize(head), "seconds": time.perf_counter() - started}


def _import_dense(model: str, weights: str, head: str, layers: int, width: int, activation: str,
                  alpha: float | None, seed: int, input_dim: int, n_classes: int, overwrite: bool,
                  progress: bool, storage_chunk_layers: int | None = None) -> dict:
    # tqdm.auto is slow to import (bench/README.md, "deepnet.formats"); only a streamed copy needs it.
    from tqdm.auto import tqdm

    started = time.perf_counter()
    heads = _split(_read_floats(head, dense_head_bytes(width, input_dim, n_classes) // 4, "the heads"),
                   _dense_head_shapes(width, input_dim, n_classes))
    try:
        with atomic_path(model, overwrite=overwrite) as tmp:
            # The normal initialisation (a fresh, fully allocated file whose every chunk exists), then the
            # raw rows over it block by block: ModelFile.create only takes whole in-RAM arrays.
            with ModelFile.create(tmp, layers=layers, width=width, activation=activation, alpha=alpha, seed=seed,
                                  input_dim=input_dim, n_classes=n_classes, overwrite=True, progress=progress,
                                  storage_chunk_layers=storage_chunk_layers) as mf:
                row = mf.row_size
                chunk = mf.storage_chunk_layers
                block = chunk * max(1, BLOCK_BYTES // (chunk * row * RAW_DTYPE.itemsize))
                buf = np.empty((min(block, layers), row), dtype=RAW_DTYPE)
                with open(weights, "rb") as fh, tqdm(total=layers, desc=f"import {os.path.basename(weights)}",
                                                     unit="layer", unit_scale=True, disable=not progress,
                                                     leave=False) as bar:
                    for start in range(0, layers, block):
                        n = min(block, layers - start)
                        view = buf[:n]
                        got = fh.readinto(memoryview(view).cast("B"))
                        if got != view.nbytes:
                            raise ModelFileError(f"{weights} ended early, at layer {start + got // (row * 4)} "
                                                 f"of {layers}")
                        if not np.isfinite(view).all():
                            bad = int(np.flatnonzero(~np.isfinite(view))[0])
                            raise ModelFileError(f"{weights} holds a non-finite value ({view.flat[bad]}) in layer "
                                                 f"{start + bad // row}")
                        interrupts.check()
                        mf.write_layers(start, view, 0)
                        bar.update(n)
                mf.write_heads(heads)
                mf.flush()
                summary_alpha = mf.alpha
    except OSError as exc:
        raise _os_error("import into", model, exc) from exc
    return {"event": "import", "model": model, "kind": "dense", "layers": layers, "width": width,
            "activation": activation, "alpha": summary_alpha,
            "bytes": os.path.getsize(weights) + os.path.getsize(head), "seconds": time.perf_counter() - started}


# ----------------------------------------------------------------------------------------------
# export


def export_raw(
    model: str | os.PathLike,
    *,
    head: str | os.PathLike,
    weights: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write a model file's parameters as the original's raw files (the model's kind decides which).

    A dense model needs ``weights`` (the core, streamed) and ``head``; an mlp model only ``head``.
    """
    model = _path_flag("model", model)
    head = _path_flag("head", head)
    kind = model_kind(model)
    if kind == "mlp":
        if weights is not None:
            raise ConfigError(f"{model} is an mlp model: it has no core weights, so omit --weights")
        _distinct(model=model, head=head)
        check_output(head, overwrite=overwrite, flag="head")
        return _export_mlp(model, head, overwrite)
    if weights is None:
        if kind == "dense":
            raise ConfigError(f"--weights is required to export the dense model {model}")
        weights = ""  # let the model's own open say what is wrong with it first
    with ModelFile.open(model) as mf:
        weights = _path_flag("weights", weights)
        _distinct(model=model, weights=weights, head=head)
        check_output(weights, overwrite=overwrite, flag="weights")
        check_output(head, overwrite=overwrite, flag="head")
        return _export_dense(mf, weights, head, overwrite, progress)


def _export_mlp(model: str, head: str, overwrite: bool) -> dict:
    started = time.perf_counter()
    contents = read_mlp_file(model)
    try:
        size = sum(int(contents.params[key].nbytes) for key in layout.MLP_KEYS)
        with atomic_path(head, overwrite=overwrite, size=size) as tmp:
            _write_floats(tmp, [contents.params[key] for key in layout.MLP_KEYS])
    except OSError as exc:
        raise _os_error("write", head, exc) from exc
    return {"event": "export", "model": model, "kind": "mlp", "hidden": contents.params["w1"].shape[1],
            "head": head, "bytes": os.path.getsize(head), "seconds": time.perf_counter() - started}


def _export_dense(mf: ModelFile, weights: str, head: str, overwrite: bool, progress: bool) -> dict:
    # tqdm.auto is slow to import (bench/README.md, "deepnet.formats"); only a streamed copy needs it.
    from tqdm.auto import tqdm

    started = time.perf_counter()
    layers, row, chunk = mf.layers, mf.row_size, mf.storage_chunk_layers
    block = chunk * max(1, BLOCK_BYTES // (chunk * row * RAW_DTYPE.itemsize))
    buf = np.empty((min(block, layers), row), dtype=np.float32)
    try:
        # Both files are complete on disk before either is renamed into place; the space check of the
        # first counts both (they are usually on one file system).
        head_bytes = dense_head_bytes(mf.width, mf.input_dim, mf.n_classes)
        with atomic_path(weights, overwrite=overwrite, size=dense_weights_bytes(layers, mf.width) + head_bytes) as tmp, \
                atomic_path(head, overwrite=overwrite, size=head_bytes) as head_tmp:
            with open(tmp, "wb") as fh, tqdm(total=layers, desc=f"export {os.path.basename(weights)}",
                                             unit="layer", unit_scale=True, disable=not progress,
                                             leave=False) as bar:
                for start in range(0, layers, block):
                    stop = min(layers, start + block)
                    interrupts.check()
                    rows = mf.read_layers(start, stop, out=buf)
                    fh.write(memoryview(rows.astype(RAW_DTYPE, copy=False)).cast("B"))
                    bar.update(stop - start)
            heads = mf.read_heads()
            _write_floats(head_tmp, [heads[k] for k, _ in _dense_head_shapes(mf.width, mf.input_dim, mf.n_classes)])
    except OSError as exc:
        raise _os_error("write", weights, exc) from exc
    return {"event": "export", "model": mf.path, "kind": "dense", "layers": layers, "width": mf.width,
            "weights": weights, "head": head, "bytes": os.path.getsize(weights) + os.path.getsize(head),
            "seconds": time.perf_counter() - started}
