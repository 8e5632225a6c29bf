"""A model split along its depth across P processes (docs/DESIGN.md, "Sharded models"): a root file and
one immutable shard file per rank and step, committed in two phases.

Phase one: each rank writes its core for step T to a new shard version (:func:`write_core_version`).
Phase two: rank 0 rewrites the root atomically to point at the step-T versions with the heads, the
generator state, the settings and the log of step T (:func:`commit_root`); only then are the superseded
versions deleted. The root is the commit point: a crash anywhere leaves it pointing at complete versions,
and the versions it does not point at are removed by :func:`remove_stale_versions`.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from deepnet.errors import ConfigError, DamagedFileError, ModelFileError
from deepnet.formats import evals as _evals
from deepnet.formats import layout
from deepnet.formats.atomic import atomic_path, check_output, fsync_dir, remove_stale_temporaries, temporary_name
from deepnet.formats.commit import EVAL_ROWS, encode_slot, heads_crc32
from deepnet.formats.create import FILE_OVERHEAD_BYTES
from deepnet.formats.h5io import block_layers, open_h5
from deepnet.formats.mlp_file import model_kind
from deepnet.formats.model_file import ModelFile
from deepnet.formats.record import log_rows as _log_rows
from deepnet.formats.shard_files import (ShardSpec, check_shard_file, is_root_file, new_shard_set, read_specs,
                                         shard_blocks, shard_dir, shard_label, stray_versions, write_gathered,
                                         write_root, write_shard)
from deepnet.formats.validate import check_heads, head_shapes
from deepnet.formats.values import check_int, decode, now, os_reason

__all__ = ["ShardSpec", "ShardedModel", "commit_root", "create_sharded", "gather_model", "is_sharded", "open_root",
           "remove_stale_versions", "shard_model", "split_layers", "write_core_version"]

PathLike = str | os.PathLike


def split_layers(layers: int, ranks: int) -> list[tuple[int, int]]:
    """Contiguous (first layer, count) ranges of `layers` over `ranks`, counts differing by at most one
    (the first ranges take the extra layers)."""
    layers = check_int("layers", layers, minimum=1)
    ranks = check_int("ranks", ranks, minimum=1)
    if ranks > layers:
        raise ConfigError(f"ranks ({ranks}) must not exceed layers ({layers}): every rank holds at least one layer")
    base, extra = divmod(layers, ranks)
    out, first = [], 0
    for r in range(ranks):
        count = base + (1 if r < extra else 0)
        out.append((first, count))
        first += count
    return out


def is_sharded(path: PathLike) -> bool:
    """Whether `path` is the root file of a sharded model (False for anything else, unreadable included)."""
    try:
        if not os.path.isfile(path) or not h5py.is_hdf5(path):
            return False
        with open_h5(os.fspath(path), "r") as f:
            return is_root_file(f)
    except (OSError, ValueError):
        return False


class ShardedModel:
    """An open root, read-only: ``file`` (its :class:`ModelFile`: heads, generator state, settings, step,
    shape), ``shards`` (a :class:`ShardSpec` per rank) and :meth:`read_core` of one shard."""

    def __init__(self, file: ModelFile, shards: list[ShardSpec]) -> None:
        self.file = file
        self.shards = shards

    @property
    def path(self) -> str:
        return self.file.path

    @property
    def step(self) -> int:
        return self.file.step

    def read_core(self, index: int) -> np.ndarray:
        """The core of shard `index`, (its layers, w*w + w) float32, read from its file and checked against the
        step and CRC-32 the root records (a one-line ModelFileError naming the shard file otherwise)."""
        spec = self._spec(index)
        check_shard_file(spec, self.path, {"width": self.file.width}, _shard_set(self.file.h5), len(self.shards))
        out = np.empty((spec.layers, self.file.row_size), np.float32)
        block = block_layers(self.file.storage_chunk_layers, self.file.row_size)
        for start, rows in shard_blocks(spec, self.path, self.file.row_size, block):
            out[start : start + rows.shape[0]] = rows
        return out

    def _spec(self, index: int) -> ShardSpec:
        index = check_int("index", index, minimum=0)
        if index >= len(self.shards):
            raise ConfigError(f"shard index {index} is out of range: {self.path} has {len(self.shards)} shards")
        return self.shards[index]

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> "ShardedModel":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _shard_set(f: h5py.File) -> str:
    return decode(f.attrs[layout.SHARD_SET_ATTR])


def _specs_of(mf: ModelFile) -> list[ShardSpec]:
    """The shards of an open root (refusing an ordinary model file), their steps checked against its record."""
    if not is_root_file(mf.h5):
        raise ModelFileError(f"{mf.path} is not a sharded model (`deepnet shard` makes one)")
    specs = read_specs(mf.h5, mf.path, mf.layers)
    for spec in specs:
        if spec.step != mf.step:
            raise DamagedFileError(f"{mf.path}: /{layout.SHARDS} records step {spec.step} for {shard_label(spec, mf.path)} "
                                   f"but the root's commit record is at step {mf.step}")
    return specs


def open_root(path: PathLike) -> ShardedModel:
    """Open the root of a sharded model read-only (every shard file checked present, of its set and step)."""
    mf = ModelFile.open(path, "r")
    try:
        return ShardedModel(mf, _specs_of(mf))
    except BaseException:
        mf.close()
        raise


#: How often a rank re-opens a root that another rank's commit replaced while it was being opened.
REOPEN_ATTEMPTS = 3


def _open_root_beside_commits(path: str) -> ShardedModel:
    """open_root for a rank writing its next version while rank 0 may be committing an earlier step (Mach's
    sections do not wait for each other): a commit replaces the root by rename and then removes the versions
    the new root no longer names, so a root opened just before may name shard files that are gone by the
    time they are checked. Then the file at ``path`` is a new one (another inode): open that instead."""
    for _ in range(REOPEN_ATTEMPTS - 1):
        try:
            before = os.stat(path).st_ino
        except OSError:
            break   # open_root says what is wrong with the path
        try:
            return open_root(path)
        except ModelFileError:
            try:
                replaced = os.stat(path).st_ino != before
            except OSError:
                replaced = False
            if not replaced:
                raise
    return open_root(path)


# ----------------------------------------------------------------------------------------------
# the two-phase commit


def _shard_bytes(layers: int, width: int, input_dim: int, n_classes: int) -> int:
    heads = 4 * (input_dim * width + width + width * n_classes + n_classes)
    return 4 * layers * (width * width + width) + heads + FILE_OVERHEAD_BYTES


def write_core_version(root: PathLike, index: int, step: int, core: np.ndarray, *,
                       heads: Mapping[str, np.ndarray] | None = None) -> Path:
    """Phase one: write shard `index`'s core at `step` to a new version file beside the root's shards
    (complete, fsync'd, renamed into place) and return its path. P processes may call it at once for
    different indices. The version's heads are `heads`, else copies of the root's (the root's are the
    model's). Nothing refers to the version until :func:`commit_root` does."""
    root = os.fspath(root)
    with _open_root_beside_commits(root) as model:
        spec = model._spec(index)
        step = check_int("step", step, minimum=0)
        if step <= model.step:
            raise ConfigError(f"step {step} is not after the step {model.step} {root} holds: a version is a new step")
        core = np.asarray(core)
        shape = (spec.layers, model.file.row_size)
        if core.shape != shape or core.dtype != np.float32:
            raise ConfigError(f"the core of shard {spec.index} must be float32 of shape {shape}, got {core.dtype} {core.shape}")
        mf = model.file
        arrays = mf.read_heads() if heads is None else check_heads(
            heads, head_shapes(mf.width, mf.input_dim, mf.n_classes), root)
        shard_set = _shard_set(mf.h5)
        target = spec.path.parent / layout.shard_file_name(spec.index, len(model.shards), step, shard_set)
        version = ShardSpec(spec.index, spec.first_layer, spec.layers, target, step)
        try:
            with atomic_path(target, overwrite=True, size=_shard_bytes(spec.layers, mf.width, mf.input_dim,
                                                                       mf.n_classes)) as tmp:
                write_shard(tmp, attrs=mf.h5.attrs, spec=version, count=len(model.shards), shard_set=shard_set,
                            root_name=os.path.basename(root), rows=lambda a, b: core[a:b], heads=arrays,
                            chunk_layers=mf.storage_chunk_layers)
        except OSError as exc:
            raise ModelFileError(f"could not write {target}: {os_reason(exc)}") from exc
    return target


def _log_array(rows: Any) -> np.ndarray:
    if rows is None:
        return np.empty(0, layout.LOG_DTYPE)
    if isinstance(rows, np.ndarray) and rows.dtype.names == layout.LOG_DTYPE.names:
        return rows.astype(layout.LOG_DTYPE).reshape(-1)
    try:
        return _log_rows([list(r) for r in rows])
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"log_rows must be rows of (step, loss, batch_acc, seconds): {exc}") from None


def _eval_array(rows: Any) -> np.ndarray:
    if rows is None:
        return _evals.empty()
    if isinstance(rows, np.ndarray) and rows.dtype.names == layout.EVAL_DTYPE.names:
        return rows.astype(layout.EVAL_DTYPE).reshape(-1)
    return _evals.evaluation_rows(rows)


def _committed_versions(root: str, versions: list[Path], specs: list[ShardSpec], shard_set: str, step: int,
                        width: int) -> list[ShardSpec]:
    """The shard versions of `step` as the new root records them (their CRC-32 from their files), each checked."""
    if not isinstance(versions, (list, tuple)) or len(versions) != len(specs):
        raise ConfigError(f"versions must list one file per shard ({len(specs)}), got "
                          f"{len(versions) if isinstance(versions, (list, tuple)) else type(versions).__name__}")
    out = []
    for spec, version in zip(specs, versions):
        path = Path(os.path.abspath(os.fspath(version)))
        if path.parent != spec.path.parent:
            raise ConfigError(f"version {path} of shard {spec.index} is not in the root's shard directory {spec.path.parent}")
        try:
            with open_h5(os.fspath(path), "r") as g:
                crc = int(g.attrs[layout.SHARD_CRC_ATTR])
        except (OSError, KeyError) as exc:
            raise ModelFileError(f"{root}: shard version {path} cannot be read: {os_reason(exc)}") from exc
        new = ShardSpec(spec.index, spec.first_layer, spec.layers, path, step, crc)
        check_shard_file(new, root, {"width": width}, shard_set, len(specs))
        out.append(new)
    return out


def commit_root(root: PathLike, *, step: int, versions: list[Path], heads: Mapping[str, np.ndarray],
                rng_state: Mapping | None, train_settings: Mapping | None, log_rows: Any,
                evaluations: Any = None, extra: Callable[[h5py.File], None] | None = None) -> None:
    """Phase two (rank 0, once every rank's :func:`write_core_version` of `step` returned): rewrite the root
    atomically to hold `step`, pointing at `versions` (one per shard, in order), with `heads`, `rng_state`,
    `train_settings`, the log rows of the steps since the last commit (appended to the root's log) and
    `evaluations` (appended); then delete the versions it superseded. `extra` writes the optional parts
    (branch, weight average) as of `step`; without it they are carried over from the old root."""
    root = os.fspath(root)
    step = check_int("step", step, minimum=0)
    if rng_state is not None and not isinstance(rng_state, Mapping):
        raise ConfigError(f"rng_state must be a dict (a bit_generator.state) or None, got {type(rng_state).__name__}")
    if train_settings is not None and not isinstance(train_settings, Mapping):
        raise ConfigError(f"train_settings must be a dict or None, got {type(train_settings).__name__}")
    new_rows, new_evals = _log_array(log_rows), _eval_array(evaluations)
    with open_root(root) as model:
        mf = model.file
        if step <= mf.step:
            raise ConfigError(f"cannot commit step {step} to {root}: it holds step {mf.step} already")
        arrays = check_heads(heads, head_shapes(mf.width, mf.input_dim, mf.n_classes), root)
        shard_set = _shard_set(mf.h5)
        specs = _committed_versions(root, versions, model.shards, shard_set, step, mf.width)
        rows = np.concatenate([mf.read_log(), new_rows])
        evals = np.concatenate([mf.read_evaluations(), new_evals])
        record = dict(mf.record)
        record.update(step=step, heads_crc32=heads_crc32(arrays, layout.HEAD_KEYS), log_rows=int(rows.shape[0]),
                      pending_log=[], rng_state=None if rng_state is None else dict(rng_state),
                      train=None if train_settings is None else dict(train_settings), updated=now())
        record[EVAL_ROWS] = int(evals.shape[0])
        record["seq"] = int(record["seq"]) + 1
        encode_slot(record, root)  # refuses a record that is not JSON or would not fit a slot
        state = {"record": record, "heads": arrays, "log": rows, "evals": evals}
        size = os.path.getsize(root) + int(rows.nbytes) + int(evals.nbytes)
        try:
            # The ranks may hold the old root open for reading: it is replaced by rename, not locked.
            with atomic_path(root, overwrite=True, size=size, lock=False) as tmp:
                with open_h5(tmp, "w") as new:
                    write_root(new, mf.h5, specs, root, shard_set=shard_set, chunk_layers=mf.storage_chunk_layers,
                               state=state, extra=extra)
        except OSError as exc:
            raise ModelFileError(f"could not commit step {step} to {root}: {os_reason(exc)} "
                                 f"(it still holds step {mf.step})") from exc
    _remove(stray_versions(specs[0].path.parent, {s.path for s in specs}, older_than=step))


def _remove(paths: Iterable[Path]) -> list[Path]:
    removed = []
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
            removed.append(path)
    if removed:
        fsync_dir(removed[0].parent)
    return removed


def remove_stale_versions(root: PathLike) -> list[Path]:
    """Remove the shard versions the root does not point at (written for a step whose commit never came) and
    dead writers' temporaries; returns what was removed. Call it when opening the model for writing."""
    root = os.fspath(root)
    with open_root(root) as model:
        keep = {spec.path for spec in model.shards}
        directories = {spec.path.parent for spec in model.shards}
    removed = [Path(p) for p in remove_stale_temporaries(root)]
    for directory in sorted(directories):
        removed += _remove(stray_versions(directory, keep))
    return removed


def stray_of(mf: ModelFile) -> list[Path]:
    """The shard versions and dead temporaries beside an open root that it does not point at."""
    specs = read_specs(mf.h5, mf.path, mf.layers)
    keep = {spec.path for spec in specs}
    return [p for d in sorted({s.path.parent for s in specs}) for p in stray_versions(d, keep)]


# ----------------------------------------------------------------------------------------------
# making and joining shards


def _bar(total: int, desc: str, progress: bool) -> Any:
    # tqdm.auto is slow to import (bench/README.md, "deepnet.formats"); only these copies need it.
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="layer", unit_scale=True, disable=not progress, leave=False)


