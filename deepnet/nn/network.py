"""A deep residual classifier: input head (NumPy) -> core (compiled kernels) -> output head (NumPy).

``DeepNet`` holds an open model file, the heads in RAM (their arithmetic: deepnet.nn.heads) and a
``CoreEngine`` over the core weights (deepnet.nn.engine; streamed from the file, or in RAM with
``in_memory``). ``train_step`` is one exact SGD step on given arrays; ``evaluate`` runs the forward
pass only; ``using_weights`` evaluates other weights (deepnet.training.ema's average) with the model.
Nothing here knows about MNIST. A model may also have a residual MLP branch on the input
(deepnet.nn.branch) whose logits are added to the output head's; it is stepped in the same exact step
from the same dlogits, at head_lr.

How a step reaches the file (see formats/hdf5.py for the commit record):

- streamed: the backward pass marks each storage chunk with the new step before updating it in the
  file; then ``train_step`` commits the step (heads, log row, generator state: raw writes into
  pre-allocated datasets). A file is therefore always a committed step or a detectable torn one.
- in memory: nothing is written by ``train_step``; ``save()`` (the trainer's checkpoints) replaces the
  whole file atomically, so the file on disk is always a complete, earlier step.

Numerical guard (deepnet.nn.finite): nothing non-finite is ever committed. A step whose loss, whose
gradient reaching the core, or whose new output head or branch is not finite is refused before anything
is modified ("step N refused: ...; nothing was written"). A gradient or a chunk's updated weights that
turn non-finite during the backward pass stop it before the next chunk is touched (through h5py, that
chunk is not written back; memory-mapped, it is already marked as the new step's), and non-finite new
input-head values stop the step before its commit ("step N failed: ..."): streamed, the file then
holds a torn step (or still the last step if no chunk was written), never a committed non-finite one;
in memory, the weights in RAM are unusable and ``save()`` refuses to write them, so the file keeps its
last checkpoint.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np

from deepnet import activations
from deepnet.errors import ConfigError, ModelFileError
from deepnet.formats.data_record import read_data_record
from deepnet.formats.hdf5 import FileState, ModelFile
from deepnet.kernels.loader import kernels_for
from deepnet.nn import branch as _branch
from deepnet.nn import heads as _heads
from deepnet.nn import memory
from deepnet.nn.batches import check_batch
from deepnet.nn.engine import CoreEngine
from deepnet.nn.finite import NonFiniteError, all_finite, assign, quiet
from deepnet.nn.losses import loss_and_gradient
from deepnet.nn.stores import InMemoryStore, WeightStore, file_store


class TornStepError(ModelFileError):
    """The model file holds a torn step; training continues from it only when told to (resume_torn)."""

    def __init__(self, message: str, state: FileState) -> None:
        super().__init__(message)
        self.state = state

DEFAULT_CHUNK_LAYERS = 100_000
DEFAULT_EVAL_BATCH = 1024


@dataclass(frozen=True)
class StepResult:
    """Figures of one training step, measured before the update (the loss the step descended);
    ``batch_acc`` is, for a mean-squared-error model, the rows whose argmax is the targets'."""

    step: int
    loss: float
    batch_acc: float
    seconds: float


@dataclass(frozen=True)
class EvalResult:
    """Mean loss and accuracy over a data set; for a mean-squared-error model the loss is the mean
    squared error over every output and ``accuracy`` the rows whose argmax is the targets'."""

    loss: float
    accuracy: float
    samples: int
    seconds: float


