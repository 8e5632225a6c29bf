"""The files of a sharded model (docs/DESIGN.md, "Sharded models"), at the level of HDF5: the root's shard
table and virtual core, the checks a root passes when it is opened, and writing a shard file or a root.

No :class:`~deepnet.formats.model_file.ModelFile` here: :mod:`deepnet.formats.validate` calls
:func:`check_root` while it opens a root, and :mod:`deepnet.formats.shards` builds the commands on top.
"""

from __future__ import annotations

import os
import re
import secrets
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from deepnet.errors import DamagedFileError, ModelFileError
from deepnet.formats import h5io, layout
from deepnet.formats.atomic import writer_alive
from deepnet.formats.create import create_chunk_step, create_commit, create_core, create_heads, create_log
from deepnet.formats import evals as _evals
from deepnet.formats.commit import heads_crc32, new_record
from deepnet.formats.h5io import RNG_ATTR_QUANTUM, TIME_ATTR_LEN, open_h5, set_fixed_ascii_attr
from deepnet.formats.values import decode, is_int_attr, now, os_reason, rng_text

_VERSION_NAME = re.compile(f"^{layout.SHARD_FILE_PATTERN}$")
_TEMPORARY_OF_VERSION = re.compile(rf"^\.(?P<name>{layout.SHARD_FILE_PATTERN})\.tmp-(?P<pid>\d+)(?:-[0-9a-f]+)?$")
_CORE_GROUP = layout.CORE_WEIGHTS.rpartition("/")[0]


@dataclass(frozen=True)
class ShardSpec:
    """One shard of a root: its index, its layer range, its file (absolute), the step it holds and the
    CRC-32 of its core's bytes (little-endian float32, row by row) as the root records them."""

    index: int
    first_layer: int
    layers: int
    path: Path
    step: int = 0
    crc32: int = 0


def new_shard_set() -> str:
    """A fresh id tying a set of shard files to their root (8 hex digits)."""
    return secrets.token_hex(4)


def shard_dir(root: str | os.PathLike) -> Path:
    """The directory of a new root's shards: ``big.h5`` -> ``big.shards`` beside it."""
    root = Path(os.path.abspath(os.fspath(root)))
    return root.with_name(root.stem + layout.SHARD_DIR_SUFFIX)


def core_crc32(rows: np.ndarray, crc: int = 0) -> int:
    """CRC-32 of core rows' little-endian float32 bytes, continuing `crc`."""
    return zlib.crc32(memoryview(np.ascontiguousarray(rows, dtype="<f4")).cast("B"), crc)


def is_root_file(f: h5py.File) -> bool:
    """Whether an open file is the root of a sharded model (its core is a virtual dataset over shards)."""
    ds = f.get(layout.CORE_WEIGHTS)
    return isinstance(ds, h5py.Dataset) and ds.is_virtual


# ----------------------------------------------------------------------------------------------
# reading and checking a root


def read_specs(f: h5py.File, path: str, layers: int) -> list[ShardSpec]:
    """The shard table of the open root at `path`, checked: rows in layer order covering 0..layers."""
    table = f.get(layout.SHARDS)
    if not isinstance(table, h5py.Dataset):
        raise ModelFileError(f"{path}: its core is a virtual dataset but it has no /{layout.SHARDS} table")
    if table.dtype != layout.SHARD_DTYPE or table.ndim != 1 or table.shape[0] < 1:
        raise ModelFileError(f"{path}: dataset /{layout.SHARDS} has dtype {table.dtype} and shape {table.shape} "
                             f"but {layout.SHARD_DTYPE} with at least one row is required")
    base = Path(os.path.dirname(os.path.abspath(path)))
    specs, first = [], 0
    for i, row in enumerate(table[()]):
        name = decode(row["file"])
        if int(row["first_layer"]) != first or int(row["layers"]) < 1 or not name or os.path.isabs(name):
            raise DamagedFileError(f"{path}: row {i} of /{layout.SHARDS} ({name!r}, first layer "
                                   f"{int(row['first_layer'])}, {int(row['layers'])} layers) does not continue "
                                   f"the shards before it at layer {first}")
        specs.append(ShardSpec(i, first, int(row["layers"]), base / name, int(row["step"]), int(row["crc32"])))
        first += int(row["layers"])
    if first != layers:
        raise DamagedFileError(f"{path}: the shards of /{layout.SHARDS} hold {first} layers but the model has {layers}")
    return specs