def _default_out(src: str) -> str:
    stem, ext = os.path.splitext(src)
    return f"{stem}.sharded{ext or '.h5'}"


def _check_out_name(out: str) -> None:
    if "%" in os.path.basename(out):
        raise ConfigError(f"{out}: a sharded model's file name must not contain '%' (HDF5 reads it as a pattern)")


def _same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def shard_model(src: PathLike, ranks: int, out: PathLike | None = None, *, overwrite: bool = False,
                progress: bool = False) -> dict:
    """Split the ordinary dense model file `src` into a root at `out` (default ``SRC.sharded.h5``) and one
    shard file per rank in ``OUT.shards/``; `src` is left as it is. Every dataset and attribute of `src`
    but the core is kept in the root as it is; the core is in the shards."""
    started = time.perf_counter()
    src = os.fspath(src)
    if os.path.isfile(src) and model_kind(src) == layout.KIND_MLP:
        raise ConfigError(f"{src} is an MLP model; only a dense model's core can be sharded")
    with ModelFile.open(src, "r") as mf:
        if is_root_file(mf.h5):
            raise ConfigError(f"{src} is sharded already (`deepnet gather` joins it into one file)")
        if layout.SHARD_SET_ATTR in mf.h5.attrs:
            raise ConfigError(f"{src} is a shard file of a sharded model; shard its root's gathered file instead")
        ranges = split_layers(mf.layers, ranks)
        state = mf.state()
        if not state.healthy:
            raise ModelFileError(f"{src} does not hold a committed step ({state.message}); see `deepnet check {src}`")
        out = _default_out(src) if out is None else os.fspath(out)
        _check_out_name(out)
        if _same_file(out, src):
            raise ConfigError(f"the root {out} must not be the model {src} itself")
        check_output(out, overwrite=overwrite)
        directory = shard_dir(out)
        if directory.exists() and not directory.is_dir():
            raise ModelFileError(f"cannot write the shards of {out}: {directory} exists and is not a directory")
        shard_set = new_shard_set()
        step = mf.step
        specs = [ShardSpec(i, first, count, directory / layout.shard_file_name(i, len(ranges), step, shard_set), step)
                 for i, (first, count) in enumerate(ranges)]
        written: list[Path] = []
        heads = mf.read_heads()
        try:
            directory.mkdir(exist_ok=True)
            with _bar(mf.layers, f"shard {os.path.basename(src)}", progress) as bar:
                for i, spec in enumerate(specs):
                    def rows(a: int, b: int, first: int = spec.first_layer) -> np.ndarray:
                        bar.update(b - a)
                        return mf.read_layers(first + a, first + b)

                    with atomic_path(spec.path, overwrite=True,
                                     size=_shard_bytes(spec.layers, mf.width, mf.input_dim, mf.n_classes)) as tmp:
                        crc = write_shard(tmp, attrs=mf.h5.attrs, spec=spec, count=len(specs), shard_set=shard_set,
                                          root_name=os.path.basename(out), rows=rows, heads=heads,
                                          chunk_layers=mf.storage_chunk_layers)
                    written.append(spec.path)
                    specs[i] = ShardSpec(spec.index, spec.first_layer, spec.layers, spec.path, step, crc)
            fsync_dir(directory)
            with atomic_path(out, overwrite=overwrite, size=os.path.getsize(src)) as tmp:
                with open_h5(tmp, "w") as new:
                    write_root(new, mf.h5, specs, out, shard_set=shard_set, chunk_layers=mf.storage_chunk_layers)
        except BaseException as exc:
            _remove(written)
            if isinstance(exc, OSError):
                raise ModelFileError(f"could not write the sharded model {out}: {os_reason(exc)}") from exc
            raise
        layers, width = mf.layers, mf.width
    # The versions of a root this one replaced (with --overwrite) are stray now.
    _remove(stray_versions(directory, {s.path for s in specs}))
    return {"event": "shard", "model": src, "root": out, "ranks": len(specs), "step": step, "layers": layers,
            "width": width, "shards": _describe(specs, out),
            "bytes": os.path.getsize(out) + sum(os.path.getsize(s.path) for s in specs),
            "seconds": time.perf_counter() - started}