class DeepNet:
    """An open model. Use as a context manager, or call ``close()``.

    Streamed, every ``train_step`` is committed to the file as it ends; in memory, ``save()`` writes
    the model (atomically). ``save()`` is always safe to call and also appends the carried log rows.
    """

    def __init__(self, model_file: ModelFile, *, in_memory: bool = False,
                 chunk_layers: int = DEFAULT_CHUNK_LAYERS, resume_torn: bool = False) -> None:
        if chunk_layers < 1:
            raise ConfigError(f"--chunk-layers must be >= 1, got {chunk_layers}")
        self.file = model_file
        self.in_memory = in_memory
        #: The torn step accepted on opening (resume_torn), if any.
        self.accepted_torn: FileState | None = None
        # not registered: the error names the package the file says provided it, if it says
        activations.require(model_file.activation, used_by=model_file.path, package=model_file.activation_package)
        self.kernels = kernels_for(model_file.activation, width=model_file.width)
        #: The loss the model trains on, from its data record: "xent" (labels) or "mse" (target vectors).
        self.loss_kind: str = read_data_record(model_file.h5, model_file.path).loss
        torn = False
        if model_file.mode == "r+":
            state = model_file.state()
            if state.status == "torn":
                if not resume_torn:
                    raise TornStepError(
                        f"{model_file.path} holds a torn step {state.torn_step} ({state.layers_updated} of "
                        f"{model_file.layers} layers updated when its writer stopped); pass --resume-torn to "
                        f"train on from this mixed state as step {state.step} (`deepnet check` describes it)",
                        state)
                torn = True  # accepted below, once the rest of the file has loaded: check first, write after
            elif state.status == "damaged":
                raise ModelFileError(f"{model_file.path} is damaged: {state.message} (see `deepnet check`)")
        self.heads = model_file.read_heads()
        #: The residual MLP branch whose logits are added to the core's (deepnet.nn.branch), or None.
        self.branch = _branch.load(model_file)
        if torn:
            self.accepted_torn = model_file.accept_torn()
        #: Writers of the optional parts an in-memory save() puts in the new file (the branch, the weight
        #: average of deepnet.training.ema, held-out figures): each is called with the new h5py file.
        self.extra_writers: list[Callable[[h5py.File], None]] = [] if self.branch is None else [self.branch.write_new]
        if in_memory:
            memory.require(model_file.layers * model_file.row_size * 4,
                           f"--in-memory (the core of {model_file.path} in RAM)")
        store = InMemoryStore(model_file.read_core()) if in_memory else file_store(model_file)
        self.engine = self._engine_over(store, chunk_layers)
        self.step = model_file.step
        #: The minibatch generator state to store with the next commit (set by train_step's caller).
        self.rng_state: dict | None = model_file.rng_state
        #: The training settings stored with each commit (the trainer's layer_lr, head_lr, batch, ...).
        self.train_settings: dict | None = model_file.train_settings
        #: True while a streamed step is writing the file (its backward pass and commit).
        self.writing = False
        self._log_rows: list = []          # in memory: rows of the steps since the last save
        self._saved_step = self.step       # the step the file on disk holds
        self._unusable: str | None = None  # why the weights in RAM must not be saved
        self._borrowed: str | None = None  # set while computing with other weights (using_weights)

    @classmethod
    def open(cls, path: str | Path, *, writable: bool = False, in_memory: bool = False,
             chunk_layers: int = DEFAULT_CHUNK_LAYERS, expect: dict | None = None,
             resume_torn: bool = False) -> "DeepNet":
        """Open a model file for training (``writable``) or evaluation.

        A writable open refuses a file holding a torn step (:class:`TornStepError`) unless
        ``resume_torn``, which accepts the mixed state as the committed step (and records that it did).
        """
        model_file = ModelFile.open(path, "r+" if writable else "r", expect=expect)
        try:
            return cls(model_file, in_memory=in_memory, chunk_layers=chunk_layers, resume_torn=resume_torn)
        except BaseException:
            model_file.close()
            raise

    # -- the model's pieces -------------------------------------------------------------------------

    @property
    def width(self) -> int:
        """The core's width w."""
        return self.file.width

    @property
    def layers(self) -> int:
        """Core layers L."""
        return self.file.layers

    @property
    def input_dim(self) -> int:
        """Inputs per sample."""
        return self.file.input_dim

    @property
    def core_weights(self) -> np.ndarray | None:
        """The core's weights when they are in RAM, (layers, w*w + w) float32, updated in place by
        training; None when they are streamed from the file."""
        store = self.engine.store
        return store.weights if isinstance(store, InMemoryStore) else None

    def step_bytes(self, batch: int) -> int:
        """The bytes a training step at ``batch`` allocates beyond the weights held already: the minibatch
        and its indices, the batch-sized states and gradients of the heads and the core engine's buffers,
        the heads' new values, and the branch's gradients and new values and activations."""
        return memory.dense_step_bytes(width=self.width, input_dim=self.input_dim, n_classes=self.file.n_classes,
                                       hidden=None if self.branch is None else self.branch.hidden,
                                       batch=batch) + self.engine.buffer_bytes(batch)

    def check_step_memory(self, batch: int) -> None:
        """Refuse training at ``batch`` if one step would not fit in the memory available now."""
        memory.require(self.step_bytes(batch), f"a training step of {self.file.path} at batch {batch}")

    def _engine_over(self, store: WeightStore, chunk_layers: int, like: CoreEngine | None = None) -> CoreEngine:
        """A core engine over ``store``; ``like``: an engine whose thread settings it takes over."""
        engine = CoreEngine(store, self.kernels, self.file.width, self.file.alpha, chunk_layers,
                            None if like is None else like.threads)
        if like is not None:
            engine.fixed_threads = like.fixed_threads
            engine.interrupt_check = like.interrupt_check
        return engine

    # -- training and evaluation --------------------------------------------------------------------

    def train_step(self, x: np.ndarray, y: np.ndarray, *, layer_lr: float, head_lr: float,
                   rng_state: dict | None = None) -> StepResult:
        """One exact SGD step on the batch (x: (batch, input_dim) float32, y: integer labels, or for a
        mean-squared-error model (``loss_kind`` "mse") float target vectors (batch, n_classes)).

        ``rng_state`` is the minibatch generator's state after drawing this batch: it is committed with
        the step, so training resumes with the next batch. Raises :class:`NonFiniteError` (and changes
        nothing) if the loss or the gradient reaching the core is not finite.
        """
        if self.unusable:
            raise ModelFileError(f"cannot train {self.file.path} further: {self.unusable}")
        x, y = check_batch(x, y, input_dim=self.input_dim, n_classes=self.file.n_classes,
                           targets=self.loss_kind == "mse")
        with quiet():
            return self._step(x, y, layer_lr, head_lr, rng_state)

    def _step(self, x: np.ndarray, y: np.ndarray, layer_lr: float, head_lr: float,
              rng_state: dict | None) -> StepResult:
        started = time.perf_counter()
        step = self.step + 1
        h0 = _heads.input_head(self.heads, x)                      # (batch, w)
        state = np.ascontiguousarray(h0.T)                         # (w, batch): batch innermost
        self.engine.forward(state)
        h_last = state.T
        logits = _heads.output_head(self.heads, h_last)
        branch_pass = None if self.branch is None else self.branch.forward(x)
        if branch_pass is not None:
            logits = logits + branch_pass.logits                   # the branch's logits join the core's
        loss, accuracy, dlogits = loss_and_gradient(self.loss_kind, logits, y)

        out = _heads.output_gradients(self.heads, h_last, dlogits)
        if not math.isfinite(loss):
            raise self._refused(step, f"the loss is {loss}")
        if not out.finite():
            raise self._refused(step, "the gradient reaching the core is not finite")
        # What can be checked before the core is touched is: the output head's and the branch's new values.
        new_output = _heads.stepped_output(self.heads, out, head_lr)
        if not all_finite(new_output.values()):
            raise self._refused(step, "the updated output head is not finite")
        new_branch = None
        if branch_pass is not None:
            branch_grads = self.branch.gradients(branch_pass, dlogits)
            if not all_finite(branch_grads.values()):
                raise self._refused(step, "the gradient of the MLP branch is not finite")
            new_branch = self.branch.stepped(branch_grads, head_lr)      # the branch learns at the heads' rate
            if not all_finite(new_branch.values()):
                raise self._refused(step, "the updated MLP branch is not finite")

        self.writing = not self.in_memory
        try:
            try:
                g0 = self.engine.backward(out.core, layer_lr, step)
            except NonFiniteError as exc:
                raise NonFiniteError(self._broken(step, str(exc)), start=exc.start, stop=exc.stop) from None
            new_input = _heads.stepped_input(self.heads, x, h0, g0, head_lr)
            if not all_finite(new_input.values()):
                raise NonFiniteError(self._broken(step, "the updated input head is not finite"))
            # The heads change only now, so a refused step leaves them as they were.
            assign(self.heads, {**new_output, **new_input})
            if new_branch is not None:
                self.branch.assign(new_branch)
            if rng_state is not None:
                self.rng_state = rng_state
            if self.in_memory:
                self._log_rows.append((step, loss, accuracy, time.perf_counter() - started))
            else:
                seconds = time.perf_counter() - started
                if self.branch is not None:
                    self.branch.write_in_place(self.file)              # raw writes, before the record
                self.file.commit(step, self.heads, rng_state=self.rng_state, train=self.train_settings,
                                 log=[(step, loss, accuracy, seconds)])
                self._saved_step = step
            self.step = step
        except BaseException as exc:
            if self.step != step and not isinstance(exc, NonFiniteError):
                # Interrupted part-way (Ctrl-C twice, a write error): what is in RAM is not a step.
                self._unusable = f"step {step} was interrupted part-way; {self.file_holds()}"
            raise
        finally:
            self.writing = False
        return StepResult(step, loss, accuracy, time.perf_counter() - started)

    def _refused(self, step: int, why: str) -> NonFiniteError:
        error = NonFiniteError(f"step {step} refused: {why}; nothing was written ({self.file_holds()})")
        error.why = why
        return error

    def file_holds(self) -> str:
        """What the model file holds now, for a message: "<path> holds step N", or the state it is in."""
        if self.in_memory:
            return f"{self.file.path} holds step {self._saved_step}"
        state = self.file.state()
        return f"{self.file.path} holds step {state.step}" if state.healthy else \
            f"{self.file.path} now holds a {state.message}"

    def _broken(self, step: int, why: str) -> str:
        """The message of a step that went non-finite part-way, after the core was modified."""
        self._unusable = f"step {step} went non-finite part-way ({why})"
        if self.in_memory:
            return (f"step {step} failed: {why}; the weights in RAM are unusable and will not be saved "
                    f"({self.file.path} holds step {self._saved_step})")
        return f"step {step} failed: {why}; {self.file_holds()}"

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Forward only: logits (batch, n_classes) of x."""
        x, _ = check_batch(x, None, input_dim=self.input_dim, n_classes=self.file.n_classes,
                           targets=self.loss_kind == "mse")
        state = np.ascontiguousarray(_heads.input_head(self.heads, x).T)
        self.engine.forward(state, for_backward=False)
        logits = _heads.output_head(self.heads, state.T)
        return logits if self.branch is None else logits + self.branch.logits(x)

    def evaluate(self, x: np.ndarray, y: np.ndarray, *, batch: int = DEFAULT_EVAL_BATCH,
                 progress: Callable[[int], None] | None = None) -> EvalResult:
        """Mean loss and accuracy over (x, y), in batches of ``batch``; ``progress`` is called with each batch size.
        For a mean-squared-error model ``y`` holds target vectors, and the accuracy is the argmax agreement."""
        x, y = check_batch(x, y, input_dim=self.input_dim, n_classes=self.file.n_classes,
                           targets=self.loss_kind == "mse")
        if batch < 1:
            raise ConfigError(f"--batch must be >= 1, got {batch}")
        started = time.perf_counter()
        total_loss, correct = 0.0, 0.0
        for lo in range(0, x.shape[0], batch):
            logits = self.logits(x[lo:lo + batch])
            loss, accuracy, _ = loss_and_gradient(self.loss_kind, logits, y[lo:lo + batch])
            n = logits.shape[0]
            total_loss += loss * n
            correct += accuracy * n
            if progress is not None:
                progress(n)
        n = x.shape[0]
        return EvalResult(total_loss / n, correct / n, n, time.perf_counter() - started)

    # -- persistence --------------------------------------------------------------------------------

    def save(self, *, durable: bool = False) -> None:
        """Make the file hold the current step.

        In memory: the whole file is replaced atomically (written beside it, fsync'd, renamed over it).
        Streamed: the step is already committed; this appends the carried log rows and mirrors the step
        into the root attributes. With ``durable`` the file is also fsync'd (streamed mode's checkpoint).
        """
        if self.unusable:
            raise ModelFileError(f"not saving {self.file.path}: {self.unusable}")
        if self.in_memory:
            if self.step == self._saved_step and not self._log_rows and self.rng_state == self.file.rng_state \
                    and self.train_settings == self.file.train_settings:
                return
            self.file.rewrite(self.engine.store.weights, step=self.step, heads=self.heads,
                              rng_state=self.rng_state, log=self._log_rows, train=self.train_settings,
                              extra=self._write_extras if self.extra_writers else None)
            self._log_rows = []
            self._saved_step = self.step
            return
        if self.rng_state != self.file.rng_state or self.train_settings != self.file.train_settings:
            self.file.commit(self.step, self.heads, rng_state=self.rng_state, train=self.train_settings)
        self.file.sync(durable=durable)

    def _write_extras(self, h5: h5py.File) -> None:
        for write in self.extra_writers:
            write(h5)

    @property
    def saved_step(self) -> int:
        """The step the model file on disk holds."""
        return self._saved_step

    @property
    def unusable(self) -> str | None:
        """Why the weights in RAM must not be trained further or saved (None: they may)."""
        return self._unusable or self._borrowed

    # -- computing with other weights (deepnet.training.ema's average) ----------------------------------

    @contextmanager
    def using_weights(self, *, core: np.ndarray | None = None, heads: dict[str, np.ndarray] | None = None,
                      branch: dict[str, np.ndarray] | None = None) -> Iterator["DeepNet"]:
        """Inside the block, compute with these weights instead of the model's (each None: the model's):
        ``core`` as ``core_weights``, ``heads`` as ``heads``, ``branch`` as ``branch.params()``.

        The arrays are used as they are, not copied. For evaluation: inside, the net refuses to train
        or save. A streamed net holds the given core in RAM while inside.
        """
        if self._borrowed:
            raise ModelFileError(f"{self.file.path} is already computing with other weights")
        restore = self._install(core, heads, branch)
        self._borrowed = "it is computing with other weights than its own (using_weights)"
        try:
            yield self
        finally:
            self._borrowed = None
            restore()

    def replace_weights(self, *, core: np.ndarray | None = None, heads: dict[str, np.ndarray] | None = None,
                        branch: dict[str, np.ndarray] | None = None) -> None:
        """Compute with these weights from now on (as ``using_weights``, for good): for evaluating other
        weights with this model, which then refuses to train or save."""
        core = None if core is None else self._checked_core(core)
        new_engine = core is not None and not isinstance(self.engine.store, InMemoryStore)
        self._install(None if new_engine else core, heads, branch)
        if new_engine:
            old = self.engine
            self.engine = self._engine_over(InMemoryStore(core), old.chunk_layers, old)
            old.close()
        self._unusable = self._unusable or "it computes with other weights than its own (replace_weights)"

    def _checked_core(self, core: np.ndarray) -> np.ndarray:
        shape = (self.layers, self.file.row_size)
        if core.shape != shape or core.dtype != np.float32 or not core.flags.c_contiguous:
            raise ConfigError(f"core weights must be a C-contiguous float32 array of shape {shape}, "
                              f"got {core.dtype} {core.shape}")
        return core

    def _install(self, core: np.ndarray | None, heads: dict[str, np.ndarray] | None,
                 branch: dict[str, np.ndarray] | None) -> Callable[[], None]:
        """Put the given weights in place; returns the function that puts the replaced ones back (on an
        error, e.g. a shape that does not fit, nothing is replaced)."""
        if branch is not None and self.branch is None:
            raise ConfigError(f"{self.file.path} has no MLP branch to replace")
        if heads is not None and set(heads) != set(self.heads):
            raise ConfigError(f"heads must be {sorted(self.heads)}, got {sorted(heads)}")
        undo: list[Callable[[], None]] = []

        def restore() -> None:
            for step in reversed(undo):
                step()

        try:
            if branch is not None:
                live_branch = self.branch.params()
                self.branch.set_params(branch)
                undo.append(lambda: self.branch.set_params(live_branch))
            if heads is not None:
                live_heads = self.heads
                self.heads = heads
                undo.append(lambda: setattr(self, "heads", live_heads))
            if core is not None:
                core = self._checked_core(core)
                store = self.engine.store
                if isinstance(store, InMemoryStore):
                    live = store.weights
                    store.weights = core
                    undo.append(lambda: setattr(store, "weights", live))
                else:
                    engine = self.engine
                    self.engine = self._engine_over(InMemoryStore(core), engine.chunk_layers, engine)
                    undo.append(lambda: self._restore_engine(engine))
        except BaseException:
            restore()
            raise
        return restore

    def _restore_engine(self, engine: CoreEngine) -> None:
        borrowed, self.engine = self.engine, engine
        borrowed.close()

    def close(self) -> None:
        """Close the engine and the model file (nothing is saved: see ``save``)."""
        self.engine.close()
        self.file.close()

    def __enter__(self) -> "DeepNet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
