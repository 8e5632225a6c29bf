"""The builds of the kernels (portable; AVX2+FMA and AVX-512 on x86-64) and how one is picked at run time.

That each build computes what the float64 reference does is tested with the kernels themselves
(test_exactness, test_activation_accuracy, test_threads and test_eval_path run every build this CPU runs);
here: the choice of build, its refusals, and one whole training step per build against the same step on
the portable build.
"""

from __future__ import annotations

import numpy as np
import pytest

from deepnet import DeepNet
from deepnet.kernels import builds
from deepnet.kernels import jit as compile_activation
from deepnet.errors import ActivationError
from deepnet.kernels.loader import KERNELS_ENV, build_label, builtin_module, kernels_for, runnable_builds
from helpers import kernel_builds, make_model, read_weights
from reference import assert_close


def build_of(module) -> builds.KernelBuild:
    """The entry of deepnet.kernels.builds that a loaded kernel module was built from."""
    return next(b for b in builds.ALL_BUILDS if module.__name__ == f"deepnet.{b.module}")


@pytest.fixture
def fresh_choice(monkeypatch):
    """builtin_module() is cached per process; clear it around a test that changes what it sees."""
    monkeypatch.delenv(KERNELS_ENV, raising=False)
    builtin_module.cache_clear()
    yield monkeypatch
    builtin_module.cache_clear()


def test_each_build_reports_what_it_was_built_for():
    portable = builtin_module("portable")
    assert portable.BUILT_FOR in ("sse2", "avx", "neon", "generic", "avx2+fma", "avx512")
    for module in runnable_builds()[1:]:
        build = build_of(module)
        assert module.BUILT_FOR == build.built_for
        assert getattr(portable, build.cpu_check)()  # loaded only because the CPU said it runs it
    assert build_label(portable) == f"_kernels ({portable.BUILT_FOR})"


def test_auto_takes_the_fastest_build_this_cpu_runs(fresh_choice):
    found = runnable_builds()
    assert found[0] is builtin_module("portable")
    assert builtin_module() is found[-1] and builtin_module("auto") is found[-1]
    portable = found[0]
    if portable.cpu_has_avx512():
        assert builtin_module().BUILT_FOR == "avx512" or len(found) == 1  # one -march build holds it all
    elif portable.cpu_has_avx2_fma():
        assert builtin_module().BUILT_FOR == "avx2+fma" or len(found) == 1


def test_the_environment_picks_a_build(fresh_choice):
    for module in runnable_builds():
        name = build_of(module).name
        fresh_choice.setenv(KERNELS_ENV, f" {name.upper()} ")
        builtin_module.cache_clear()
        assert builtin_module() is module
        assert kernels_for("softsign").module is module


def test_a_bad_choice_is_refused_naming_the_choices(fresh_choice):
    fresh_choice.setenv(KERNELS_ENV, "avx1024")
    with pytest.raises(ActivationError, match=r"DEEPNET_KERNELS must be one of auto, portable, avx2, avx512, not 'avx1024'"):
        builtin_module()


@pytest.mark.parametrize("build", builds.X86_BUILDS, ids=lambda b: b.name)
def test_a_build_the_cpu_lacks_is_never_loaded(fresh_choice, build):
    """A CPU without the instructions: auto falls back, naming the build is refused (no SIGILL ever)."""
    portable = builtin_module("portable")
    if build.cpu_check and hasattr(portable, build.cpu_check):
        fresh_choice.setattr(portable, build.cpu_check, lambda: False)
    builtin_module.cache_clear()
    with pytest.raises(ActivationError, match=rf"DEEPNET_KERNELS={build.name} but this CPU or this build has no {build.name} kernels"):
        builtin_module(build.name)
    assert builtin_module().BUILT_FOR != build.built_for or builtin_module() is portable
    assert all(m.__name__ != f"deepnet.{build.module}" for m in runnable_builds())


def test_plugins_compile_with_the_flags_of_the_build_in_use(fresh_choice):
    flags = compile_activation.compile_flags()
    assert flags[:len(builds.BASE_FLAGS)] == list(builds.BASE_FLAGS)
    expected = builds.flags_for(builtin_module().BUILT_FOR)
    assert flags[len(builds.BASE_FLAGS):len(builds.BASE_FLAGS) + len(expected)] == list(expected)
    if builtin_module().BUILT_FOR == "avx512":
        assert "-mavx512f" in flags and "-mfma" in flags


@pytest.mark.parametrize("activation", ["softsign", "tanh", "relu"])
def test_a_training_step_is_the_same_on_every_build(tmp_path, fresh_choice, activation):
    """The fast builds against the portable fallback: one whole step (forward, backward, update of every
    layer and head) on the same model and minibatch agrees to float32 tolerance."""
    modules = kernel_builds()
    if len(modules) < 2:
        pytest.skip("this CPU runs only the portable build")
    rng = np.random.default_rng(7)
    x = rng.random((16, 784), dtype=np.float32)
    y = rng.integers(0, 10, size=16)
    _, init_core = read_weights(make_model(tmp_path / "init.h5", layers=3000, width=4, activation=activation, seed=3))
    results = {}
    for module in modules:
        name = build_of(module).name
        fresh_choice.setenv(KERNELS_ENV, name)
        builtin_module.cache_clear()
        path = tmp_path / f"{name}.h5"
        make_model(path, layers=3000, width=4, activation=activation, seed=3)
        with DeepNet.open(path, writable=True, chunk_layers=700) as net:
            assert net.kernels.module is module
            loss = net.train_step(x, y, layer_lr=0.05, head_lr=0.05).loss
            net.save()
        results[name] = (loss, read_weights(path))
    base_loss, (base_heads, base_core) = results["portable"]
    for name, (loss, (heads, core)) in results.items():
        assert abs(loss - base_loss) <= 1e-5 * abs(base_loss), name
        assert_close(core, base_core, what=f"{name} core")
        # the step's own change to the core (~1e-4 against weights of ~0.5) agrees too, not just the sum
        assert_close(core - init_core, base_core - init_core, rtol=1e-3, what=f"{name} core update")
        for key in base_heads:
            assert_close(heads[key], base_heads[key], what=f"{name} {key}")


def test_every_file_a_kernel_build_reads_is_package_data():
    """setup.py and a plugin's compile read the template, the runtime headers and the plugin's .pyx from
    the installed package: each must be listed as package data, or an installed deepnet cannot use it."""
    from pathlib import Path

    from deepnet.kernels import template

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    root = Path(__file__).resolve().parent.parent
    data = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    needed = [template.TEMPLATE_PATH, template.RUNTIME_HEADER, template.RUNTIME_PXD, template.DRIVER_HEADER,
              template.PLUGIN_C]
    for path in needed:
        assert path.exists() and path.name in data["deepnet.kernels"], path.name
