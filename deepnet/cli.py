"""The ``deepnet`` command: a thin fire layer over the Python API (``deepnet.train`` and friends).

Each method's docstring is its ``--help``. User errors (``DeepnetError``) print one line and exit 2;
``--debug`` anywhere on the command line shows the traceback instead.
"""

from __future__ import annotations

import inspect
import signal
import sys

import fire

from deepnet import activations as _activations
from deepnet.nn import mlp as _mlp
from deepnet.training.mlp import MLP_RECIPE
from deepnet.training import recipe as _recipe
from deepnet.training import speedrun as _speedrun
from deepnet.errors import ConfigError, DeepnetError
from deepnet.report import format_rate, print_fields, print_json

R = _recipe.RECIPE
_SR = _speedrun.SPEEDRUN
_MLP = MLP_RECIPE


class DeepnetCLI:
    """Exact SGD through absurdly deep, narrow residual networks on MNIST.

    Commands: init, train (alias train-dense), eval (alias eval-dense), speedrun, info, check, data, activations,
    bench, train-mlp, eval-mlp, import-raw, export-raw, plot.
    `deepnet COMMAND --help` describes a command's flags:
    init: --model --layers --width --activation --alpha --seed --input-dim --branch --hidden --overwrite;
    train, train-dense: --model --steps --layers --width --activation --alpha --seed --batch --layer-lr
    --head-lr --chunk-layers --train-limit --report-every --eval-samples --in-memory --checkpoint-every
    --resume-torn --holdout --eval-every --schedule --warmup --final-lr-ratio --decay-steps --ema --ema-every
    --branch --hidden --data-dir --json; check: --model --json;
    eval, eval-dense: --model --samples --batch --chunk-layers --in-memory --use-ema --data-dir --json;
    speedrun: --target-acc --layers --width --activation --batch --layer-lr --head-lr --schedule --warmup
    --final-lr-ratio --eval-every --eval-gate --holdout --max-steps --seed --in-memory --chunk-layers
    --test-samples --report-every --model --workdir --data-dir --json;
    info: --model --json; data: --dest; activations [list | check NAME | compile [NAME]]: --json;
    bench: --layers --width --activation --batch --steps --streamed --chunk-layers --eval-images
    --eval-batch --workdir --threads --json;
    train-mlp: --model --hidden --steps --batch --lr --schedule --seed --train-limit --report-every --samples
    --threads --data-dir --json; eval-mlp: --model --samples --batch --data-dir --json;
    import-raw: --model --head --weights --kind --layers --width --activation --alpha --hidden --seed
    --overwrite --json; export-raw: --model --head --weights --overwrite --json;
    plot: --model --out --smooth --width --height --json.
    Add --debug to any command to see a traceback on error.
    """

    def init(self, model: str, layers: int = R.layers, width: int = R.width, activation: str = R.activation,
             alpha: float = None, seed: int = R.seed, input_dim: int = 784, branch: str = None, hidden: int = None,
             overwrite: bool = False) -> None:
        """Create a model file with freshly initialised weights.

        Args:
            model: path of the HDF5 model file to create.
            layers: number of residual core layers L.
            width: units per core layer w.
            activation: core activation (see `deepnet activations`).
            alpha: residual scale; default 1/sqrt(layers).
            seed: seed of the weight initialisation and of the minibatch generator.
            input_dim: input features (784 for MNIST).
            branch: "mlp" adds a residual MLP branch (input -> hidden ReLU -> logits added to the core's).
            hidden: the branch's hidden units (with --branch mlp).
            overwrite: replace an existing file.
        """
        _recipe.init(model, layers=layers, width=width, activation=activation, alpha=alpha, seed=seed,
                    input_dim=input_dim, overwrite=overwrite, branch=branch, hidden=hidden)
        extra = f", with an MLP branch of {hidden} hidden units" if branch else ""
        print(f"created {model}: {layers} layers x width {width}, {activation}{extra}")

    def train(self, model: str = "model.h5", steps: int = R.steps, layers: int = None, width: int = None,
              activation: str = None, alpha: float = None, seed: int = R.seed, batch: int = None,
              layer_lr: float = None, head_lr: float = None, chunk_layers: int = R.chunk_layers,
              train_limit: int = None, report_every: int = R.report_every,
              eval_samples: int = R.eval_samples, in_memory: bool = False, checkpoint_every: int = None,
              resume_torn: bool = False, holdout: int = None, eval_every: int = None, schedule: str = None,
              warmup: int = None, final_lr_ratio: float = None, decay_steps: int = None, ema: float = None,
              ema_every: int = None, branch: str = None, hidden: int = None, data_dir: str = None,
              json: bool = False) -> None:
        """Train a model on MNIST with exact SGD, creating the model file if it does not exist.

        An existing model continues from its committed step, exactly as if never interrupted; --layers,
        --width and --activation must then agree with the file, and --batch, --layer-lr, --head-lr and
        --train-limit default to the values it was trained with. Streamed, every step is committed to
        the file; in memory, the file is replaced atomically at checkpoints and at the end. Ctrl-C
        finishes the current step, saves and stops (exit status 130); pressed again, it abandons the step.
        The table shows step, loss, batch accuracy, held-out accuracy (when measured), s/step,
        layer-samples/s and the ETA; every step's figures go to /train/log (`deepnet plot` draws them).

        Learning-rate schedules (--schedule --warmup --final-lr-ratio --decay-steps) apply to both rates and
        are stored with the model: a run given none of these flags continues the stored schedule exactly; a
        run given any of them starts a new schedule at the model's current step.

        Args:
            model: HDF5 model file (created if missing).
            steps: SGD steps to run now.
            layers: core layers L for a new model (default 1000000).
            width: core width w for a new model (default 4).
            activation: core activation for a new model (default softsign).
            alpha: residual scale for a new model; default 1/sqrt(layers).
            seed: seed of a new model's weights and minibatches.
            batch: minibatch size (default 16, or the model's last).
            layer_lr: SGD learning rate of the core layers (default 0.05, or the model's last).
            head_lr: SGD learning rate of the input and output heads (default 0.05, or the model's last).
            chunk_layers: layers per kernel call and per read from the file (does not change results).
            train_limit: draw minibatches from the first N training images (default 60000, or the model's last).
            report_every: print a report every N steps (figures are means over those steps).
            eval_samples: test images evaluated at the end (0 to skip).
            in_memory: hold the core weights in RAM instead of streaming them from the file.
            checkpoint_every: write the model file every N steps (in memory: an atomic replacement; streamed:
                an fsync); default every 10 minutes of training, and always at the end and on Ctrl-C.
            resume_torn: train on from a file holding a torn step (a writer killed mid-step), accepting its
                mixed state as the last committed step; without it such a file is refused.
            holdout: set the last N training images aside (never trained on) and measure the accuracy on
                them every --eval-every steps (default: the model's last, else none; 0: none).
            eval_every: steps between held-out evaluations (with --holdout).
            schedule: learning-rate schedule: constant, cosine or linear (decay after the warmup).
            warmup: steps of linear warmup at the start of the schedule.
            final_lr_ratio: the fraction of the base rates a cosine/linear decay ends at (default 0).
            decay_steps: the global step where the decay ends (default: the end of this run).
            ema: keep an exponential moving average of the weights with this decay, e.g. 0.999 (needs
                --in-memory: a second copy of the core in RAM); the end reports both test accuracies.
            ema_every: Lookahead-style: every K steps move the average towards the weights (by 1 - ema) and
                write it back into them, instead of averaging after every step.
            branch: "mlp" gives a NEW model a residual MLP branch whose logits are added to the core's.
            hidden: the branch's hidden units (with --branch mlp).
            data_dir: MNIST directory; default $DEEPNET_DATA, else a per-user cache (fetched if empty).
            json: print JSON lines (one per report and a final object) instead of a table.
        """
        _mlp.require_kind(model, "dense", "train")
        _recipe.train(model, steps=steps, layers=layers, width=width, activation=activation, alpha=alpha,
                     seed=seed, batch=batch, layer_lr=layer_lr, head_lr=head_lr, chunk_layers=chunk_layers,
                     train_limit=train_limit, report_every=report_every, eval_samples=eval_samples,
                     in_memory=in_memory, checkpoint_every=checkpoint_every, resume_torn=resume_torn,
                     holdout=holdout, eval_every=eval_every, schedule=schedule, warmup=warmup,
                     final_lr_ratio=final_lr_ratio, decay_steps=decay_steps, ema=ema, ema_every=ema_every,
                     branch=branch, hidden=hidden, data_dir=data_dir, json=json)

    def eval(self, model: str = "model.h5", samples: int = 10_000, batch: int = 1024,
             chunk_layers: int = R.chunk_layers, in_memory: bool = False, use_ema: bool = False,
             data_dir: str = None, json: bool = False) -> None:
        """Evaluate a model on the MNIST test set: loss, accuracy, elapsed time.

        Args:
            model: HDF5 model file.
            samples: evaluate the first N test images.
            batch: images per forward pass.
            chunk_layers: layers per kernel call and per read from the file.
            in_memory: load the core weights into RAM first.
            use_ema: evaluate the weight average stored by training with --ema (read into RAM).
            data_dir: MNIST directory; default $DEEPNET_DATA, else a per-user cache (fetched if empty).
            json: print one JSON object instead of text.
        """
        _mlp.require_kind(model, "dense", "eval")
        _recipe.evaluate(model, samples=samples, batch=batch, chunk_layers=chunk_layers, in_memory=in_memory,
                        use_ema=use_ema, data_dir=data_dir, json=json)

    def speedrun(self, target_acc: float = _SR.target_acc, layers: int = _SR.layers, width: int = _SR.width,
                 activation: str = _SR.activation, batch: int = _SR.batch, layer_lr: float = _SR.layer_lr,
                 head_lr: float = _SR.head_lr, schedule: str = _SR.schedule, warmup: int = _SR.warmup,
                 final_lr_ratio: float = _SR.final_lr_ratio, eval_every: int = _SR.eval_every,
                 eval_gate: float = _SR.eval_gate, holdout: int = _SR.holdout, max_steps: int = _SR.max_steps,
                 seed: int = _SR.seed, in_memory: bool = _SR.in_memory, chunk_layers: int = _SR.chunk_layers,
                 test_samples: int = _SR.test_samples, report_every: int = _SR.report_every, model: str = None,
                 workdir: str = None, data_dir: str = None, json: bool = False) -> None:
        """Time to a target accuracy: train a fresh model until its held-out accuracy reaches --target-acc.

        Trains on the first 60000 - --holdout training images, evaluates the last --holdout every
        --eval-every steps (skipped while the mean batch accuracy since the last evaluation is more than
        --eval-gate below the target), stops at the target, then evaluates the full test set. The headline,
        time to target, is wall clock from the first step to the end of the evaluation that reached it:
        held-out evaluations included; data loading, model creation and the test evaluation excluded.
        Every default is deepnet.training.speedrun.SPEEDRUN. Exit status 1 if --max-steps ran out first.

        Args:
            target_acc: held-out accuracy to reach.
            layers: core layers L.
            width: core width w.
            activation: core activation.
            batch: minibatch size.
            layer_lr: SGD learning rate of the core.
            head_lr: SGD learning rate of the heads.
            schedule: constant, cosine or linear (decaying over --max-steps).
            warmup: warmup steps.
            final_lr_ratio: the fraction of the rates a decay ends at.
            eval_every: steps between held-out evaluations.
            eval_gate: skip an evaluation while the mean batch accuracy since the last one is more than this
                below the target (1 never skips).
            holdout: held-out images (the last N training images).
            max_steps: give up after this many steps.
            seed: seed of the weights and minibatches.
            in_memory: hold the core in RAM (default; --noin-memory streams it from the file).
            chunk_layers: layers per kernel call.
            test_samples: test images of the final evaluation.
            report_every: a table row every N steps.
            model: keep the trained model here (must not exist); default a temporary file, removed.
            workdir: directory of the temporary model (default the system's temporary directory).
            data_dir: MNIST directory; default $DEEPNET_DATA, else a per-user cache (fetched if empty).
            json: print one JSON object (and one per report) instead of text.
        """
        from deepnet.training.speedrun import TargetNotReached, speedrun

        report = speedrun(model=model, workdir=workdir, data_dir=data_dir, json=json, target_acc=target_acc,
                          layers=layers, width=width, activation=activation, batch=batch, layer_lr=layer_lr,
                          head_lr=head_lr, schedule=schedule, warmup=warmup, final_lr_ratio=final_lr_ratio,
                          eval_every=eval_every, eval_gate=eval_gate, holdout=holdout, max_steps=max_steps,
                          seed=seed, in_memory=in_memory, chunk_layers=chunk_layers, test_samples=test_samples,
                          report_every=report_every)
        if not report["reached"]:
            raise TargetNotReached(f"the target held-out accuracy {target_acc:g} was not reached in "
                                   f"{report['steps']} steps")

    # The original experiment's command names.
    train_dense = train
    eval_dense = eval

    def bench(self, layers: int = 10_000_000, width: int = 4, activation: str = "softsign", batch: int = 16,
              steps: int = 3, streamed: bool = False, chunk_layers: int = R.chunk_layers, eval_images: int = 0,
              eval_batch: int = 1024, workdir: str = None, threads: int = 0, json: bool = False) -> None:
        """Time exact SGD steps of the reference workload (10M layers, width 4, softsign, batch 16) here.

        Creates a temporary model (layers x (width*width+width) x 4 bytes on disk), runs warm-up steps
        (the first, then until the choice of one thread or two is made: 5 on two cores; 1 with
        --threads), times --steps steps, and prints the median seconds per step, layer-samples per
        second, the threads each timed step's forward and backward passes ran on, and (on Linux) how much
        of the machine's CPU time a hypervisor took for others meanwhile: on a shared virtual machine,
        how disturbed the figures are. The kernels are the fastest build this CPU runs (AVX-512, AVX2 or
        portable), printed as "kernels"; $DEEPNET_KERNELS=portable|avx2|avx512 picks one.

        Args:
            layers: core layers.
            width: core width.
            activation: core activation.
            batch: minibatch size.
            steps: timed steps (after the warm-up steps, reported apart); the median is reported.
            streamed: stream the weights from the file instead of holding them in RAM.
            chunk_layers: layers per kernel call and per read.
            eval_images: also time forward-only evaluation of this many images (0: skip).
            eval_batch: images per evaluation forward pass.
            workdir: directory for the temporary model (default: the system temp dir).
            threads: run every pass on this many threads (at most the CPUs, or $DEEPNET_THREADS) instead of
                letting the thread choice measure one against two, as training does (0).
            json: print one JSON object.
        """
        from deepnet.tools.bench import run_bench

        result = run_bench(layers=layers, width=width, activation=activation, batch=batch, steps=steps,
                           in_memory=not streamed, chunk_layers=chunk_layers, eval_images=eval_images,
                           eval_batch=eval_batch, workdir=workdir, threads=threads)
        if json:
            print_json(result)
            return
        fields = {
            "workload": f"{layers:,} layers x width {width}, {activation}, batch {batch}, {result['mode']}",
            "s/step": f"{result['seconds_per_step']:.4f} median of {steps} (min {result['seconds_per_step_min']:.4f})",
            "warm-up": f"{len(result['warmup_times'])} steps, "
                       + " ".join(f"{seconds:.3f}" for seconds in result["warmup_times"]) + " s",
            "threads": "forward/backward per step: "
                       + " ".join(f"{fwd}/{bwd}" for fwd, bwd in result["step_threads"]),
            "layer-samples/s": format_rate(result["layer_samples_per_s"]),
            "kernels": result["kernels"],
            "peak memory": f"{result['peak_rss_bytes'] / 2**30:.2f} GiB",
        }
        stolen = result["cpu_stolen_fraction"]
        fields["cpu stolen"] = ("not measured (no steal count from the kernel, or timed steps too short to count)"
                                if stolen is None else f"{100 * stolen:.1f}% of the machine's CPU time during the "
                                "timed steps (run by the hypervisor for others)")
        if eval_images:
            fields["eval"] = f"{result['eval_images_per_s']:.1f} images/s over {eval_images} images"
        print_fields(fields)

    def info(self, model: str, json: bool = False) -> None:
        """Show what is in a model file: shape, activation, step, size, last logged figures.

        Args:
            model: HDF5 model file.
            json: print one JSON object instead of text.
        """
        from deepnet.formats.hdf5 import ModelFile
        from deepnet.nn.mlp import MLP, model_kind

        if model_kind(model) == "mlp":
            summary = MLP.load(model).summary(model)
        else:
            from deepnet.training.options import summary as _extras

            with ModelFile.open(model) as f:
                summary = f.summary()
                summary.update(_extras(f))
        if json:
            print_json({k: (v.tolist() if hasattr(v, "tolist") else v) for k, v in summary.items()})
        else:
            print_fields(summary)

    def check(self, model: str, json: bool = False) -> None:
        """Check a model file: format, shapes, dtypes, attributes, every weight finite, and whether it holds
        a committed step (healthy) or a step its writer was killed in the middle of (torn).

        Exit status 0 only for a healthy file; 1 for a torn or damaged one (the report says what is wrong);
        2 if it cannot be read as a deepnet model at all.

        Args:
            model: HDF5 model file.
            json: print one JSON object instead of text.
        """
        from deepnet.tools.check import check_model

        report = check_model(model)
        if json:
            print_json(report.as_dict())
        else:
            print(report.text())
        if not report.healthy:
            raise CheckFailed(f"{model}: {report.summary}")

    def train_mlp(self, model: str = "mlp.h5", hidden: int = None, steps: int = _MLP.steps, batch: int = _MLP.batch,
                  lr: float = _MLP.lr, schedule: str = _MLP.schedule, seed: int = _MLP.seed,
                  train_limit: int = _MLP.train_limit, report_every: int = _MLP.report_every,
                  samples: int = _MLP.samples, threads: int = _MLP.threads, data_dir: str = None,
                  json: bool = False) -> None:
        """Train the baseline 784-hidden-10 ReLU MLP (NumPy, minibatch SGD), creating the file if missing.

        The defaults are deepnet.training.mlp.MLP_RECIPE (hidden 512, batch 128, lr 0.2 cosine, 15000 steps).
        The original experiment's run: --hidden 128 --batch 128 --steps 5000 --lr 0.05 --schedule step:2500=0.03.
        An existing model continues from its saved step; --hidden must then agree with the file.

        Args:
            model: HDF5 model file of kind mlp (created if missing).
            hidden: hidden units of a new model (default 512).
            steps: SGD steps to run now.
            batch: minibatch size.
            lr: learning rate at the start of the schedule.
            schedule: cosine (lr -> 0 over this run), linear, constant, or step:T1=LR1[,T2=LR2...] (lr until
                step T1 of this run, then LR1, ...).
            seed: seed of a new model's weights (He/Xavier-uniform) and minibatches.
            train_limit: draw minibatches from the first N training images.
            report_every: print a report and save the file every N steps.
            samples: test images evaluated at the end (0 to skip).
            threads: BLAS threads while training (0: BLAS's default; 1 is robust on a shared machine).
            data_dir: MNIST directory; default $DEEPNET_DATA, else a per-user cache (fetched if empty).
            json: print JSON lines (one per report and a final object) instead of a table.
        """
        from deepnet.training.mlp import train_mlp

        train_mlp(model, hidden=hidden, steps=steps, batch=batch, lr=lr, schedule=schedule, seed=seed,
                  train_limit=train_limit, report_every=report_every, samples=samples, threads=threads,
                  data_dir=data_dir, json=json)

    def eval_mlp(self, model: str = "mlp.h5", samples: int = 10_000, batch: int = 1000, data_dir: str = None,
                 json: bool = False) -> None:
        """Evaluate an MLP model on the MNIST test set: loss, accuracy, elapsed time.

        Args:
            model: HDF5 model file of kind mlp.
            samples: evaluate the first N test images.
            batch: images per forward pass.
            data_dir: MNIST directory; default $DEEPNET_DATA, else a per-user cache (fetched if empty).
            json: print one JSON object instead of text.
        """
        from deepnet.training.mlp import evaluate_mlp

        evaluate_mlp(model, samples=samples, batch=batch, data_dir=data_dir, json=json)

    def import_raw(self, model: str = None, head: str = None, weights: str = None, kind: str = "dense",
                   layers: int = None, width: int = None, activation: str = None, alpha: float = None,
                   hidden: int = None, seed: int = 0, overwrite: bool = False, json: bool = False) -> None:
        """Make a model file from the original experiment's raw little-endian float32 files.

        Dense: --weights holds L rows of [W (w x w, input-major) | b (w)]; --head holds input_w (784 x w) |
        input_b (w) | output_w (w x 10) | output_b (10). MLP (--kind mlp --hidden H): --head holds
        w1 (784 x H) | b1 | w2 (H x 10) | b2. File sizes are checked before anything is written; the model
        is built under a temporary name and renamed into place when complete.

        Args:
            model: HDF5 model file to create.
            head: raw head file (dense) or the whole raw MLP (mlp).
            weights: raw core weights file (dense only).
            kind: dense or mlp.
            layers: core layers L (dense).
            width: core width w (dense).
            activation: core activation (dense; the raw files do not record it).
            alpha: residual scale (dense); default 1/sqrt(layers).
            hidden: hidden units (mlp).
            seed: seed stored in the model (it seeds the minibatches of later training).
            overwrite: replace an existing model file.
            json: print one JSON object.
        """
        from deepnet.formats.raw import import_raw

        result = import_raw(model, head=head, weights=weights, kind=kind, layers=layers, width=width,
                            activation=activation, alpha=alpha, hidden=hidden, seed=seed, overwrite=overwrite,
                            progress=not json)
        if json:
            print_json(result)
        else:
            shape = (f"{result['layers']:,} layers x width {result['width']}, {result['activation']}, "
                     f"alpha {result['alpha']:g}" if result["kind"] == "dense" else f"mlp, hidden {result['hidden']}")
            print(f"imported {model}: {shape} ({result['bytes']:,} bytes in {result['seconds']:.2f}s)")

    def export_raw(self, model: str = None, head: str = None, weights: str = None, overwrite: bool = False,
                   json: bool = False) -> None:
        """Write a model's parameters as the original experiment's raw float32 files (see import-raw).

        A dense model writes --weights (streamed) and --head; an mlp model writes --head only. Each file is
        written under a temporary name and renamed into place when complete.

        Args:
            model: HDF5 model file (dense or mlp).
            head: raw head file to write (the whole MLP for an mlp model).
            weights: raw core weights file to write (dense only).
            overwrite: replace existing output files.
            json: print one JSON object.
        """
        from deepnet.formats.raw import export_raw

        result = export_raw(model, head=head, weights=weights, overwrite=overwrite, progress=not json)
        if json:
            print_json(result)
        else:
            files = " and ".join(p for p in (result.get("weights"), result["head"]) if p)
            print(f"exported {model} ({result['kind']}) to {files}: "
                  f"{result['bytes']:,} bytes in {result['seconds']:.2f}s")

    def plot(self, model: str, out: str = None, smooth: int = 0, width: int = 1200, height: int = 800,
             json: bool = False) -> None:
        """Draw a model's training curves (loss and accuracy vs step, raw and moving average) into an image.

        Needs matplotlib (pip install 'deepnet[plot]'). Works for dense and mlp model files.

        Args:
            model: HDF5 model file with a training log.
            out: image to write (.png; .svg and .pdf work too); default the model's path with .png.
            smooth: moving-average window in steps (0: about 1/50 of the log).
            width: image width in pixels.
            height: image height in pixels.
            json: print one JSON object.
        """
        from deepnet.tools.plot import plot_training

        result = plot_training(model, out, smooth=smooth, width=width, height=height)
        if json:
            print_json(result)
        else:
            print(f"wrote {result['out']}: {result['rows']:,} log rows, moving average of {result['smooth']}")

    def data(self, dest: str = None) -> None:
        """Fetch MNIST (checked against its sha256) into a directory.

        Args:
            dest: target directory; default $DEEPNET_DATA, else a per-user cache directory.
        """
        from deepnet.data.mnist import default_data_dir, fetch_mnist

        path = fetch_mnist(dest if dest is not None else default_data_dir())
        print(f"MNIST is in {path}")

    def activations(self, action: str = "list", name: str = None, json: bool = False) -> None:
        """List the activations (built-in and plugins), check one, or compile plugins ahead of use.

        `deepnet activations` lists name, origin (built-in or the plugin's package), whether its kernel is
        compiled (built in, cached, or not yet: plugins compile on first use) and description.
        `deepnet activations check NAME` runs NAME's compiled kernel (compiling it if needed) over a grid
        of z, compares the C derivative with central finite differences of the C forward and both with
        the NumPy versions, prints the worst errors, and fails if any is over its tolerance.
        `deepnet activations compile [NAME]` compiles NAME (default: every activation not compiled yet).

        Args:
            action: list, check or compile.
            name: the activation to check or compile.
            json: print JSON (one object per activation, or the check's result) instead of text.
        """
        from deepnet.activations import check as _check
        from deepnet.kernels import jit as _compile
        from deepnet.activations import plugins as _plugins

        if action == "list":
            for act_name in _activations.available():
                act = _activations.get(act_name)
                row = {"name": act_name, "origin": act.origin, "compiled": _compile.status(act),
                       "description": act.description}
                if json:
                    print_json(row)
                else:
                    print(f"{act_name:<16} {act.origin:<28} {row['compiled']:<9} {act.description}")
            for problem in _plugins.errors():
                print(f"deepnet: plugin problem: {problem}", file=sys.stderr)
        elif action == "check":
            if not name:
                raise ConfigError("deepnet activations check needs the activation's name")
            result = _check.check_activation(name)
            if json:
                print_json(result)
            else:
                print(_check.format_report(result))
            if not result["ok"]:
                raise _check.ActivationCheckError(_check.failure_message(result))
        elif action == "compile":
            names = [name] if name else [n for n in _activations.available()
                                         if _compile.status(_activations.get(n)) == "not yet"]
            from deepnet.kernels.loader import kernels_for

            for act_name in names:
                module = kernels_for(act_name).module
                if json:
                    print_json({"name": act_name, "module": module.__name__, "path": getattr(module, "__file__", None)})
                else:
                    print(f"{act_name}: {module.__name__} ({getattr(module, '__file__', 'built in')})")
        else:
            raise ConfigError(f"deepnet activations: unknown action {action!r} (use list, check or compile)")


