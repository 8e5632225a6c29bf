"""Crash safety: `deepnet train` SIGKILLed at random moments (seeded) never loses or silently corrupts
its model file, and training resumes to exactly the result of an uninterrupted run.

See tests/crash_harness.py for what is checked after each kill; bench/crash_soak.py runs many more.
"""

from __future__ import annotations

import numpy as np
import pytest

from crash_harness import (CrashSetup, build_reference, crash_campaign, create_model, make_small_mnist,
                           run_to_end)
from deepnet.formats.hdf5 import ModelFile
from helpers import MNIST_DIR, have_mnist

pytestmark = pytest.mark.skipif(not have_mnist(), reason=f"MNIST is not in {MNIST_DIR}")

KILLS_PER_MODE = 20


@pytest.fixture(scope="module")
def crash_env(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("crash")
    setup = CrashSetup(workdir=workdir, mnist_dir=MNIST_DIR)
    make_small_mnist(MNIST_DIR, setup.data_dir, setup.n_train, setup.n_test)
    fresh = create_model(setup, workdir / "fresh.h5")
    ref = build_reference(setup, workdir / "reference.h5")
    return setup, fresh, ref


@pytest.mark.parametrize("in_memory", [False, True], ids=["streamed", "in-memory"])
def test_reference_is_what_deepnet_train_computes(crash_env, in_memory):
    """The reference fingerprints (an API loop) are those of a real uninterrupted `deepnet train` run."""
    setup, fresh, ref = crash_env
    path = setup.workdir / f"uninterrupted-{in_memory}.h5"
    path.write_bytes(fresh.read_bytes())
    run_to_end(setup, path, in_memory=in_memory)
    with ModelFile.open(path) as f:
        assert f.step == setup.steps
        assert np.array_equal(f.read_core(), ref.final_core)


@pytest.mark.parametrize("in_memory, seed", [(False, 1), (True, 2)], ids=["streamed", "in-memory"])
def test_random_kills(crash_env, in_memory, seed, capsys):
    setup, fresh, ref = crash_env
    stats = crash_campaign(setup, ref, fresh, in_memory=in_memory, kills=KILLS_PER_MODE, seed=seed)
    with capsys.disabled():
        print(f"\n[crash] {'in-memory' if in_memory else 'streamed'}: {stats}")
    assert stats.kills >= KILLS_PER_MODE
    assert stats.healthy + stats.torn == stats.kills
    if not in_memory:
        assert stats.torn > 0, "no kill landed in a backward pass: the test would not test torn steps"
