"""Fuzz the IDX reader for longer than CI does: every input either reads as an array that matches its
header or raises deepnet's own one-line DataError naming the file -- never any other exception, never
an allocation the file could not fill.

    python bench/fuzz_idx.py                       # 20,000 examples of each property (a few minutes)
    python bench/fuzz_idx.py --examples 200000     # longer
    python bench/fuzz_idx.py --atheris --atheris-args=-runs=1000000   # coverage-guided, if atheris is installed
    python bench/fuzz_idx.py --help                # the flags (a fire command line)

The properties and input generators are those of tests/test_idx.py (random bytes, bytes behind a gzip
magic, valid files, mutated valid files, headers claiming up to terabytes, mutated MNIST splits
through load_mnist); CI runs 200 examples of each. Prints how many inputs ran and how they ended.
"""

from __future__ import annotations

import collections
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

import test_idx as t  # noqa: E402  (the strategies and checks of the test suite)
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import devcli  # noqa: E402  (bench/, the script's directory)

from deepnet.errors import DataError  # noqa: E402
from deepnet.flags import positive  # noqa: E402
from deepnet.formats.idx import read_idx  # noqa: E402


def run_hypothesis(examples: int, scratch: Path, seed: int | None) -> dict:
    outcomes: dict = collections.Counter()
    properties = {
        "random bytes": (st.binary(max_size=256), lambda d: t.check_any_bytes(scratch, d)),
        "random bytes behind a gzip magic": (st.binary(max_size=256), lambda d: t.check_any_bytes(scratch, b"\x1f\x8b" + d)),
        "valid files": (t.small_idx_bytes(), lambda d: t.check_any_bytes(scratch, d)),
        "mutated valid files": (t.mutated_idx(), lambda d: t.check_any_bytes(scratch, d)),
        "headers claiming anything": (t.wild_headers(), lambda d: t.check_any_bytes(scratch, d)),
        "mutated MNIST splits (load_mnist)": (t.mutated_mnist_split(), lambda s: t.check_mnist_split(scratch, *s)),
    }
    for name, (strategy, check) in properties.items():
        count = [0]
        body = _body(check, count, outcomes, scratch, split="MNIST" in name)
        test = settings(max_examples=examples, deadline=None, database=None,
                        suppress_health_check=list(HealthCheck))(given(strategy)(body))
        if seed is not None:
            from hypothesis import seed as hseed

            test = hseed(seed)(test)
        started = time.perf_counter()
        test()
        print(f"  {name:<36} {count[0]:>9,} inputs in {time.perf_counter() - started:6.1f}s", flush=True)
        outcomes["total"] += count[0]
    return outcomes


def _body(check, count, outcomes, scratch: Path, split: bool):
    def body(data):
        count[0] += 1
        check(data)
        outcomes["split checked" if split else _outcome(scratch)] += 1

    return body


def _outcome(scratch: Path) -> str:
    try:
        read_idx(scratch / "f")
        return "parsed"
    except DataError:
        return "DataError"


def run_atheris(argv: list[str], scratch: Path) -> None:
    import atheris  # optional: pip install atheris

    path = scratch / "f"

    def one(data: bytes) -> None:
        path.write_bytes(data)
        try:
            read_idx(path)
        except DataError:
            pass

    atheris.Setup([sys.argv[0], *argv], one)
    atheris.Fuzz()


def fuzz(examples: int = 20_000, seed: int = None, atheris: bool = False, atheris_args: str = "") -> None:
    """Fuzz deepnet.formats.idx with the test suite's properties; prints how many inputs ran and how they ended.

    Args:
        examples: hypothesis examples per property.
        seed: hypothesis seed (default: random).
        atheris: coverage-guided fuzzing with atheris (pip install atheris) instead of hypothesis.
        atheris_args: libFuzzer flags for atheris, separated by spaces (e.g. "-runs=1000000").
    """
    positive("examples", examples)
    with tempfile.TemporaryDirectory(prefix="deepnet-fuzz-") as tmp:
        scratch = Path(tmp)
        if atheris:
            run_atheris(str(atheris_args).split(), scratch)
            return
        print(f"fuzzing deepnet.formats.idx: {examples:,} examples per property")
        outcomes = run_hypothesis(examples, scratch, seed)
    total = outcomes.pop("total")
    print(f"{total:,} inputs, no failure; outcomes: {dict(outcomes)}")


if __name__ == "__main__":
    devcli.run(fuzz, "fuzz_idx")