def check_root(f: h5py.File, path: str, meta: Mapping[str, Any]) -> int:
    """Check the open root at `path` against its shard files (each present, of this set, at the root's
    step, of its layer range); returns the storage chunk layers of its core. Every problem is one line
    naming the shard file. The weights are not read (:func:`deepnet.formats.shards.open_root` and
    ``deepnet check`` verify their checksums)."""
    shard_set = f.attrs.get(layout.SHARD_SET_ATTR)
    chunk_layers = f.attrs.get(layout.SHARD_CHUNK_LAYERS_ATTR)
    if shard_set is None or chunk_layers is None or not is_int_attr(chunk_layers) or int(chunk_layers) < 1:
        raise ModelFileError(f"{path}: its core is a virtual dataset but it lacks the attributes "
                             f"{layout.SHARD_SET_ATTR} and {layout.SHARD_CHUNK_LAYERS_ATTR} of a sharded root")
    specs = read_specs(f, path, meta["layers"])
    sources = f[layout.CORE_WEIGHTS].virtual_sources()
    if len(sources) != len(specs):
        raise DamagedFileError(f"{path}: /{layout.CORE_WEIGHTS} maps {len(sources)} files but /{layout.SHARDS} "
                               f"lists {len(specs)} shards")
    for spec, src in zip(specs, sources):
        start, end = src.vspace.get_select_bounds()
        if (Path(os.path.dirname(os.path.abspath(path))) / src.file_name != spec.path
                or start[0] != spec.first_layer or end[0] + 1 != spec.first_layer + spec.layers):
            raise DamagedFileError(f"{path}: /{layout.CORE_WEIGHTS} maps {src.file_name} to layers "
                                   f"{start[0]}..{end[0]}, not shard {spec.index} of /{layout.SHARDS}")
    for spec in specs:
        check_shard_file(spec, path, meta, decode(shard_set), len(specs))
    return min(int(chunk_layers), meta["layers"])


def shard_label(spec: ShardSpec, root: str) -> str:
    """How a message names a shard: its index and its file, relative to the root's directory."""
    return f"shard {spec.index} ({os.path.relpath(spec.path, os.path.dirname(os.path.abspath(root)))})"


def check_shard_file(spec: ShardSpec, root: str, meta: Mapping[str, Any], shard_set: str, count: int) -> None:
    """A one-line ModelFileError unless the file of `spec` is shard `spec.index` of `count` of the set
    `shard_set`, at the recorded step and layer range, with the root's width."""
    what = f"{root}: {shard_label(spec, root)}"
    if not spec.path.is_file():
        raise DamagedFileError(f"{what} is missing")
    try:
        g = open_h5(os.fspath(spec.path), "r")
    except OSError as exc:
        raise DamagedFileError(f"{what} cannot be read: {os_reason(exc)}") from exc
    with g:
        attrs = g.attrs
        have = {name: attrs.get(name) for name in (layout.SHARD_SET_ATTR, layout.SHARD_INDEX_ATTR,
                                                   layout.SHARD_COUNT_ATTR, layout.SHARD_FIRST_LAYER_ATTR,
                                                   layout.SHARD_CRC_ATTR, "layers", "step", "width")}
        if any(value is None for value in have.values()):
            raise DamagedFileError(f"{what} is not a deepnet shard file (attributes missing)")
        if decode(have[layout.SHARD_SET_ATTR]) != shard_set:
            raise DamagedFileError(f"{what} belongs to another sharded model (set {decode(have[layout.SHARD_SET_ATTR])}, "
                                 f"the root's is {shard_set})")
        if int(have["step"]) != spec.step:
            raise DamagedFileError(f"{what} holds step {int(have['step'])} but the root records step {spec.step}")
        expected = {layout.SHARD_INDEX_ATTR: spec.index, layout.SHARD_COUNT_ATTR: count,
                    layout.SHARD_FIRST_LAYER_ATTR: spec.first_layer, "layers": spec.layers,
                    layout.SHARD_CRC_ATTR: spec.crc32, "width": meta["width"]}
        for name, want in expected.items():
            if int(have[name]) != want:
                raise DamagedFileError(f"{what} has {name} {int(have[name])} but the root records {want}")
        ds = g.get(layout.CORE_WEIGHTS)
        row_size = meta["width"] * meta["width"] + meta["width"]
        if not isinstance(ds, h5py.Dataset) or ds.shape != (spec.layers, row_size) or ds.dtype != np.dtype("<f4"):
            raise DamagedFileError(f"{what}: /{layout.CORE_WEIGHTS} is not float32 of shape {(spec.layers, row_size)}")


