"""The MNIST recipe, top to bottom: create or open a model, draw minibatches, step, report, save.

Every hyperparameter default lives in ``RECIPE`` below; the CLI and the API read them from there.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from deepnet import activations
from deepnet.nn import branch as _branch
from deepnet.training import ema as _ema
from deepnet.data.mnist import ensure_mnist
from deepnet.nn.engine import NonFiniteError
from deepnet.errors import ConfigError, DeepnetError, ModelFileError
from deepnet.flags import int_at_least, non_negative_number, positive
from deepnet.formats.hdf5 import ModelFile, remove_stale_temporaries
from deepnet.formats.idx import load_mnist
from deepnet.nn.network import DEFAULT_CHUNK_LAYERS, DEFAULT_EVAL_BATCH, DeepNet, EvalResult
from deepnet.report import Table, format_rate, format_seconds, print_fields, print_json
from deepnet.training.options import RunOptions, final_fields


@dataclass(frozen=True)
class Recipe:
    """The defaults of a training run (the original experiment's, tuned where noted in the README)."""

    layers: int = 1_000_000
    width: int = 4
    activation: str = "softsign"
    batch: int = 16
    steps: int = 1000
    layer_lr: float = 0.05
    head_lr: float = 0.05
    chunk_layers: int = DEFAULT_CHUNK_LAYERS
    seed: int = 0
    train_limit: int = 60_000
    report_every: int = 100
    eval_samples: int = 1000
    #: In memory, the model file is replaced (atomically) this often unless --checkpoint-every is given.
    checkpoint_seconds: float = 600.0


RECIPE = Recipe()


def mnist_inputs(images: np.ndarray) -> np.ndarray:
    """Pixels (n, 28, 28) uint8 -> (n, 784) float32 in [0, 1] (x = pixels / 255)."""
    return images.reshape(images.shape[0], -1).astype(np.float32) / np.float32(255.0)


def load_training_set(data_dir: str | Path | None, train_limit: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_mnist(ensure_mnist(data_dir), "train")
    if not 1 <= train_limit <= images.shape[0]:
        raise ConfigError(f"--train-limit must be in 1..{images.shape[0]}, got {train_limit}")
    return mnist_inputs(images[:train_limit]), labels[:train_limit]


def load_test_set(data_dir: str | Path | None, samples: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = load_mnist(ensure_mnist(data_dir), "test")
    if not 1 <= samples <= images.shape[0]:
        raise ConfigError(f"--samples must be in 1..{images.shape[0]}, got {samples}")
    return mnist_inputs(images[:samples]), labels[:samples]


def _training_rng(net: DeepNet) -> np.random.Generator:
    """The minibatch generator: continued from the committed state, else seeded from the model's seed."""
    rng = np.random.default_rng([net.file.seed, 1])
    if net.rng_state is not None:
        try:
            rng.bit_generator.state = net.rng_state
        except (TypeError, ValueError, KeyError) as exc:
            raise ModelFileError(f"{net.file.path}: the stored minibatch generator state is unusable ({exc})") from None
    return rng


class Interrupted(KeyboardInterrupt):
    """Training stopped on Ctrl-C (or SIGTERM); the message says what the model file holds."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = int(signum)


GRACE_SECONDS = 1.0  # after a run stops on a signal, further signals within this time are ignored


def _ignoring_for(seconds: float, handler: Any) -> Callable[[int, Any], None]:
    """A signal handler that ignores signals for `seconds`, then passes them on to `handler`."""
    until = time.monotonic() + seconds

    def handle(signum: int, frame: Any) -> None:
        if time.monotonic() < until:
            return
        if callable(handler):
            handler(signum, frame)
        elif handler == signal.SIG_DFL:  # the default: die of the signal as if no handler were installed
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)

    return handle


class _StopSignal:
    """Ctrl-C (SIGINT) and SIGTERM while training: the first finishes the current step, saves and stops;
    the second abandons the step, unless the step is being written into a streamed file (abandoning it
    there would leave a torn step), which takes a third."""

    def __init__(self) -> None:
        self.net: DeepNet | None = None
        self.write: Callable[[str], None] = print
        self.count = 0
        self.signum = signal.SIGINT
        #: Set once the run is abandoned: closing the file must not be interrupted.
        self.done = False
        self._after: str | None = None
        self._previous: dict = {}
        #: A KeyboardInterrupt the handler raised that landed where Python cannot raise it (a __del__ or
        #: weakref callback, which only print "Exception ignored"): re-raised at the next check().
        self.pending = False
        self._unraisable = None

    def arm(self, net: DeepNet, write: Callable[[str], None]) -> None:
        """From now on a signal finishes the current step instead of stopping at once."""
        self.net, self.write = net, write
        net.engine.interrupt_check = self.check

    def check(self) -> None:
        """Raise the interrupt a signal asked for if it was swallowed (called between chunks)."""
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

    def disarm(self, message: str) -> None:
        """The model is saved: a signal now stops at once (the final evaluation), saying `message`."""
        if self.net is not None:
            self.net.engine.interrupt_check = None
        self.net, self._after, self.pending = None, message, False

    def __enter__(self) -> "_StopSignal":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
            self._unraisable, sys.unraisablehook = sys.unraisablehook, self._swallowed
        return self

    def __exit__(self, *exc) -> None:
        stopped = self.count > 0 or self.done
        for signum, handler in self._previous.items():
            # Presses that were meant for this run can still be arriving as it stops (three quick
            # Ctrl-Cs); they must not hit the caller's handler in the middle of reporting the stop.
            signal.signal(signum, _ignoring_for(GRACE_SECONDS, handler) if stopped else handler)
        if self._unraisable is not None:
            sys.unraisablehook = self._unraisable
        if self.net is not None:
            self.net.engine.interrupt_check = None
            self.net = None

    def _swallowed(self, unraisable) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            self.pending = True  # ours, raised inside a finaliser: raise it again where it can land
        else:
            self._unraisable(unraisable)

    def _handle(self, signum, frame) -> None:
        if self.done:
            return
        self.signum = signum
        if self.net is None:  # not training yet, or saved already: nothing to finish
            if self._after:
                self.done = True
                raise Interrupted(self._after, signum)
            raise KeyboardInterrupt
        self.count += 1
        if self.count == 1:
            self.write("deepnet: finishing the current step, then saving and stopping (press Ctrl-C again to "
                       "abandon the step)")
        elif self.count == 2 and self.net.writing:
            self.write(f"deepnet: step {self.net.step + 1} is being written into {self.net.file.path}; abandoning it "
                       f"now would leave a torn step, so it is finishing (Ctrl-C once more to abandon it anyway)")
        else:
            # From the abandoning signal on, further signals are ignored: one arriving while this
            # KeyboardInterrupt is being handled would otherwise escape the handler that reports it.
            self.done = True
            raise KeyboardInterrupt


class _Checkpoints:
    """When to make the model file durable: every N steps, else every RECIPE.checkpoint_seconds."""

    def __init__(self, every: int | None) -> None:
        self.every = every
        self.last = time.monotonic()

    def due(self, steps_done: int) -> bool:
        if self.every is not None:
            return steps_done % self.every == 0
        return time.monotonic() - self.last >= RECIPE.checkpoint_seconds

    def done(self) -> None:
        self.last = time.monotonic()


def train(
    model: str | Path,
    *,
    steps: int = RECIPE.steps,
    layers: int | None = None,
    width: int | None = None,
    activation: str | None = None,
    alpha: float | None = None,
    seed: int = RECIPE.seed,
    batch: int | None = None,
    layer_lr: float | None = None,
    head_lr: float | None = None,
    chunk_layers: int = RECIPE.chunk_layers,
    train_limit: int | None = None,
    report_every: int = RECIPE.report_every,
    eval_samples: int = RECIPE.eval_samples,
    in_memory: bool = False,
    checkpoint_every: int | None = None,
    resume_torn: bool = False,
    holdout: int | None = None,
    eval_every: int | None = None,
    schedule: str | None = None,
    warmup: int | None = None,
    final_lr_ratio: float | None = None,
    decay_steps: int | None = None,
    ema: float | None = None,
    ema_every: int | None = None,
    branch: str | None = None,
    hidden: int | None = None,
    data_dir: str | Path | None = None,
    json: bool = False,
    progress: bool = True,
) -> dict:
    """Train a model file on MNIST for ``steps`` steps, creating it first if it does not exist.

    An existing model continues from its committed step with its minibatch generator; ``batch``,
    ``layer_lr``, ``head_lr`` and ``train_limit`` default to the values it was last trained with (else
    the RECIPE's), and ``layers``, ``width``, ``activation`` and ``alpha``, if given, must agree with it.
    Streamed, every step is committed to the file; in memory, the file is replaced atomically every
    ``checkpoint_every`` steps (default: every RECIPE.checkpoint_seconds), on Ctrl-C and at the end.
    A file holding a torn step is refused unless ``resume_torn``. Returns the final figures as a dict.

    Options (deepnet.training.options): ``holdout``/``eval_every`` measure the accuracy on the last N training
    images (kept out of the minibatches) every K steps; ``schedule`` (constant, cosine, linear),
    ``warmup``, ``final_lr_ratio`` and ``decay_steps`` shape both learning rates (deepnet.training.schedule: stored
    with the model, continued when resuming unless one of them is given); ``ema``/``ema_every`` keep an
    average of the weights (deepnet.training.ema, in memory only); ``branch="mlp"``/``hidden`` give a new model
    the MLP branch (deepnet.nn.branch).
    """
    for name, value in (("steps", steps), ("chunk-layers", chunk_layers), ("report-every", report_every)):
        positive(name, value)
    for name, value in (("batch", batch), ("train-limit", train_limit), ("checkpoint-every", checkpoint_every),
                        ("layers", layers), ("width", width)):
        if value is not None:
            positive(name, value)
    for name, value in (("layer-lr", layer_lr), ("head-lr", head_lr)):
        if value is not None:
            non_negative_number(name, value)
    int_at_least("eval-samples", eval_samples, 0)
    if alpha is not None:
        positive("alpha", alpha, float)
    if activation is not None:
        activations.get(activation)
    options = RunOptions(holdout=holdout, eval_every=eval_every, schedule=schedule, warmup=warmup,
                         final_lr_ratio=final_lr_ratio, decay_steps=decay_steps, ema=ema, ema_every=ema_every,
                         branch=branch, hidden=hidden, in_memory=in_memory)
    images, labels = load_mnist(ensure_mnist(data_dir), "train")
    if train_limit is not None:
        _check_train_limit(train_limit, images.shape[0])
    test = load_test_set(data_dir, eval_samples) if eval_samples else None

    path = Path(model)
    if not path.exists():
        options.check_new_model(RECIPE.layers if layers is None else layers, RECIPE.width if width is None else width)
        init(path, **options.new_model_branch(), layers=RECIPE.layers if layers is None else layers, width=RECIPE.width if width is None else width,
             activation=RECIPE.activation if activation is None else activation, alpha=alpha, seed=seed,
             progress=progress and not json)
    expect = {k: v for k, v in (("layers", layers), ("width", width), ("activation", activation)) if v is not None}

    stop = _StopSignal()
    with stop, DeepNet.open(path, writable=True, in_memory=in_memory, chunk_layers=chunk_layers, expect=expect,
                            resume_torn=resume_torn) as net:
        if alpha is not None and not math.isclose(alpha, net.file.alpha, rel_tol=1e-6):
            raise ConfigError(f"{path} has alpha {net.file.alpha:g} but --alpha {alpha:g} was given")
        settings = _settings(net.train_settings, batch=batch, layer_lr=layer_lr, head_lr=head_lr,
                             train_limit=train_limit)
        options.prepare(net, settings, train_limit=train_limit, default_train_limit=RECIPE.train_limit,
                        images=images, labels=labels, first_step=net.step, steps=steps)
        _check_train_limit(settings["train_limit"], images.shape[0])
        batch, train_limit = settings["batch"], settings["train_limit"]
        layer_lr, head_lr = settings["layer_lr"], settings["head_lr"]
        net.train_settings = settings
        remove_stale_temporaries(path)
        x_train, y_train = mnist_inputs(images[:train_limit]), labels[:train_limit]
        rng = _training_rng(net)
        first_step = net.step
        log = _StepLog(net, report_every, json, total=steps, heldout=options.heldout is not None, batch=batch)
        bar = tqdm(total=steps, desc="train", unit="step", disable=json or not progress, leave=False,
                   dynamic_ncols=True)
        say = (lambda line: bar.write(line, file=sys.stderr)) if not bar.disable else \
            (lambda line: print(line, file=sys.stderr, flush=True))
        log.write = bar.write if not bar.disable else log.write
        if net.accepted_torn is not None:
            torn = net.accepted_torn
            say(f"deepnet: --resume-torn: continuing from step {torn.step}, with {torn.layers_updated} of "
                f"{net.layers} layers{' and the heads' if torn.heads_changed else ''} as updated by the "
                f"interrupted step {torn.torn_step}")
        checkpoints = _Checkpoints(checkpoint_every)
        started = time.perf_counter()
        stop.arm(net, say)
        done = 0
        saving = False
        try:
            try:
                while done < steps and not stop.count:
                    idx = rng.integers(0, train_limit, size=batch)
                    result = net.train_step(x_train[idx], y_train[idx], **options.lrs(net.step),
                                            rng_state=rng.bit_generator.state)
                    done += 1
                    bar.update(1)
                    log.add(result, options.after_step(net))
                    if done < steps and checkpoints.due(done):
                        saving = True
                        net.save(durable=True)
                        saving = False
                        checkpoints.done()
                log.flush()
                saving = True
                net.save(durable=True)
                saving = False
                stop.disarm(f"stopped after step {net.step}, which {path} holds; the final evaluation was skipped")
            except NonFiniteError as exc:
                stop.done = True
                raise _after_non_finite(net, exc) from None
            except KeyboardInterrupt:
                stop.done = True
                what = f"saving step {net.step}" if saving else f"step {net.step + 1}"
                raise Interrupted(f"abandoned {what}; {_holds(net)}", stop.signum) from None
        finally:
            bar.close()
        if done < steps:
            raise Interrupted(f"stopped after step {net.step}; {path} holds step {net.saved_step} "
                              f"(run the same command to continue)", stop.signum)
        elapsed = time.perf_counter() - started

        final = {
            "event": "final",
            "model": str(path),
            "steps": net.step - first_step,
            "step": net.step,
            "loss": log.last_loss,
            "batch_acc": log.last_acc,
            "seconds": elapsed,
            "seconds_per_step": elapsed / steps,
            "layer_samples_per_s": net.layers * batch * steps / elapsed,
        }
        if test is not None:
            result = net.evaluate(*test)
            final.update(test_loss=result.loss, test_acc=result.accuracy, test_samples=result.samples)
        options.finish(net, test, final)
    if json:
        print_json(final)
    else:
        _print_final(final)
    return final


def _settings(stored: dict | None, **given) -> dict:
    """This run's training settings: as given, else as the model was last trained, else the RECIPE's."""
    stored = stored or {}
    out = {}
    for key, value in given.items():
        if value is None:
            value = stored.get(key, getattr(RECIPE, key))
        out[key] = value
    return out


def _check_train_limit(train_limit: int, available: int) -> None:
    if not 1 <= train_limit <= available:
        raise ConfigError(f"--train-limit must be in 1..{available}, got {train_limit}")


def _holds(net: DeepNet) -> str:
    """What the model file holds now, for a message."""
    try:
        return net._file_holds()
    except Exception:  # the file itself failed: say nothing rather than something wrong
        return f"see `deepnet check {net.file.path}`"


def _after_non_finite(net: DeepNet, exc: NonFiniteError) -> NonFiniteError:
    """A refused step: in memory, the steps since the last checkpoint are good, so save them first."""
    if net.in_memory and not net._unusable and net.step != net.saved_step:
        try:
            net.save(durable=True)
        except DeepnetError:
            return exc
        why = getattr(exc, "why", None)
        if why:
            return NonFiniteError(f"step {net.step + 1} refused: {why}; saved the last good step, "
                                  f"{net.step}, to {net.file.path}", start=exc.start, stop=exc.stop)
    return exc  # streamed: every good step is committed already, and the refused one wrote nothing


class _StepLog:
    """Prints a report every ``report_every`` steps and after each held-out measurement (streamed: also
    appends the carried log rows and mirrors the step into the file's attributes, see DeepNet.save).

    ETA: the steps left of ``total`` times the mean wall-clock time per step so far (held-out
    evaluations included)."""

    def __init__(self, net: DeepNet, report_every: int, json: bool, total: int | None = None,
                 heldout: bool = False, batch: int | None = None) -> None:
        self.net = net
        self.report_every = report_every
        self.json = json
        self.window: list = []
        self.write: Callable[[str], None] = print
        self.show_heldout = heldout
        columns = [("step", 9), ("loss", 8), ("batch_acc", 9)] + ([("heldout_acc", 11)] if heldout else []) \
            + [("s/step", 8), ("layer-samples/s", 15), ("ETA", 8)]
        self.table = Table(columns, write=lambda line: self.write(line))
        self.last_loss = float("nan")
        self.last_acc = float("nan")
        self.total = total
        self.done = 0
        self.started = time.perf_counter()
        self._heldout: float | None = None
        self.batch = batch

    def eta(self) -> float:
        """Seconds left, from the mean wall-clock time per step so far (NaN without a total)."""
        if self.total is None or not self.done:
            return float("nan")
        return (self.total - self.done) * (time.perf_counter() - self.started) / self.done

    def add(self, result, heldout: float | None = None) -> None:
        """One step's result, and the held-out accuracy measured after it (None if not measured)."""
        self.window.append(result)
        self.done += 1
        if heldout is not None:
            self._heldout = heldout
        if self.done % self.report_every == 0 or heldout is not None:
            self.report()
            if not self.net.in_memory:
                self.net.save()

    def report(self) -> None:
        if not self.window:
            return
        n = len(self.window)
        loss = sum(r.loss for r in self.window) / n
        acc = sum(r.batch_acc for r in self.window) / n
        seconds = sum(r.seconds for r in self.window) / n
        rate = self.net.layers * self._batch() / seconds
        step = self.window[-1].step
        self.last_loss, self.last_acc = loss, acc
        eta = self.eta()
        if self.json:
            report = {"event": "report", "step": step, "loss": loss, "batch_acc": acc,
                      "seconds_per_step": seconds, "layer_samples_per_s": rate, "eta_seconds": eta}
            if self._heldout is not None:
                report["heldout_acc"] = self._heldout
            print_json(report)
        else:
            held = [f"{self._heldout:.4f}" if self._heldout is not None else ""] if self.show_heldout else []
            self.table.row(step, f"{loss:.4f}", f"{acc:.3f}", *held, f"{seconds:.4f}", format_rate(rate),
                           f"{eta:.1f}s" if eta < 10 else format_seconds(eta))
        self._heldout = None
        self.window = []

    def _batch(self) -> int:
        # The training batch as given: the engine's own is the evaluation batch after a held-out measurement.
        return self.batch or self.net.engine._work_batch

    def flush(self) -> None:
        """Report what is left of the window."""
        self.report()


def _print_final(final: dict) -> None:
    fields = {
        "model": final["model"],
        "steps": f"{final['steps']} (now at step {final['step']})",
        "loss": f"{final['loss']:.4f} (mean of the last report window)",
        "batch_acc": f"{final['batch_acc']:.3f}",
        "time": f"{format_seconds(final['seconds'])} ({final['seconds_per_step']:.4f} s/step)",
        "layer-samples/s": format_rate(final["layer_samples_per_s"]),
    }
    if "test_acc" in final:
        fields["test"] = f"loss {final['test_loss']:.4f}, accuracy {final['test_acc']:.4f} on {final['test_samples']} images"
    fields.update(final_fields(final))
    print_fields(fields)


def init(
    model: str | Path,
    *,
    layers: int = RECIPE.layers,
    width: int = RECIPE.width,
    activation: str = RECIPE.activation,
    alpha: float | None = None,
    seed: int = RECIPE.seed,
    input_dim: int = 784,
    n_classes: int = 10,
    overwrite: bool = False,
    progress: bool = True,
    branch: str | None = None,
    hidden: int | None = None,
) -> ModelFile:
    """Create a new model file (core weights uniform in [-0.001, 0.001], Xavier heads); returns it closed.

    ``branch="mlp", hidden=H`` adds the residual MLP branch (deepnet.nn.branch), drawn from its own stream.
    """
    positive("layers", layers)
    positive("width", width)
    activations.get(activation)
    if alpha is not None:
        positive("alpha", alpha, float)
    branch, hidden = _branch.check_options(branch, hidden)
    extra = None
    if branch is not None:
        extra = _branch.MLPBranch.new(hidden, input_dim=input_dim, n_classes=n_classes, seed=seed).write_new
    model_file = ModelFile.create(model, layers=layers, width=width, activation=activation, alpha=alpha,
                                  seed=seed, input_dim=input_dim, n_classes=n_classes, overwrite=overwrite,
                                  progress=progress, extra=extra)
    model_file.close()
    return model_file


def evaluate(
    model: str | Path,
    *,
    samples: int = 10_000,
    batch: int = DEFAULT_EVAL_BATCH,
    chunk_layers: int = RECIPE.chunk_layers,
    in_memory: bool = False,
    use_ema: bool = False,
    data_dir: str | Path | None = None,
    json: bool = False,
    progress: bool = True,
) -> dict:
    """Evaluate a model file on the first ``samples`` MNIST test images; returns loss, accuracy, time.

    ``use_ema`` evaluates the weight average stored in the file (deepnet.training.ema) instead of the weights,
    reading the averaged core into RAM; it is an error if the file has none.
    """
    positive("samples", samples)
    positive("batch", batch)
    positive("chunk-layers", chunk_layers)
    x, y = load_test_set(data_dir, samples)
    with DeepNet.open(model, in_memory=in_memory, chunk_layers=chunk_layers) as net:
        state = net.file.state()
        if not state.healthy:
            print(f"deepnet: warning: {model} is not a committed step: {state.message} (see `deepnet check`)",
                  file=sys.stderr)
        average = _ema.use_average(net) if use_ema else None
        with tqdm(total=samples, desc="eval", unit="img", disable=json or not progress, delay=2.0,
                  leave=False, dynamic_ncols=True) as bar:
            result: EvalResult = net.evaluate(x, y, batch=batch, progress=bar.update)
        figures = {"event": "eval", "model": str(model), "step": net.step, **asdict(result),
                   "samples_per_s": result.samples / result.seconds}
        if average is not None:
            figures.update(ema=True, ema_decay=average["decay"], ema_every=average["every"], ema_step=average["step"])
    if json:
        print_json(figures)
    else:
        print_fields({
            "model": figures["model"],
            "step": figures["step"],
            "loss": f"{result.loss:.4f}",
            "accuracy": f"{result.accuracy:.4f} ({int(round(result.accuracy * result.samples))}/{result.samples})",
            "time": f"{format_seconds(result.seconds)} ({figures['samples_per_s']:.1f} images/s)",
            **({"weights": f"the average (EMA {average['decay']:g}) taken at step {average['step']}"}
               if average is not None else {}),
        })
    return figures
