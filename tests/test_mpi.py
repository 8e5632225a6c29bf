"""`mpiexec -n P deepnet train`: the depth split run by real MPI ranks on this machine (oversubscribed).

Against one process: the same model, seed and steps give the same weights (bit for bit with one
micro-batch, to float32 rounding with more, bit for bit between two runs of the same P and M). Faults:
a rank killed with SIGKILL at random moments leaves a root that resumes to the uninterrupted result; a
stopped (hung) rank ends the job with an error naming it; bad set-ups get one line.
"""

from __future__ import annotations

import os
import random
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
from deepnet.formats.locking import flock
from helpers import MNIST_DIR, have_mnist

MPIEXEC = shutil.which("mpiexec", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")

pytestmark = [pytest.mark.skipif(not have_mnist(), reason=f"MNIST is not in {MNIST_DIR}"),
              pytest.mark.skipif(MPIEXEC is None, reason="no mpiexec (pip install -e '.[mpi]')")]

LAYERS = 600
RUN = ["--batch", "16", "--train-limit", "2000", "--test-samples", "0", "--report-every", "5", "--quiet"]


def mpiexec(ranks: int, *args: str, timeout: float = 180, env: dict | None = None, cwd: Path | None = None,
            **popen) -> subprocess.CompletedProcess:
    return subprocess.run([MPIEXEC, "-n", str(ranks), sys.executable, "-m", "deepnet", *args],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
                          cwd=cwd, stdin=subprocess.DEVNULL, **popen)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mpi") / "base.h5"
    deepnet.init(path, layers=LAYERS, width=4, activation="softsign", seed=5)
    return path


def one_process(base: Path, tmp_path: Path, steps: int) -> Path:
    path = tmp_path / "single.h5"
    shutil.copy(base, path)
    deepnet.train(path, steps=steps, batch=16, train_limit=2000, test_samples=0)
    return path


def split(base: Path, tmp_path: Path, ranks: int, name: str = "root") -> Path:
    root = tmp_path / f"{name}.h5"
    shards.shard_model(base, ranks, root)
    return root


def state(path: Path) -> tuple[np.ndarray, dict, int, dict | None]:
    if shards.is_sharded(path):
        out = path.with_name(path.stem + ".gathered.h5")
        shards.gather_model(path, out, overwrite=True)
        path = out
    with ModelFile.open(path) as f:
        return f.read_core(), f.read_heads(), f.step, f.rng_state


@pytest.mark.parametrize("ranks", [2, 3])
def test_p_ranks_with_one_micro_batch_equal_one_process_bit_for_bit(base, tmp_path, ranks):
    root = split(base, tmp_path, ranks)
    proc = mpiexec(ranks, "train", str(root), "--steps", "6", "--micro-batches", "1", *RUN)
    assert proc.returncode == 0, proc.stderr
    core, heads, step, rng = state(root)
    want_core, want_heads, want_step, want_rng = state(one_process(base, tmp_path, 6))
    assert step == want_step == 6 and rng == want_rng
    assert np.array_equal(core, want_core)
    assert all(np.array_equal(heads[k], want_heads[k]) for k in heads)


@pytest.mark.parametrize("ranks,micro", [(2, 2), (3, 2)])
def test_micro_batches_equal_one_process_to_rounding_and_repeat_exactly(base, tmp_path, ranks, micro):
    roots = [split(base, tmp_path, ranks, f"root{i}") for i in range(2)]
    for root in roots:
        proc = mpiexec(ranks, "train", str(root), "--steps", "6", "--micro-batches", str(micro), *RUN)
        assert proc.returncode == 0, proc.stderr
    (core, heads, _, _), (again, again_heads, _, _) = state(roots[0]), state(roots[1])
    assert np.array_equal(core, again) and all(np.array_equal(heads[k], again_heads[k]) for k in heads)
    want_core, want_heads, _, _ = state(one_process(base, tmp_path, 6))
    with ModelFile.open(base) as f:
        moved = np.abs(want_core - f.read_core()).max()
    assert 0 < np.abs(core - want_core).max() <= 1e-3 * moved
    for k in heads:
        np.testing.assert_allclose(heads[k], want_heads[k], rtol=1e-4, atol=1e-6)


def test_a_new_model_over_ranks_has_the_one_process_model_s_weights(tmp_path):
    root = tmp_path / "new.h5"
    proc = mpiexec(2, "train", str(root), "--layers", "300", "--seed", "9", "--steps", "2", "--micro-batches", "1",
                   *RUN)
    assert proc.returncode == 0, proc.stderr
    single = tmp_path / "single.h5"
    deepnet.train(single, layers=300, seed=9, steps=2, batch=16, train_limit=2000, test_samples=0)
    assert np.array_equal(state(root)[0], state(single)[0])


def _rank_pids(marker: str) -> dict[int, int]:
    """The ranks of the running job whose command line names ``marker``: rank -> pid."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker.encode() in cmdline and any(a.endswith(b"python") or b"python3" in a for a in cmdline[:1]):
            for item in environ:
                if item.startswith(b"PMI_RANK="):
                    out[int(item.split(b"=", 1)[1])] = int(entry.name)
    return out


def test_a_rank_killed_at_random_moments_loses_nothing_and_resume_finishes_exactly(base, tmp_path):
    root = split(base, tmp_path, 2)
    line = ["train", str(root), "--until-step", "40", "--micro-batches", "1", "--checkpoint-every", "3", *RUN]
    rand = random.Random(11)
    kills = 0
    while kills < 3:
        job = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, "-m", "deepnet", *line],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(rand.uniform(1.5, 3.0))  # start-up takes about a second: kills land mid-run
        pids = _rank_pids(str(root))
        if pids:
            os.kill(pids[rand.choice(sorted(pids))], signal.SIGKILL)
            kills += 1
        _, err = job.communicate(timeout=120)  # the job ends: no rank waits forever
        with ModelFile.open(root) as f:
            assert 0 <= f.step <= 40
        assert shards.open_root(root).read_core(0).shape[0] > 0  # every committed shard is there
        if not pids:
            break  # the run finished before the kill
    proc = mpiexec(2, *line)
    assert proc.returncode == 0, proc.stderr
    want_core, want_heads, _, _ = state(one_process(base, tmp_path, 40))
    core, heads, step, _ = state(root)
    assert step == 40 and np.array_equal(core, want_core)
    assert all(np.array_equal(heads[k], want_heads[k]) for k in heads)
    assert not shards.remove_stale_versions(root)  # nothing stray is left after the last run


def test_a_hung_rank_ends_the_job_with_an_error_naming_it(base, tmp_path):
    root = split(base, tmp_path, 2)
    job = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, "-m", "deepnet", "train", str(root), "--steps",
                            "100000", "--rank-timeout", "3", *RUN], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    pids = {}
    while len(pids) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
        pids = _rank_pids(str(root))
    time.sleep(1.5)
    os.kill(pids[1], signal.SIGSTOP)
    try:
        _, err = job.communicate(timeout=90)
    finally:
        for pid in pids.values():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    assert job.returncode != 0
    assert "waited 3 s for" in err and "from rank 1, which died or hangs" in err, err
    with ModelFile.open(root) as f:
        assert f.step >= 0  # the root is a committed step


def test_an_aborting_rank_s_error_line_reaches_the_launcher_s_output():
    # Hydra ends the job on MPI_Abort and could drop the line still in the rank's pipe (rank 1 idles like
    # a hung rank); twenty runs in a row make such a loss all but certain to show.
    script = ("import sys, time\nfrom mpi4py import MPI\nfrom deepnet.distributed.mpi import Ranks\n"
              "ranks = Ranks(MPI.COMM_WORLD)\nif ranks.rank == 1:\n    time.sleep(60)\ntime.sleep(0.2)\n"
              "print('rank 0 gives up: the line that says why', file=sys.stderr)\nranks.abort(3)\n")
    for _ in range(20):
        proc = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-c", script], capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL)
        assert proc.returncode != 0 and "rank 0 gives up: the line that says why" in proc.stderr, proc.stderr


@pytest.mark.parametrize("case", ["more-ranks-than-layers", "ranks-disagree", "one-file-model", "missing-shard",
                                  "no-mpi4py", "second-run"])
def test_bad_set_ups_are_one_line(base, tmp_path, case):
    env, ranks, held = None, 2, None
    if case == "more-ranks-than-layers":
        target, ranks, extra = tmp_path / "new.h5", 3, ["--layers", "2"]
        expect = "ranks (3) must not exceed layers (2)"
    elif case == "ranks-disagree":
        target, ranks, extra = split(base, tmp_path, 2), 3, []
        expect = "has 2 shards but mpiexec started 3 ranks"
    elif case == "one-file-model":
        target, extra = tmp_path / "plain.h5", []
        shutil.copy(base, target)
        expect = "is a one-file model; split it for 2 ranks first: deepnet shard"
    elif case == "missing-shard":
        target, extra = split(base, tmp_path, 2), []
        victim = sorted((tmp_path / "root.shards").glob("r1-*"))[0]
        victim.unlink()
        expect = victim.name
    elif case == "second-run":  # another job holds the model (its rank 0's lock on the shards' directory)
        target, extra = split(base, tmp_path, 2), []
        held = flock(str(tmp_path / "root.shards"), exclusive=True)
        expect = "is being trained by another run"
    else:
        target, extra = split(base, tmp_path, 2), []
        shim = tmp_path / "shim" / "mpi4py"
        shim.mkdir(parents=True)
        (shim / "__init__.py").write_text("raise ImportError('not installed')\n")
        env = {"PYTHONPATH": os.pathsep.join([str(shim.parent), os.environ.get("PYTHONPATH", "")])}
        expect = "mpi4py is not installed (pip install -e \".[mpi]\")"
    before = sorted(p.name for p in tmp_path.rglob("*"))
    try:
        proc = mpiexec(ranks, "train", str(target), "--steps", "1", *extra, *RUN, env=env)
    finally:
        if held is not None:
            os.close(held)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("deepnet: error:")]
    assert errors and expect in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


def test_a_schedule_over_ranks_is_the_one_process_schedule_and_continues(base, tmp_path):
    """Learning-rate schedules resolve, store and continue as in one process: a cosine run with warmup,
    stopped half-way and continued with the same command, equals one process's uninterrupted run."""
    root = split(base, tmp_path, 2)
    schedule = ["--schedule", "cosine", "--warmup", "2", "--decay-steps", "8", "--micro-batches", "1", *RUN]
    for until in ("4", "8"):  # the second run's flags resolve to the stored schedule: it continues
        proc = mpiexec(2, "train", str(root), "--until-step", until, *schedule)
        assert proc.returncode == 0, proc.stderr
    single = tmp_path / "single.h5"
    shutil.copy(base, single)
    deepnet.train(single, until_step=8, schedule="cosine", warmup=2, decay_steps=8, batch=16, train_limit=2000,
                  test_samples=0)
    core, heads, step, _ = state(root)
    want_core, want_heads, want_step, _ = state(single)
    assert step == want_step == 8 and np.array_equal(core, want_core)
    assert all(np.array_equal(heads[k], want_heads[k]) for k in heads)