def _describe(specs: list[ShardSpec], root: str) -> list[dict]:
    base = os.path.dirname(os.path.abspath(root))
    return [{"index": s.index, "file": os.path.relpath(s.path, base), "first_layer": s.first_layer,
             "layers": s.layers} for s in specs]


def gather_model(root: PathLike, out: PathLike, *, overwrite: bool = False, progress: bool = False) -> dict:
    """Join the sharded model at `root` into one ordinary model file at `out` (the root and its shards are
    left as they are): the core read from the shard files and checked against their CRC-32, every other
    dataset and attribute of the root but the shard table and the shard attributes kept as it is."""
    started = time.perf_counter()
    root = os.fspath(root)
    if out is None:
        raise ConfigError("the output file is required (-o OUT)")
    out = os.fspath(out)
    with open_root(root) as model:
        mf = model.file
        if _same_file(out, root) or any(_same_file(out, os.fspath(s.path)) for s in model.shards):
            raise ConfigError(f"the output {out} must not be the root {root} or one of its shards")
        check_output(out, overwrite=overwrite)
        size = _shard_bytes(mf.layers, mf.width, mf.input_dim, mf.n_classes) + os.path.getsize(root)
        try:
            with _bar(mf.layers, f"gather {os.path.basename(root)}", progress) as bar, \
                    atomic_path(out, overwrite=overwrite, size=size) as tmp:
                with open_h5(tmp, "w") as new:
                    write_gathered(new, mf.h5, model.shards, root, mf.storage_chunk_layers, bar.update)
        except OSError as exc:
            raise ModelFileError(f"could not write {out}: {os_reason(exc)}") from exc
        result = {"event": "gather", "root": root, "model": out, "ranks": len(model.shards), "step": mf.step,
                  "layers": mf.layers, "width": mf.width}
    return {**result, "bytes": os.path.getsize(out), "seconds": time.perf_counter() - started}


