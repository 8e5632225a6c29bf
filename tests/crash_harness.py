"""Kill `deepnet train` at random moments and check what it leaves behind.

Used by tests/test_crash.py (a few dozen kills) and bench/crash_soak.py (as many as you like).

The model is small but has many storage chunks (6000 layers of width 4 in 60 chunks by default), so a
kill lands anywhere: in start-up, the forward pass, the middle of the backward pass (a torn step), the
commit, a report's log append, or (in memory) the writing of a checkpoint. After each kill:

- the file must open, and ``check_model`` must say healthy or torn, never damaged;
- healthy at step S: every storage chunk, the heads, the generator state and the training log must be
  exactly those of an uninterrupted run after S steps (so resuming gives that run's result);
- torn at S+1: the chunks marked S+1 must hold step S+1's weights (except the one being updated when
  the kill came, which may be part-way), every other chunk step S's, and the heads step S's or S+1's.

Training then continues from the killed file (healthy), or starts again from a fresh copy (torn,
after sometimes checking that ``--resume-torn`` accepts it), and at the end one uninterrupted run
finishes the file, whose weights must equal the reference run's bit for bit.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from deepnet.tools.check import check_model
from deepnet.formats.hdf5 import HEAD_KEYS, ModelFile, stale_temporaries
from deepnet.formats.idx import load_mnist, write_idx


@dataclass
class CrashSetup:
    workdir: Path
    mnist_dir: Path
    layers: int = 6000
    width: int = 4
    activation: str = "softsign"
    storage_chunk_layers: int = 100
    chunk_layers: int = 100
    batch: int = 8
    train_limit: int = 1000
    steps: int = 400          # the length of the reference run
    seed: int = 3
    checkpoint_every: int = 5  # in memory
    n_train: int = 1000
    n_test: int = 100

    @property
    def data_dir(self) -> Path:
        return self.workdir / "mnist"


def make_small_mnist(source: Path, dest: Path, n_train: int, n_test: int) -> Path:
    """The first images of each split of MNIST, as raw IDX files (fast to load in every subprocess)."""
    dest.mkdir(parents=True, exist_ok=True)
    for split, n, stem in (("train", n_train, "train"), ("test", n_test, "t10k")):
        images, labels = load_mnist(source, split)
        write_idx(dest / f"{stem}-images-idx3-ubyte", images[:n])
        write_idx(dest / f"{stem}-labels-idx1-ubyte", labels[:n])
    return dest


def create_model(setup: CrashSetup, path: Path) -> Path:
    ModelFile.create(path, layers=setup.layers, width=setup.width, activation=setup.activation, seed=setup.seed,
                     storage_chunk_layers=setup.storage_chunk_layers, progress=False).close()
    return path


def chunk_crcs(core: np.ndarray, chunk: int) -> np.ndarray:
    return np.array([zlib.crc32(core[s:s + chunk].tobytes()) for s in range(0, core.shape[0], chunk)], np.uint64)


def head_crcs(heads: dict) -> tuple:
    return tuple(zlib.crc32(heads[k].tobytes()) for k in HEAD_KEYS)


@dataclass
class Reference:
    """Fingerprints of an uninterrupted run after each step 0..steps."""

    chunks: list = field(default_factory=list)     # per step: CRC-32 of each storage chunk
    heads: list = field(default_factory=list)      # per step: CRC-32 of each head array
    rng: list = field(default_factory=list)        # per step: the generator state committed with it
    log: list = field(default_factory=list)        # per step s >= 1: (loss, batch_acc) of step s
    final_core: np.ndarray | None = None


def build_reference(setup: CrashSetup, path: Path) -> Reference:
    """Run the recipe's loop through the API on a fresh model, fingerprinting the file after every step.

    (test_crash checks that a real uninterrupted `deepnet train` ends with the same weights.)"""
    from deepnet import DeepNet, RECIPE
    from deepnet.data.dataset import pixels as mnist_inputs

    create_model(setup, path)
    images, labels = load_mnist(setup.data_dir, "train")
    x, y = mnist_inputs(images[:setup.train_limit]), labels[:setup.train_limit]
    ref = Reference()
    with DeepNet.open(path, writable=True, chunk_layers=setup.chunk_layers) as net:
        rng = np.random.default_rng([net.file.seed, 1])

        def snap():
            ref.chunks.append(chunk_crcs(net.file.read_core(), setup.storage_chunk_layers))
            ref.heads.append(head_crcs(net.file.read_heads()))
            ref.rng.append(net.file.rng_state)

        snap()
        ref.log.append(None)
        for _ in range(setup.steps):
            idx = rng.integers(0, setup.train_limit, size=setup.batch)
            result = net.train_step(x[idx], y[idx], layer_lr=RECIPE.layer_lr, head_lr=RECIPE.head_lr,
                                    rng_state=rng.bit_generator.state)
            ref.log.append((result.loss, result.batch_acc))
            snap()
        ref.final_core = net.file.read_core()
    return ref


def verify(setup: CrashSetup, path: Path, ref: Reference) -> tuple[str, int]:
    """Check a killed file against the reference; returns (status, committed step). Raises AssertionError."""
    report = check_model(path)
    assert report.status in ("healthy", "torn"), f"{path}: {report.summary}"
    with ModelFile.open(path) as f:
        step = f.step
        assert 0 <= step <= setup.steps, step
        crcs = chunk_crcs(f.read_core(), setup.storage_chunk_layers)
        heads = head_crcs(f.read_heads())
        cs = f.chunk_steps()
        state = f.state()
        log = f.read_log()
        rng_state = f.rng_state
    assert state.status == report.status
    assert rng_state == ref.rng[step], f"generator state of step {step} differs"
    assert log["step"].tolist() == list(range(1, step + 1)), f"log steps {log['step'].tolist()[-5:]} at step {step}"
    got = [(float(a), float(b)) for a, b in zip(log["loss"], log["batch_acc"])]
    assert got == ref.log[1:step + 1], "training log rows differ from the reference run's"
    if report.status == "healthy":
        assert np.array_equal(crcs, ref.chunks[step]), f"healthy step {step}: core differs from the reference"
        assert heads == ref.heads[step], f"healthy step {step}: heads differ from the reference"
        return "healthy", step
    # torn at step + 1
    assert step + 1 <= setup.steps
    ahead = np.flatnonzero(cs == step + 1)
    assert ahead.size and np.all(cs <= step + 1)
    lowest = ahead[0]
    assert np.array_equal(ahead, np.arange(lowest, len(cs))), "torn chunks are not the last ones"
    for c in range(len(cs)):
        if c < lowest:
            assert crcs[c] == ref.chunks[step][c], f"torn: chunk {c} (not reached) differs from step {step}"
        elif c > lowest:
            assert crcs[c] == ref.chunks[step + 1][c], f"torn: chunk {c} (updated) differs from step {step + 1}"
    for k in range(len(HEAD_KEYS)):
        assert heads[k] in (ref.heads[step][k], ref.heads[step + 1][k]), f"torn: head {HEAD_KEYS[k]} is neither"
    return "torn", step


@dataclass
class CrashStats:
    kills: int = 0
    healthy: int = 0
    torn: int = 0
    finished: int = 0          # runs that ended before their kill
    resumed_torn: int = 0
    stale_temporaries: int = 0
    final_runs: int = 0


def deepnet_env(setup: CrashSetup) -> dict:
    env = dict(os.environ)
    env["DEEPNET_DATA"] = str(setup.data_dir)
    env.setdefault("DEEPNET_THREADS", "1")
    return env


def train_argv(setup: CrashSetup, path: Path, steps: int, *, in_memory: bool, report_every: int,
               extra: tuple = ()) -> list[str]:
    argv = [sys.executable, "-m", "deepnet", "train", str(path), "--steps", str(steps), "--batch", str(setup.batch),
            "--train-limit", str(setup.train_limit), "--report-every", str(report_every), "--test-samples", "0",
            "--chunk-layers", str(setup.chunk_layers), "--json", *extra]
    if in_memory:
        argv += ["--in-memory", "--checkpoint-every", str(setup.checkpoint_every)]
    return argv


def run_to_end(setup: CrashSetup, path: Path, *, in_memory: bool, extra: tuple = ()) -> subprocess.CompletedProcess:
    with ModelFile.open(path) as f:
        step = f.step
    proc = subprocess.run(train_argv(setup, path, setup.steps - step, in_memory=in_memory, report_every=50,
                                     extra=extra), env=deepnet_env(setup), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


def kill_run(setup: CrashSetup, path: Path, rnd: random.Random, *, in_memory: bool,
             step_seconds: float) -> bool:
    """Start training from the file's step to the end, SIGKILL it at a random moment once it has started
    training. Returns False if it finished first."""
    with ModelFile.open(path) as f:
        step = f.step
    remaining = setup.steps - step
    report_every = rnd.choice([1, 2, 5, 25])
    err_path = setup.workdir / "stderr.txt"
    err = open(err_path, "w")
    proc = subprocess.Popen(train_argv(setup, path, remaining, in_memory=in_memory, report_every=report_every),
                            env=deepnet_env(setup), stdout=subprocess.PIPE, stderr=err, text=True)
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    try:
        # Kill somewhere in the run: sometimes before training starts, mostly after its first report.
        if rnd.random() < 0.1:
            time.sleep(rnd.uniform(0.0, 1.0))
        else:
            proc.stdout.readline()
            time.sleep(rnd.uniform(0.0, max(0.0, remaining - report_every) * step_seconds))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        if proc.returncode == -signal.SIGKILL:
            return True
        err.flush()
        assert proc.returncode == 0, f"training failed (exit {proc.returncode}): {err_path.read_text()[-2000:]}"
        return False
    finally:
        watchdog.cancel()
        proc.stdout.close()
        err.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def calibrate(setup: CrashSetup, fresh: Path, *, in_memory: bool) -> float:
    """Seconds per training step of an uninterrupted subprocess run (start-up excluded)."""
    path = setup.workdir / "calibrate.h5"
    shutil.copy(fresh, path)
    proc = run_to_end(setup, path, in_memory=in_memory)
    import json

    final = [json.loads(line) for line in proc.stdout.splitlines() if line.strip()][-1]
    path.unlink()
    return final["seconds"] / final["steps"]


def crash_campaign(setup: CrashSetup, ref: Reference, fresh: Path, *, in_memory: bool, kills: int, seed: int,
                   log=None) -> CrashStats:
    """Kill `kills` training runs at random moments (seeded), verifying the file after each; then finish
    the file with one uninterrupted run and compare it with the reference."""
    rnd = random.Random(seed)
    stats = CrashStats()
    step_seconds = calibrate(setup, fresh, in_memory=in_memory)
    path = setup.workdir / ("mem.h5" if in_memory else "streamed.h5")
    shutil.copy(fresh, path)
    seen_cli: set = set()
    while stats.kills < kills:
        if not kill_run(setup, path, rnd, in_memory=in_memory, step_seconds=step_seconds):
            stats.finished += 1
            status, step = verify(setup, path, ref)
            assert status == "healthy" and step == setup.steps
            shutil.copy(fresh, path)
            continue
        stats.kills += 1
        status, step = verify(setup, path, ref)
        if status not in seen_cli:
            # `deepnet check` itself: exit status 0 for healthy, 1 for torn, and the same verdict.
            seen_cli.add(status)
            proc = subprocess.run([sys.executable, "-m", "deepnet", "check", str(path), "--json"],
                                  env=deepnet_env(setup), capture_output=True, text=True, timeout=300)
            assert proc.returncode == (0 if status == "healthy" else 1), proc.stderr
            import json

            assert json.loads(proc.stdout)["status"] == status
        stats.stale_temporaries += len(stale_temporaries(path))
        if log:
            log(f"kill {stats.kills}: {status} at step {step}")
        if status == "healthy":
            stats.healthy += 1
            assert not in_memory or step % setup.checkpoint_every == 0 or step == setup.steps, step
            if step == setup.steps:
                shutil.copy(fresh, path)
            continue
        assert not in_memory, "an in-memory run left a torn file"
        stats.torn += 1
        if rnd.random() < 0.25:
            # --resume-torn accepts it, says so, and leaves a healthy file that notes what it accepted.
            proc = subprocess.run(train_argv(setup, path, 1, in_memory=False, report_every=1, extra=("--resume-torn",)),
                                  env=deepnet_env(setup), capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr
            assert "--resume-torn" in proc.stderr and f"step {step}" in proc.stderr, proc.stderr
            report = check_model(path)
            assert report.healthy and "accepted with --resume-torn" in report.text(), report.text()
            stats.resumed_torn += 1
        shutil.copy(fresh, path)
    # Finish whatever the last kill left (from a fresh copy if it was torn) in one go.
    status, step = verify(setup, path, ref)
    if status != "healthy":
        shutil.copy(fresh, path)
    run_to_end(setup, path, in_memory=in_memory)
    stats.final_runs += 1
    with ModelFile.open(path) as f:
        assert f.step == setup.steps
        assert np.array_equal(f.read_core(), ref.final_core), "resumed run's final core differs from the reference"
        assert head_crcs(f.read_heads()) == ref.heads[setup.steps]
    assert verify(setup, path, ref) == ("healthy", setup.steps)
    assert not stale_temporaries(path)
    return stats
