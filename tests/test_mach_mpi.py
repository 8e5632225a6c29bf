"""`mpiexec -n S deepnet train --mode mach`: Mach sections as real MPI ranks on this machine (oversubscribed).

The synchronous configuration against one process bit for bit; a small Mach run learning MNIST at every
section's head, its heads and distilled models saved and evaluated again from the file; Ctrl-C, a killed
section and resuming; one-line refusals.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import deepnet
from deepnet.formats import shards
from deepnet.formats.hdf5 import ModelFile
from helpers import MNIST_DIR, have_mnist

MPIEXEC = shutil.which("mpiexec", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")

pytestmark = [pytest.mark.skipif(not have_mnist(), reason=f"MNIST is not in {MNIST_DIR}"),
              pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install -e '.[mpi]')")]

RUN = ["--batch", "16", "--train-limit", "2000", "--report-every", "50", "--no-progress"]


def command(ranks: int, *args: str) -> list[str]:
    return [MPIEXEC, "-n", str(ranks), sys.executable, "-m", "deepnet", *args]


def mpiexec(ranks: int, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(command(ranks, *args), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def final_of(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")][-1]


def test_the_synchronous_configuration_is_exact_sgd_bit_for_bit(tmp_path):
    base = tmp_path / "base.h5"
    deepnet.init(base, layers=600, width=4, activation="softsign", seed=5)
    one = tmp_path / "one.h5"
    shutil.copy(base, one)
    deepnet.train(one, steps=12, batch=16, train_limit=2000, test_samples=0)
    root = tmp_path / "root.h5"
    shards.shard_model(base, 3, root)
    final = final_of(mpiexec(3, "train", str(root), "--mode", "mach", "--sections", "3", "--mach-inputs", "real",
                             "--max-delay", "0", "--local-weight", "0", "--steps", "12", "--test-samples", "0",
                             "--json", *RUN))
    assert final["step"] == 12
    with ModelFile.open(one) as f:
        want_core, want_heads = f.read_core(), f.read_heads()
    with shards.open_root(root) as m:
        core = np.concatenate([m.read_core(i) for i in range(3)])
        heads = m.file.read_heads()
    assert np.array_equal(core, want_core)
    assert all(np.array_equal(heads[k], want_heads[k]) for k in want_heads)


@pytest.fixture(scope="module")
def learned(tmp_path_factory) -> tuple[Path, dict]:
    """4 sections of 25k layers, 400 steps each."""
    root = tmp_path_factory.mktemp("mach") / "mach.h5"
    proc = mpiexec(4, "train", str(root), "--mode", "mach", "--sections", "4", "--layers", "100000", "--steps", "400",
                   "--test-samples", "2000", "--json", *RUN)
    return root, final_of(proc)


def test_a_small_mach_run_learns_at_every_sections_head(learned):
    root, final = learned
    assert final["mode"] == "mach" and final["sections"] == 4 and final["step"] == 400
    per = final["per_section"]
    assert [p["layers"] for p in per] == [25_000] * 4
    for p in per:
        assert p["steps"] == 400
        assert p["test_acc"] > 0.3, p                     # chance is 0.1
        if p["section"] > 0:
            assert p["synthetic_test_acc"] > 0.3, p
            assert p["distill_steps"] > 0
        # with mixed inputs and a delay bound above zero, no section waits for another
        assert p["blocked_seconds"] == 0.0
    assert per[0]["real_inputs"] == 400 and per[-1]["late_applied"] == 0


def test_the_heads_and_distilled_models_are_saved_and_evaluate_again(learned):
    root, final = learned
    for p in final["per_section"]:
        k = p["section"]
        again = deepnet.evaluate(root, section=k, test_samples=2000)
        assert again["accuracy"] == pytest.approx(p["test_acc"], abs=1e-9)
        if k > 0:
            shortcut = deepnet.evaluate(root, section=k, synthetic=True, test_samples=2000)
            assert shortcut["accuracy"] == pytest.approx(p["synthetic_test_acc"], abs=1e-9)
            assert shortcut["layers"] == 25_000
    whole = deepnet.evaluate(root, test_samples=2000)
    assert whole["accuracy"] == pytest.approx(final["test_acc"], abs=1e-9)
    assert deepnet.check(root).healthy


def _row(line: str) -> tuple[int, int] | None:
    """(section, step) of a report row, None for any other line."""
    fields = line.split()
    if len(fields) > 2 and fields[0].isdigit() and fields[1].isdigit():
        return int(fields[0]), int(fields[1])
    return None


def long_run(root: Path, *extra: str, until_step: int, section: int | None = None,
             every_section: bool = False) -> subprocess.Popen:
    """A long 3-section run of ``root`` in the background, returned once a report row shows ``until_step``
    (of ``section``, of any section, or, with ``every_section``, once every section's rows have). The
    sections run at different speeds (on a Zen 4 the top one reported step 300 before the bottom one's
    first checkpoint, and in another run section 0 reached 300 before the root held a round), so one's
    step says nothing of another's."""
    proc = subprocess.Popen(command(3, "train", str(root), "--mode", "mach", "--sections", "3", "--layers", "30000",
                                    "--steps", "1000000", "--test-samples", "0", "--rank-timeout", "60", *extra,
                                    *RUN),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    reached: dict[int, int] = {}
    while time.monotonic() < deadline:
        row = _row(proc.stdout.readline())
        if row is None:
            continue
        reached[row[0]] = max(reached.get(row[0], 0), row[1])
        if every_section:
            if len(reached) == 3 and min(reached.values()) >= until_step:
                break
        elif row[1] >= until_step and section in (None, row[0]):
            break
    return proc


def test_ctrl_c_saves_every_section_at_one_step_and_the_run_resumes(tmp_path):
    root = tmp_path / "s.h5"
    proc = long_run(root, until_step=50)
    # The first row comes from whichever section got there first; another may still be starting: it
    # takes part in the stop all the same.
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err[-2000:]
    assert "holds step" in err
    check = deepnet.check(root)
    assert check.healthy
    with shards.open_root(root) as m:
        step = m.step
    assert step > 0
    final = final_of(mpiexec(3, "train", str(root), "--mode", "mach", "--sections", "3", "--until-step",
                             str(step + 20), "--test-samples", "0", "--json", *RUN))
    assert final["step"] == step + 20 and final["steps"] == 20


def test_a_killed_section_leaves_the_last_round_and_the_run_resumes(tmp_path):
    root = tmp_path / "k.h5"
    # every section past its second checkpoint: the round of step 100 is complete in the root
    proc = long_run(root, "--checkpoint-every", "100", until_step=200, every_section=True)
    victims = subprocess.run(["pgrep", "-f", f"deepnet train {root}"], capture_output=True, text=True).stdout.split()
    os.kill(int(victims[-1]), signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    with shards.open_root(root) as m:
        step = m.step
    assert step >= 100 and step % 100 == 0
    final = final_of(mpiexec(3, "train", str(root), "--mode", "mach", "--sections", "3", "--steps", "30",
                             "--test-samples", "0", "--json", *RUN))
    assert final["step"] == step + 30
    assert deepnet.check(root).healthy


def test_a_sections_count_other_than_the_ranks_is_one_line(tmp_path):
    proc = mpiexec(2, "train", str(tmp_path / "m.h5"), "--mode", "mach", "--sections", "3", "--layers", "100")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["deepnet: error: --sections 3 but mpiexec started 2 ranks (one per section)"]
    assert not (tmp_path / "m.h5").exists()