def create_sharded(root: PathLike, ranks: int, *, layers: int, width: int, activation: str,
                   alpha: float | None = None, seed: int = 0, input_dim: int = 784, n_classes: int = 10,
                   extra: Callable[[h5py.File], None] | None = None, overwrite: bool = False,
                   progress: bool = False) -> None:
    """A new sharded model at `root` over `ranks` shards, its weights exactly those :meth:`ModelFile.create`
    draws for the same arguments (it is made as an ordinary file under a temporary name, then sharded);
    `extra` writes optional root attributes (the data record)."""
    root = os.fspath(root)
    split_layers(check_int("layers", layers, minimum=1), ranks)
    _check_out_name(root)
    check_output(root, overwrite=overwrite)
    tmp = temporary_name(root)
    try:
        ModelFile.create(tmp, layers=layers, width=width, activation=activation, alpha=alpha, seed=seed,
                         input_dim=input_dim, n_classes=n_classes, extra=extra, progress=progress).close()
        shard_model(tmp, ranks, root, overwrite=overwrite, progress=progress)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def shard_count(mf: ModelFile) -> int:
    """How many shards an open model file has (0: an ordinary file)."""
    return len(read_specs(mf.h5, mf.path, mf.layers)) if is_root_file(mf.h5) else 0


def shard_summary(mf: ModelFile) -> dict:
    """What `deepnet info` adds for a root: its shards (count, files, layer ranges, bytes); {} otherwise."""
    if not is_root_file(mf.h5):
        return {}
    specs = read_specs(mf.h5, mf.path, mf.layers)
    base = os.path.dirname(os.path.abspath(mf.path))
    files = {f"shard {s.index}": f"layers {s.first_layer}..{s.first_layer + s.layers - 1} in "
                                 f"{os.path.relpath(s.path, base)}" for s in specs}
    return {"shards": {"count": len(specs), **files, "bytes": sum(os.path.getsize(s.path) for s in specs)}}


def verify_shards(mf: ModelFile) -> tuple[list[str], list[str]]:
    """`deepnet check` of a root: (findings, problems): each shard's core against its CRC-32, its step
    against the root's, and the stray versions beside it."""
    findings: list[str] = []
    problems: list[str] = []
    try:
        specs = _specs_of(mf)
    except ModelFileError as exc:
        return findings, [str(exc).removeprefix(f"{mf.path}: ")]
    block = block_layers(mf.storage_chunk_layers, mf.row_size)
    for spec in specs:
        try:
            for _ in shard_blocks(spec, mf.path, mf.row_size, block):
                pass
        except ModelFileError as exc:
            problems.append(str(exc).removeprefix(f"{mf.path}: "))
    if not problems:
        findings.append(f"shards: {len(specs)}, all at step {mf.step}, every core matching its CRC-32")
    stray = stray_of(mf)
    if stray:
        findings.append(f"note: {len(stray)} stray uncommitted shard version(s) the root does not point at "
                        f"({', '.join(p.name for p in stray[:3])}{', ...' if len(stray) > 3 else ''}); "
                        f"removed when the model is next opened for training")
    return findings, problems