class CheckFailed(DeepnetError):
    """`deepnet check` found a torn or damaged file (exit status 1)."""

    exit_status = 1


def _check_flags(args: list[str]) -> None:
    """Refuse a ``--flag`` the command does not take, before the command runs.

    fire calls a command with the flags it recognises and only afterwards complains about the rest, so
    a mistyped flag would otherwise train (and create or modify a model file) with defaults first.
    """
    if not args or args[0].startswith("-"):
        return
    command = getattr(DeepnetCLI, args[0].replace("-", "_"), None)
    if not callable(command):
        return
    params = set(inspect.signature(command).parameters) - {"self"}
    for arg in args[1:]:
        if arg in ("-", "--"):  # fire's separators: what follows is not this command's
            return
        if not arg.startswith("--"):
            continue
        key = arg[2:].split("=", 1)[0].replace("-", "_")
        if key in params or key == "help" or (key.startswith("no") and key[2:] in params):
            continue
        raise ConfigError(f"deepnet {args[0]} has no flag --{key.replace('_', '-')} (see `deepnet {args[0]} --help`)")


def _ignore_stop_signals() -> None:
    """Ignore Ctrl-C and SIGTERM from now on: the command has reported its stop and is exiting.

    Presses can keep arriving (a held-down key, or presses that reach a busy machine late). The
    interpreter's shutdown resets Python-level handlers to the default, which would kill the process
    with the signal instead of letting it exit with its status; an ignored signal stays ignored.
    """
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `deepnet` console command."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    try:
        _check_flags(args)
        # An instance, not the class: fire then lists the commands in `deepnet --help`.
        fire.Fire(DeepnetCLI(), command=args, name="deepnet")
    except DeepnetError as exc:
        if debug:
            raise
        print(f"deepnet: error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_status", 2)
    except KeyboardInterrupt as exc:
        detail = str(exc)
        print(f"deepnet: interrupted{': ' + detail if detail else ''}", file=sys.stderr)
        if argv is None:  # the console command itself is about to exit
            _ignore_stop_signals()
        return 128 + getattr(exc, "signum", 2)
    except fire.core.FireExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