def shard_blocks(spec: ShardSpec, root: str, row_size: int, block_layers: int) -> Iterable[tuple[int, np.ndarray]]:
    """The rows of a shard's core as (first row in the shard, block), read from its file; after the last block,
    a one-line DamagedFileError if their CRC-32 is not the recorded one (so a consumer writing them must not
    keep what it wrote before the end)."""
    crc = 0
    try:
        g = open_h5(os.fspath(spec.path), "r")
    except OSError as exc:
        raise ModelFileError(f"{root}: {shard_label(spec, root)} cannot be read: {os_reason(exc)}") from exc
    with g:
        ds = g[layout.CORE_WEIGHTS]
        buf = np.empty((min(block_layers, spec.layers), row_size), np.float32)
        for start in range(0, spec.layers, block_layers):
            stop = min(spec.layers, start + block_layers)
            view = buf[: stop - start]
            ds.read_direct(view, source_sel=np.s_[start:stop])
            crc = core_crc32(view, crc)
            yield start, view
    if crc != spec.crc32:
        raise DamagedFileError(f"{root}: {shard_label(spec, root)} is damaged: the CRC-32 of its core is "
                               f"{crc:08x}, the root records {spec.crc32:08x}")


def referenced_names(specs: Iterable[ShardSpec]) -> set[Path]:
    return {spec.path for spec in specs}


