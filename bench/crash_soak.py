"""Crash soak: SIGKILL `deepnet train` at random moments many times and check every file it leaves.

    python bench/crash_soak.py                          # 200 kills per mode (streamed, in memory)
    python bench/crash_soak.py --kills 1000 --modes streamed --layers 20000 --seed 7
    python bench/crash_soak.py --help                   # the flags (a fire command line)

The same campaign as tests/test_crash.py (see tests/crash_harness.py for what is checked after each
kill: the file opens; `deepnet check` says healthy or torn, never damaged; a healthy file is exactly the
uninterrupted run's state at its step; a torn one holds step S+1 in the chunks it marks and step S
elsewhere; and the file, resumed to the end, equals the uninterrupted run bit for bit). Needs MNIST in
$DEEPNET_DATA. Prints the counts.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from crash_harness import CrashSetup, build_reference, crash_campaign, create_model, make_small_mnist  # noqa: E402
from helpers import MNIST_DIR, have_mnist  # noqa: E402

import devcli  # noqa: E402  (bench/, the script's directory)

from deepnet.errors import ConfigError  # noqa: E402
from deepnet.flags import positive  # noqa: E402

MODES = ("streamed", "in-memory")


def soak(kills: int = 200, modes: str = "streamed,in-memory", layers: int = 6000, storage_chunk_layers: int = 100,
         steps: int = 400, seed: int = 11, verbose: bool = False) -> None:
    """SIGKILL `deepnet train` at random moments and check every file it leaves; prints the counts.

    Args:
        kills: kills per mode.
        modes: streamed, in-memory, or both separated by a comma.
        layers: core layers of the soaked model.
        storage_chunk_layers: layers per HDF5 chunk (and per kernel call).
        steps: length of the reference run the kills land in.
        seed: seed of the kill times (mode k uses seed + k).
        verbose: one line per kill.
    """
    for name, value in (("kills", kills), ("layers", layers), ("storage-chunk-layers", storage_chunk_layers),
                        ("steps", steps)):
        positive(name, value)
    names = modes if isinstance(modes, (list, tuple)) else str(modes).split(",")
    names = [str(m).strip() for m in names]
    if not names or any(m not in MODES for m in names):
        raise ConfigError(f"--modes must be streamed, in-memory or both separated by a comma, got {modes!r}")
    if not have_mnist():
        raise ConfigError(f"MNIST is not in {MNIST_DIR}")
    with tempfile.TemporaryDirectory(prefix="deepnet-crash-") as tmp:
        setup = CrashSetup(workdir=Path(tmp), mnist_dir=MNIST_DIR, layers=layers,
                           storage_chunk_layers=storage_chunk_layers, chunk_layers=storage_chunk_layers, steps=steps)
        make_small_mnist(MNIST_DIR, setup.data_dir, setup.n_train, setup.n_test)
        fresh = create_model(setup, setup.workdir / "fresh.h5")
        ref = build_reference(setup, setup.workdir / "reference.h5")
        total = 0
        for k, mode in enumerate(names):
            started = time.perf_counter()
            stats = crash_campaign(setup, ref, fresh, in_memory=(mode == "in-memory"), kills=kills,
                                   seed=seed + k, log=print if verbose else None)
            total += stats.kills
            print(f"{mode}: {stats.kills} kills survived ({stats.healthy} healthy, {stats.torn} torn; "
                  f"{stats.resumed_torn} torn files resumed with --resume-torn; {stats.stale_temporaries} "
                  f"leftover temporaries seen; {stats.finished} runs finished before their kill) in "
                  f"{time.perf_counter() - started:.0f}s; resumed to the end bit-exactly", flush=True)
    print(f"{total} kills survived")


if __name__ == "__main__":
    devcli.run(soak, "crash_soak")
