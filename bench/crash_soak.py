"""Crash soak: SIGKILL `deepnet train` at random moments many times and check every file it leaves.

    python bench/crash_soak.py                          # 200 kills per mode (streamed, in memory)
    python bench/crash_soak.py --kills 1000 --modes streamed --layers 20000 --seed 7

The same campaign as tests/test_crash.py (see tests/crash_harness.py for what is checked after each
kill: the file opens; `deepnet check` says healthy or torn, never damaged; a healthy file is exactly the
uninterrupted run's state at its step; a torn one holds step S+1 in the chunks it marks and step S
elsewhere; and the file, resumed to the end, equals the uninterrupted run bit for bit). Needs MNIST in
$DEEPNET_TEST_MNIST or /work/shared/data/mnist. Prints the counts.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from crash_harness import CrashSetup, build_reference, crash_campaign, create_model, make_small_mnist  # noqa: E402
from helpers import MNIST_DIR, have_mnist  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=200, help="kills per mode (default 200)")
    parser.add_argument("--modes", default="streamed,in-memory", help="streamed, in-memory or both (default)")
    parser.add_argument("--layers", type=int, default=6000)
    parser.add_argument("--storage-chunk-layers", type=int, default=100)
    parser.add_argument("--steps", type=int, default=400, help="length of the reference run")
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--verbose", action="store_true", help="one line per kill")
    args = parser.parse_args()
    if not have_mnist():
        print(f"MNIST is not in {MNIST_DIR}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="deepnet-crash-") as tmp:
        setup = CrashSetup(workdir=Path(tmp), mnist_dir=MNIST_DIR, layers=args.layers,
                           storage_chunk_layers=args.storage_chunk_layers, chunk_layers=args.storage_chunk_layers,
                           steps=args.steps)
        make_small_mnist(MNIST_DIR, setup.data_dir, setup.n_train, setup.n_test)
        fresh = create_model(setup, setup.workdir / "fresh.h5")
        ref = build_reference(setup, setup.workdir / "reference.h5")
        total = 0
        for k, mode in enumerate(m.strip() for m in args.modes.split(",")):
            started = time.perf_counter()
            stats = crash_campaign(setup, ref, fresh, in_memory=(mode == "in-memory"), kills=args.kills,
                                   seed=args.seed + k, log=print if args.verbose else None)
            total += stats.kills
            print(f"{mode}: {stats.kills} kills survived ({stats.healthy} healthy, {stats.torn} torn; "
                  f"{stats.resumed_torn} torn files resumed with --resume-torn; {stats.stale_temporaries} "
                  f"leftover temporaries seen; {stats.finished} runs finished before their kill) in "
                  f"{time.perf_counter() - started:.0f}s; resumed to the end bit-exactly", flush=True)
    print(f"{total} kills survived")
    return 0


if __name__ == "__main__":
    sys.exit(main())