def stray_versions(directory: Path, keep: set[Path], *, older_than: int | None = None) -> list[Path]:
    """Shard versions in `directory` not in `keep` (only those of steps below `older_than` if given), and
    temporaries of shard versions whose writer no longer runs."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    found = []
    for name in names:
        path = directory / name
        m = _VERSION_NAME.match(name)
        if m and path not in keep and (older_than is None or int(m.group("step")) < older_than):
            found.append(path)
            continue
        t = _TEMPORARY_OF_VERSION.match(name)
        if t and older_than is None and not writer_alive(int(t.group("pid"))):
            found.append(path)
    return found


# ----------------------------------------------------------------------------------------------
# writing


def copy_attrs(src: h5py.AttributeManager, dst: h5py.AttributeManager, skip: Iterable[str] = ()) -> None:
    """Copy every attribute of `src` to `dst` with its stored type, but those in `skip`."""
    skipped = set(skip)
    for name in src:
        if name not in skipped:
            dst.create(name, src[name], dtype=src.get_id(name).dtype)


def write_shard(tmp: str, *, attrs: h5py.AttributeManager, spec: ShardSpec, count: int, shard_set: str,
                root_name: str, rows: Callable[[int, int], np.ndarray], heads: Mapping[str, np.ndarray],
                chunk_layers: int) -> int:
    """Write the shard file of `spec` at `tmp`: a complete dense model of `spec.layers` layers at
    `spec.step` (the root's attributes `attrs`, its heads as copies, an empty log), its core from
    ``rows(start, stop)`` (rows of the shard). Returns the CRC-32 of the core, also stored in the file."""
    row_size = None
    crc = 0
    chunk_layers = min(chunk_layers, spec.layers)
    with open_h5(tmp, "w") as g:
        copy_attrs(attrs, g.attrs, skip=(*layout.ROOT_SHARD_ATTRS, "rng_state", "updated", "step", "layers"))
        stamp = now()
        g.attrs["layers"] = np.int64(spec.layers)
        g.attrs["step"] = np.int64(spec.step)
        set_fixed_ascii_attr(g, "rng_state", "", RNG_ATTR_QUANTUM)
        set_fixed_ascii_attr(g, "updated", stamp, TIME_ATTR_LEN)
        width = int(attrs["width"])
        row_size = width * width + width
        weights = create_core(g, spec.layers, row_size, chunk_layers)
        block = h5io.block_layers(chunk_layers, row_size)
        for start in range(0, spec.layers, block):
            part = np.ascontiguousarray(rows(start, min(spec.layers, start + block)), dtype=np.float32)
            h5io.write_block(weights, start, part)
            crc = core_crc32(part, crc)
        create_chunk_step(g, -(-spec.layers // chunk_layers), spec.step)
        create_heads(g, heads)
        create_log(g, np.empty(0, layout.LOG_DTYPE))
        _evals.create(g, _evals.empty())
        create_commit(g, new_record(step=spec.step, heads_crc=heads_crc32(heads, layout.HEAD_KEYS), updated=stamp))
        g.attrs[layout.SHARD_SET_ATTR] = shard_set
        g.attrs[layout.SHARD_INDEX_ATTR] = np.int64(spec.index)
        g.attrs[layout.SHARD_COUNT_ATTR] = np.int64(count)
        g.attrs[layout.SHARD_FIRST_LAYER_ATTR] = np.int64(spec.first_layer)
        g.attrs[layout.SHARD_CRC_ATTR] = np.int64(crc)
        g.attrs[layout.SHARD_ROOT_ATTR] = root_name
    return crc


def shard_table(specs: Iterable[ShardSpec], root: str | os.PathLike) -> np.ndarray:
    """The /shards rows of `specs`, file names relative to the root's directory."""
    base = os.path.dirname(os.path.abspath(os.fspath(root)))
    rows = [(os.path.relpath(spec.path, base).encode(), spec.first_layer, spec.layers, spec.step, spec.crc32)
            for spec in specs]
    return np.array(rows, dtype=layout.SHARD_DTYPE)


def create_virtual_core(f: h5py.File, specs: list[ShardSpec], root: str | os.PathLike, row_size: int) -> None:
    """/core/weights of a root: a virtual dataset over the shards' cores, by paths relative to the root's
    directory (HDF5 resolves them from there), NaN where a source cannot be read."""
    base = os.path.dirname(os.path.abspath(os.fspath(root)))
    total = sum(spec.layers for spec in specs)
    vlayout = h5py.VirtualLayout(shape=(total, row_size), dtype="<f4")
    for spec in specs:
        rel = os.path.relpath(spec.path, base)
        vlayout[spec.first_layer : spec.first_layer + spec.layers] = h5py.VirtualSource(
            rel, layout.CORE_WEIGHTS, shape=(spec.layers, row_size), dtype="<f4")
    f.require_group(_CORE_GROUP).create_virtual_dataset(layout.CORE_WEIGHTS.rpartition("/")[2], vlayout,
                                                        fillvalue=np.float32("nan"))


def copy_datasets(old: h5py.File, new: h5py.File, skip: Iterable[str]) -> None:
    """Copy every dataset of `old` to `new` but those in `skip` (and those `new` has), keeping groups'
    attributes, each dataset's storage layout, attributes and bytes."""
    skipped = set(skip)

    def visit(name: str, obj: Any) -> None:
        if name in skipped or name in new:
            return
        if isinstance(obj, h5py.Group):
            copy_attrs(obj.attrs, new.require_group(name).attrs)
            return
        parent = name.rpartition("/")[0]
        old.copy(obj, new.require_group(parent) if parent else new, name=name.rpartition("/")[2])

    old.visititems(visit)


def write_root(new: h5py.File, old: h5py.File, specs: list[ShardSpec], root: str | os.PathLike, *,
               shard_set: str, chunk_layers: int, state: Mapping[str, Any] | None = None,
               extra: Callable[[h5py.File], None] | None = None) -> None:
    """Fill `new` as the root of `specs`, from `old` (an ordinary model file, or the previous root).

    Without `state`, every attribute and every dataset but the core is copied as it is (sharding a file).
    With `state` (a commit: step, record, heads, log, evals) the root holds that state, /core/chunk_step
    all at its step; `extra` writes the optional parts, else they are copied from `old`.
    """
    copy_attrs(old.attrs, new.attrs, skip=layout.ROOT_SHARD_ATTRS)
    new.attrs[layout.SHARD_SET_ATTR] = shard_set
    new.attrs[layout.SHARD_CHUNK_LAYERS_ATTR] = np.int64(chunk_layers)
    width = int(old.attrs["width"])
    create_virtual_core(new, specs, root, width * width + width)
    new.create_dataset(layout.SHARDS, data=shard_table(specs, root))
    skip = {layout.CORE_WEIGHTS, layout.SHARDS}
    if state is not None:
        record = state["record"]
        new.attrs["step"] = np.int64(record["step"])
        set_fixed_ascii_attr(new, "rng_state", rng_text(record.get("rng_state")), RNG_ATTR_QUANTUM)
        set_fixed_ascii_attr(new, "updated", record["updated"], TIME_ATTR_LEN)
        layers = int(old.attrs["layers"])
        create_chunk_step(new, -(-layers // chunk_layers), record["step"])
        create_heads(new, state["heads"])
        create_log(new, state["log"])
        create_commit(new, record)
        _evals.create(new, state["evals"])
        skip.update({layout.CORE_CHUNK_STEP, layout.TRAIN_LOG, layout.TRAIN_COMMIT, layout.TRAIN_EVALS,
                     *layout.HEAD_PATHS.values()})
        if extra is not None:
            extra(new)
    copy_datasets(old, new, skip)


def write_gathered(new: h5py.File, root: h5py.File, specs: list[ShardSpec], root_path: str,
                   chunk_layers: int, progress: Callable[[int], None]) -> None:
    """Fill `new` as one ordinary model file holding the root `root`: its attributes but the shard ones,
    its core read from the shard files (checked against their CRC-32), every other dataset as it is."""
    copy_attrs(root.attrs, new.attrs, skip=layout.ROOT_SHARD_ATTRS)
    width = int(root.attrs["width"])
    row_size = width * width + width
    layers = int(root.attrs["layers"])
    weights = create_core(new, layers, row_size, min(chunk_layers, layers))
    block = h5io.block_layers(min(chunk_layers, layers), row_size)
    for spec in specs:
        for start, rows in shard_blocks(spec, root_path, row_size, block):
            h5io.write_block(weights, spec.first_layer + start, rows)
            progress(rows.shape[0])
    copy_datasets(root, new, {layout.CORE_WEIGHTS, layout.SHARDS})
