"""The best held-out accuracy of a dense run: ``--keep-best`` (the model as it was then, in
``<model stem>.best.h5``) and ``--patience K`` (stop after K held-out evaluations without improvement).

Whenever held-out evaluation is on, the best accuracy, its step and the evaluations since it are kept
in the training settings (``best_heldout``: {"acc", "step", "since"}), committed with the steps, so a
resumed run compares against the true best of the model's history; they start afresh when the held-out
split changes. The best file is replaced only on a strict improvement, atomically
(deepnet.formats.atomic): in memory, written from RAM; streamed, copied from the model file once the
step and its settings are committed. It is a normal model file (``deepnet eval model.best.h5``). A
later ``--keep-best`` run writes it only when it beats the best already measured, so that it always
holds the model of ``best_heldout_step``.

A run given ``--patience K`` whose stored count has reached K already takes no step (its plan is over).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from deepnet.errors import ConfigError
from deepnet.flags import int_at_least
from deepnet.formats.atomic import atomic_path
from deepnet.formats.hdf5 import ModelFile
from deepnet.nn.network import DeepNet
from deepnet.training.loop import Hook, StepEvent

#: The training settings' key of the best held-out figures.
KEY = "best_heldout"


def best_path(model: str | os.PathLike) -> Path:
    """Where --keep-best writes: beside the model, its stem + ``.best`` (model.h5 -> model.best.h5)."""
    path = Path(model)
    return path.with_name(f"{path.stem}.best{path.suffix or '.h5'}")


def check_options(keep_best: bool, patience: int | None) -> None:
    """Refuse bad values of --keep-best and --patience (before anything is read or written)."""
    if not isinstance(keep_best, bool):
        raise ConfigError(f"--keep-best is a switch (true or false), got {keep_best!r}")
    if patience is not None:
        int_at_least("patience", patience, 1)


def require_heldout(keep_best: bool, patience: int | None, holdout: int) -> None:
    """--keep-best and --patience judge by the held-out accuracy: refuse them without it."""
    if (keep_best or patience is not None) and not holdout:
        flag = "--keep-best" if keep_best else "--patience"
        raise ConfigError(f"{flag} judges by the held-out accuracy: give --holdout N --eval-every K too")


def stored_best(stored: dict | None, holdout: int) -> dict | None:
    """The stored best figures if they are of this held-out split (None: start afresh)."""
    stored = stored or {}
    best = stored.get(KEY)
    if not holdout or not isinstance(best, dict) or stored.get("holdout") != holdout:
        return None
    try:
        return {"acc": float(best["acc"]), "step": int(best["step"]), "since": int(best["since"])}
    except (KeyError, TypeError, ValueError):
        return None


class Best(Hook):
    """Tracks the best held-out accuracy after each measurement, stores it in the net's training settings,
    writes the best file (``keep``) and asks the run to stop when ``patience`` evaluations in a row did
    not improve on it. Placed after the hook that measures and the one that commits the step's report."""

    def __init__(self, net: DeepNet, best: dict | None, *, keep: bool, patience: int | None) -> None:
        self.net, self.keep, self.patience = net, keep, patience
        self.best = best
        self.path = best_path(net.file.path) if keep else None
        self.written = False          # whether this run wrote the best file
        #: Set by the trainer: the run ended before its planned end because the patience ran out.
        self.stopped_early = False

    @property
    def exhausted(self) -> bool:
        """Whether the stored count has reached --patience already."""
        return self.patience is not None and self.best is not None and self.best["since"] >= self.patience

    def after_step(self, event: StepEvent) -> None:
        if event.heldout is None:
            return
        step, acc = int(self.net.step), float(event.heldout)
        improved = self.best is None or acc > self.best["acc"]
        self.best = {"acc": acc, "step": step, "since": 0} if improved else {**self.best, "since": self.best["since"] + 1}
        self.net.train_settings = {**(self.net.train_settings or {}), KEY: dict(self.best)}
        if not self.net.in_memory:
            self.net.save()  # commits the settings with the step, before the file is copied
        if improved and self.keep:
            self.write()
        if self.exhausted:
            event.stop = True

    def write(self) -> None:
        """Replace the best file with the model as it is now (atomically)."""
        net = self.net
        if net.in_memory:
            write_from_ram(net, self.path)
        else:
            source = net.file.path
            with atomic_path(self.path, size=os.path.getsize(source)) as tmp:
                shutil.copyfile(source, tmp)
        self.written = True

    def figures(self) -> dict:
        """The final result's entries."""
        best = self.best or {}
        model = self.path if self.path is not None and (self.written or self._file_holds_best()) else None
        return {"best_heldout_acc": best.get("acc"), "best_heldout_step": best.get("step"),
                "best_model": None if model is None else str(model), "stopped_early": self.stopped_early}

    def _file_holds_best(self) -> bool:
        """Whether an existing best file (from an earlier run) holds the best step."""
        if self.best is None or self.path is None or not self.path.exists():
            return False
        try:
            with ModelFile.open(self.path) as f:
                return f.step == self.best["step"]
        except Exception:  # an unreadable file is not the best model
            return False


def write_from_ram(net: DeepNet, path: Path) -> None:
    """Write the in-memory ``net`` as a model file at ``path`` (atomically): its core, heads, optional
    parts, step, minibatch generator state and training settings; no training log."""
    f = net.file
    core = net.engine.store.weights
    size = int(core.nbytes) + (os.path.getsize(f.path) if os.path.exists(f.path) else 0) // 4

    def extras(h5: object) -> None:
        for write in net.extra_writers:
            write(h5)

    with atomic_path(path, size=size) as tmp:
        new = ModelFile.create(tmp, layers=f.layers, width=f.width, activation=f.activation, input_dim=f.input_dim,
                               n_classes=f.n_classes, alpha=f.alpha, seed=f.seed, init_scale=f.init_scale,
                               storage_chunk_layers=f.storage_chunk_layers, overwrite=True, progress=False,
                               core_weights=core, extra=extras if net.extra_writers else None)
        try:
            new.commit(net.step, net.heads, rng_state=net.rng_state, train=net.train_settings)
            new.sync()
        finally:
            new.close()
