"""The activation registry (deepnet.activations): definitions, register/get/available, the entry-point
plugins' discovery and rules, and every built-in's compiled kernel against its NumPy definition, its own
finite differences, and the float64 reference step.

Nothing here compiles a kernel: built-ins run from the package's compiled module (a built-in that the
installed build predates is skipped with a note to rebuild); compiled plugins are tests/test_plugins.py.
"""

from __future__ import annotations

import dataclasses
import sys
import textwrap
import warnings

import numpy as np
import pytest

from deepnet import DeepNet, ModelFile, activations
from deepnet.activations import BUILTINS, Activation, plugins
from deepnet.activations import registry as activation_registry
from deepnet.activations import check as check_module
from deepnet.activations.check import check_kernels, kernel_act_and_grad
from deepnet.errors import ActivationError, DeepnetError, ModelFileError
from deepnet.kernels.loader import LayerKernels, builtin_module, in_builtin_module, kernels_for
from helpers import kernel_builds, make_model, read_weights
from reference import Model64, assert_close, train_step

BUILTIN_NAMES = ["tanh", "softsign", "relu", "identity", "leaky_relu", "hardtanh", "silu", "gelu", "sin"]


def _softsign_np(z):
    return z / (1.0 + np.abs(z))


def make(name="thing", forward_c="z", derivative_c="1.0f", **kw) -> Activation:
    return Activation(name=name, forward_c=forward_c, derivative_c=derivative_c,
                      forward_np=kw.pop("forward_np", lambda z: z),
                      derivative_np=kw.pop("derivative_np", lambda z, a: np.ones_like(z)), **kw)


@pytest.fixture
def registry():
    """The registry, restored (built-ins, plugins, errors, loaded flag) after the test."""
    saved = activation_registry.snapshot()
    saved_state = (plugins._loaded, list(plugins._errors), list(plugins._plugin_names), set(plugins._warned),
                   dict(plugins._packages))
    yield activations
    activation_registry.restore(saved)
    plugins._loaded, errors, names, warned, packages = saved_state
    plugins._errors[:] = errors
    plugins._plugin_names[:] = names
    plugins._warned.clear()
    plugins._warned.update(warned)
    plugins._packages.clear()
    plugins._packages.update(packages)


# -------------------------------------------------------------------------------------------------
# definitions


@pytest.mark.parametrize("name", ["", "Tanh", "1relu", "_x", "soft-sign", "a" * 33, "naïve", None, 3])
def test_invalid_names_are_refused(name):
    with pytest.raises(ActivationError, match="invalid activation name"):
        make(name=name)


@pytest.mark.parametrize("expr", ["", "  ", "z; system(0)", "z } int x { ", "z /* c */", "z // c", "z\n",
                                  '"""', "'a'", "#define", "z \\", "(z", "z)) + ((z", "a[0)]"])
def test_expressions_that_could_escape_their_function_are_refused(expr):
    with pytest.raises(ActivationError, match="forward_c"):
        make(forward_c=expr)
    with pytest.raises(ActivationError, match="derivative_c"):
        make(derivative_c=expr)


def test_numpy_functions_and_description_are_checked():
    with pytest.raises(ActivationError, match="forward_np"):
        Activation("x", "z", "1.0f", forward_np=None, derivative_np=lambda z, a: z)
    with pytest.raises(ActivationError, match="one line"):
        make(description="two\nlines")


def test_definition_equality_ignores_origin_and_numpy():
    a = make(origin="pkg-a")
    b = make(origin="pkg-b", forward_np=np.array)
    assert a == b and a != make(forward_c="z * 1.0f")


# -------------------------------------------------------------------------------------------------
# register / get / available


def test_builtins():
    assert [a.name for a in BUILTINS] == BUILTIN_NAMES
    for act in BUILTINS:
        assert act.origin == "built-in" and activations.is_builtin(act) and act.description
        assert activations.get(act.name) is act
    assert set(BUILTIN_NAMES) <= set(activations.available())
    assert activations.available() == sorted(activations.available())


def test_register_get_and_replace(registry):
    act = activations.register(make(name="reg_test"))
    assert act.origin == __name__  # the registering module
    assert activations.get("reg_test") is act and "reg_test" in activations.available()
    with pytest.raises(ActivationError, match="already registered"):
        activations.register(make(name="reg_test", forward_c="z * 2.0f"))
    newer = activations.register(make(name="reg_test", forward_c="z * 2.0f", origin="mine"), replace=True)
    assert activations.get("reg_test") is newer and newer.origin == "mine"
    with pytest.raises(ActivationError, match="takes an Activation"):
        activations.register("relu")


def test_replacing_a_builtin_does_not_use_the_stale_compiled_kernel(registry):
    activations.register(make(name="relu", forward_c="z", description="not relu"), replace=True)
    assert not activations.is_builtin(activations.get("relu"))
    assert not in_builtin_module(activations.get("relu"))  # kernels_for would compile the new definition


def test_unknown_name_names_it_and_the_installed_ones():
    with pytest.raises(ActivationError) as err:
        activations.get("no_such_act")
    msg = str(err.value)
    assert "'no_such_act'" in msg and "installed:" in msg and "softsign" in msg and "\n" not in msg
    assert isinstance(err.value, DeepnetError)


def test_opening_a_model_with_an_unregistered_activation_fails_clearly(tmp_path, registry, monkeypatch):
    activations.register(make(name="gone_soon"))
    path = make_model(tmp_path / "m.h5", layers=3, width=2, activation="gone_soon", input_dim=4)
    with ModelFile.open(path) as f:  # registered from Python: no package to name
        assert f.activation_package is None
    activations.unregister("gone_soon")
    monkeypatch.setattr(plugins, "_loaded", True)
    with pytest.raises(ActivationError, match=r"'gone_soon' is not registered \(installed: .*softsign"):
        DeepNet.open(path)


# -------------------------------------------------------------------------------------------------
# plugins through entry points (fake entry points here; the example package in test_plugins.py)

PLUGIN_MODULE = textwrap.dedent('''
    import numpy as np
    from deepnet.activations import Activation

    def _act(name, fwd="z / (1.0f + fabsf(z))", der="(1.0f - fabsf(a)) * (1.0f - fabsf(a))"):
        return Activation(name, fwd, der, lambda z: z / (1 + np.abs(z)), lambda z, a: 1 / (1 + np.abs(z)) ** 2,
                          "a test plugin", origin="claimed-origin")

    SINGLE = _act("plug_single")
    MISNAMED = _act("plug_other")
    CLASH = _act("softsign")
    def many():
        return [_act("plug_many_a"), _act("plug_many_b")]
    def one():
        return _act("plug_one")
    def broken():
        raise RuntimeError("boom")
    def garbage():
        return [1, 2]
    NOT_AN_ACTIVATION = 42
''')


def _entry_points(tmp_path, monkeypatch, spec: dict[str, str]):
    (tmp_path / "fake_plugin_mod.py").write_text(PLUGIN_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    from importlib.metadata import EntryPoint

    eps = [EntryPoint(name, value, plugins.GROUP) for name, value in spec.items()]
    monkeypatch.setattr(plugins, "entry_points", lambda: eps)
    plugins._loaded = False
    plugins._errors.clear()
    plugins._plugin_names.clear()
    plugins._warned.clear()


def test_plugins_load_lazily_and_follow_the_contract(tmp_path, monkeypatch, registry):
    _entry_points(tmp_path, monkeypatch, {
        "plug_single": "fake_plugin_mod:SINGLE",      # an Activation named like its entry point
        "whatever": "fake_plugin_mod:many",           # a function returning a list
        "one": "fake_plugin_mod:one",                 # a function returning one Activation
        "misnamed": "fake_plugin_mod:MISNAMED",       # an Activation under another name: refused
        "softsign": "fake_plugin_mod:CLASH",          # a built-in's name: refused
        "broken": "fake_plugin_mod:broken",           # raises: recorded
        "garbage": "fake_plugin_mod:garbage",         # not Activations: recorded
        "number": "fake_plugin_mod:NOT_AN_ACTIVATION",
        "missing": "no_such_module_xyz:THING",        # import fails: recorded
    })
    assert activations.is_builtin(activations.get("softsign"))  # a registered name never loads the plugins
    assert not plugins._loaded
    with pytest.warns(RuntimeWarning, match="activation plugin not loaded"):
        act = activations.get("plug_many_b")  # an unknown name loads them
    assert act.origin == "fake_plugin_mod"  # constructed entry points have no distribution: the module
    names = activations.available()
    assert {"plug_single", "plug_many_a", "plug_many_b", "plug_one"} <= set(names)
    assert "plug_other" not in names
    assert activations.is_builtin(activations.get("softsign"))  # not replaced by the clashing plugin
    errors = plugins.errors()
    assert len(errors) == 6, errors
    for fragment in ("must be named after it", "'softsign', which is already registered (from built-in)",
                     "RuntimeError: boom", "returned int, int", "not an Activation", "failed to import"):
        assert any(fragment in e for e in errors), (fragment, errors)
    with pytest.raises(ActivationError, match="6 plugin.* failed to load.*boom"):
        activations.get("still_missing")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # loading again does not warn again
        plugins.reload()
    assert len(plugins.errors()) == 6 and "plug_single" in activations.available()


def test_two_plugins_with_one_name_first_wins(tmp_path, monkeypatch, registry):
    _entry_points(tmp_path, monkeypatch, {"one": "fake_plugin_mod:one", "again": "fake_plugin_mod2:one"})
    (tmp_path / "fake_plugin_mod2.py").write_text(PLUGIN_MODULE)
    with pytest.warns(RuntimeWarning, match="fake_plugin_mod2 provides activation 'plug_one', which is already "
                                            r"registered \(from fake_plugin_mod\): ignored"):
        assert activations.get("plug_one").origin == "fake_plugin_mod"


def test_plugin_discovery_through_installed_metadata(tmp_path, monkeypatch, registry):
    """A real distribution on sys.path (a dist-info directory, as pip installs one) is found by name."""
    site = tmp_path / "site"
    (site / "fake_acts").mkdir(parents=True)
    (site / "fake_acts" / "__init__.py").write_text(PLUGIN_MODULE)
    info = site / "fake_acts-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-acts\nVersion: 1.2\n")
    (info / "entry_points.txt").write_text("[deepnet.activations]\nplug_single = fake_acts:SINGLE\nmore = fake_acts:many\n")
    monkeypatch.syspath_prepend(str(site))
    plugins.reload()
    act = activations.get("plug_single")
    assert act.origin == "fake-acts"  # the distribution's name, whatever the plugin claimed
    assert activations.get("plug_many_a").origin == "fake-acts"
    assert not activations.is_builtin(act) and not in_builtin_module(act)
    monkeypatch.undo()
    plugins.reload()  # gone from sys.path: its activations are gone too
    assert "plug_single" not in activations.available()


# -------------------------------------------------------------------------------------------------
# a model file names the package of its plugin's activation (issue 19)


def _site(tmp_path, name: str, version: str, entry_points: str, dirname: str = "site"):
    """A directory holding the distribution ``name`` as pip installs it (a dist-info with entry points)."""
    site = tmp_path / dirname
    (site / "fake_acts").mkdir(parents=True)
    (site / "fake_acts" / "__init__.py").write_text(PLUGIN_MODULE)
    info = site / f"fake_acts-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text("[deepnet.activations]\n" + entry_points)
    return site


def _attrs(path) -> dict:
    import h5py

    with h5py.File(path, "r") as f:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}


def test_a_model_names_the_package_of_its_missing_plugin(tmp_path, monkeypatch, registry):
    site = _site(tmp_path, "fake-acts", "1.2", "plug_single = fake_acts:SINGLE\n")
    monkeypatch.syspath_prepend(str(site))
    plugins.reload()
    assert activations.package_of("plug_single") == activations.Package("fake-acts", "1.2")
    path = make_model(tmp_path / "m.h5", layers=3, width=2, activation="plug_single", input_dim=4)
    attrs = _attrs(path)
    assert attrs["activation_package"] == "fake-acts" and attrs["activation_package_version"] == "1.2"

    sys.path.remove(str(site))  # uninstalled
    plugins.reload()
    assert "plug_single" not in activations.available()
    with ModelFile.open(path) as f:  # the file still opens (info, check); only running it needs the plugin
        assert f.activation == "plug_single" and f.activation_package == activations.Package("fake-acts", "1.2")
    with pytest.raises(ActivationError) as err:
        DeepNet.open(path)
    assert str(err.value) == (f"{path} uses activation 'plug_single' from package fake-acts 1.2, which is not "
                              f"installed (pip install fake-acts)")

    # another version installed, without the activation: name both, and the version to install
    newer = _site(tmp_path, "fake-acts", "2.0", "one = fake_acts:one\n", dirname="site2")
    monkeypatch.syspath_prepend(str(newer))
    plugins.reload()
    with pytest.raises(ActivationError) as err:
        DeepNet.open(path)
    assert str(err.value) == (f"{path} uses activation 'plug_single' from package fake-acts 1.2, but the installed "
                              f"fake-acts 2.0 does not provide it (pip install 'fake-acts==1.2')")


def test_builtins_and_registered_activations_record_no_package(tmp_path, registry):
    """A built-in comes with deepnet itself, and one registered from Python with no package: neither file
    records a package, and such files (like those written before the attribute) give the usual error."""
    assert activations.package_of("softsign") is None and activations.package_of("no_such_act") is None
    path = make_model(tmp_path / "b.h5", layers=3, width=2, activation="softsign", input_dim=4)
    assert not {"activation_package", "activation_package_version"} & set(_attrs(path))
    activations.register(make(name="from_python"))
    assert activations.package_of("from_python") is None
    path = make_model(tmp_path / "p.h5", layers=3, width=2, activation="from_python", input_dim=4)
    assert not {"activation_package", "activation_package_version"} & set(_attrs(path))


def test_a_plugin_registered_by_hand_under_a_packages_name_is_not_attributed_to_it(tmp_path, monkeypatch,
                                                                                   registry):
    """The package is that of the very definition its plugin registered: replaced by register(), none."""
    monkeypatch.syspath_prepend(str(_site(tmp_path, "fake-acts", "1.2", "plug_single = fake_acts:SINGLE\n")))
    plugins.reload()
    assert activations.package_of("plug_single") is not None
    activations.register(make(name="plug_single", forward_c="z * 2.0f"), replace=True)
    assert activations.package_of("plug_single") is None


def test_import_raw_records_the_package_too(tmp_path, monkeypatch, registry):
    monkeypatch.syspath_prepend(str(_site(tmp_path, "fake-acts", "1.2", "plug_single = fake_acts:SINGLE\n")))
    plugins.reload()
    source = make_model(tmp_path / "m.h5", layers=3, width=2, activation="plug_single", input_dim=784)
    import deepnet

    deepnet.export_raw(source, head=tmp_path / "head.bin", weights=tmp_path / "weights.bin")
    deepnet.import_raw(tmp_path / "back.h5", head=tmp_path / "head.bin", weights=tmp_path / "weights.bin",
                       layers=3, width=2, activation="plug_single")
    attrs = _attrs(tmp_path / "back.h5")
    assert attrs["activation_package"] == "fake-acts" and attrs["activation_package_version"] == "1.2"


def test_a_package_attribute_that_is_not_text_is_refused_in_one_line(tmp_path):
    import h5py

    path = make_model(tmp_path / "m.h5", layers=3, width=2, activation="softsign", input_dim=4)
    with h5py.File(path, "r+") as f:
        f.attrs["activation_package"] = np.int64(3)
    with pytest.raises(ModelFileError, match=r"attribute activation_package is .*not a string$"):
        ModelFile.open(path)


# -------------------------------------------------------------------------------------------------
# every built-in: NumPy derivative, compiled kernel vs NumPy, check, and one exact training step

# The kernels approximate: (points, forward tolerance, derivative tolerance), errors absolute below
# |ref| = 1 and relative above. sin reduces its argument accurately only up to |z| ~ 1e4.
KERNEL_Z = np.concatenate([np.linspace(-20, 20, 8001), np.geomspace(1e-30, 1e30, 601), -np.geomspace(1e-30, 1e30, 601),
                           [0.0, -0.0, 88.0, -88.0, -89.5, 1e38, -1e38]]).astype(np.float32)
TOLERANCES = {
    "tanh": (1e-6, 2e-6), "softsign": (1e-6, 1e-6), "relu": (0, 0), "identity": (0, 0),
    "leaky_relu": (1e-7, 1e-7), "hardtanh": (0, 0), "silu": (1e-6, 1e-6), "gelu": (1e-6, 1e-6), "sin": (2e-7, 2e-7),
}
DOMAIN = {"sin": 1e4}


def builtin_kernels(name: str, module=None) -> LayerKernels:
    module = module or builtin_module()
    if name not in module.ACTIVATION_NAMES:
        pytest.skip(f"the installed build predates built-in {name!r}: rebuild (pip install -e .)")
    return LayerKernels(name, module, module.activation_index(name))


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_numpy_derivative_is_the_derivative_of_numpy_forward(name):
    act = activations.get(name)
    z = np.linspace(-6, 6, 1201)
    z = z[(np.abs(z) > 1e-3) & (np.abs(np.abs(z) - 1) > 1e-3)]  # the kinks of relu, leaky_relu, hardtanh
    eps = 1e-6
    fd = (act.forward_np(z + eps) - act.forward_np(z - eps)) / (2 * eps)
    np.testing.assert_allclose(act.derivative_np(z, act.forward_np(z)), fd, rtol=1e-6, atol=1e-8, err_msg=name)


@pytest.mark.parametrize("module", kernel_builds(), ids=lambda m: m.__name__)
@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_builtin_kernel_matches_numpy(name, module):
    act = activations.get(name)
    kernels = builtin_kernels(name, module)
    z = KERNEL_Z[np.abs(KERNEL_Z) <= DOMAIN.get(name, np.inf)]
    a, d = kernel_act_and_grad(kernels, z)
    z64 = z.astype(np.float64)
    with np.errstate(all="ignore"):
        a_ref = act.forward_np(z64)
        d_ref = act.derivative_np(z64, a_ref)
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(d)), name
    tol_a, tol_d = TOLERANCES[name]
    err_a = np.abs(a - a_ref) / np.maximum(1, np.abs(a_ref))
    err_d = np.abs(d - d_ref) / np.maximum(1, np.abs(d_ref))
    assert err_a.max() <= tol_a, (name, z[np.argmax(err_a)], err_a.max())
    assert err_d.max() <= tol_d, (name, z[np.argmax(err_d)], err_d.max())
    # Beyond its domain sin stays a bounded number; NaN stays NaN (relu maps it to 0).
    a_big, _ = kernel_act_and_grad(kernels, np.array([3e6, -1e30, 1e38, np.nan], np.float32))
    assert np.all(np.isfinite(a_big[:3])) and (np.isnan(a_big[3]) or name == "relu")
    if name in ("tanh", "softsign", "identity", "leaky_relu", "hardtanh", "silu", "gelu", "sin"):
        a0, _ = kernel_act_and_grad(kernels, np.array([-0.0], np.float32))
        assert a0[0] == 0 and np.signbit(a0[0]), "act(-0) must be -0"


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_builtin_passes_check(name):
    """The check of `deepnet activations check` on every built-in: the C derivative is the derivative."""
    comparisons = check_kernels(activations.get(name), builtin_kernels(name))
    assert all(c.ok for c in comparisons), comparisons


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_check_catches_a_wrong_derivative_of_each_builtin(name):
    """The same values with the derivative made wrong (x1.1 + 0.05) always fail the check."""
    act = activations.get(name)
    kernels = builtin_kernels(name)

    def wrong(z):
        a, d = kernel_act_and_grad(kernels, z)
        return a, (d * 1.1 + 0.05).astype(np.float32)

    comparisons = check_kernels(act, kernels, evaluate=wrong)
    assert not comparisons[0].ok and comparisons[0].worst_ratio > 10
    assert comparisons[1].ok and not comparisons[2].ok
    for c in comparisons:  # the ratio is the worst point's absolute error over its allowance
        assert c.at_z is not None or c.worst_ratio == 0
        if c.at_z is not None:
            assert c.worst_ratio == pytest.approx(c.abs_error / c.allowance, rel=1e-12)


def _numpy_ratios(act: Activation, evaluate, which: int) -> tuple[np.ndarray, np.ndarray]:
    """The grid and, computed here, each point's error over its allowance for comparison 1 (forward vs
    NumPy) or 2 (derivative vs NumPy): |C - NumPy| / (1e-4 * max(1, |NumPy|))."""
    z = check_module.grid()
    a, d = evaluate(z)
    z64 = z.astype(np.float64)
    ref = act.forward_np(z64) if which == 1 else act.derivative_np(z64, act.forward_np(z64))
    got = (a if which == 1 else d).astype(np.float64)
    return z, np.abs(got - ref) / (check_module.NUMPY_TOLERANCE * np.maximum(1.0, np.abs(ref)))


def test_check_reports_each_comparison_relative_to_its_allowance():
    """issue 19: a passing check read "worst error 0 at z -1000"; now each comparison reports its worst
    point as a fraction of that point's allowance, at the z where that fraction is largest."""
    act = activations.get("softsign")
    kernels = builtin_kernels("softsign")
    good = check_kernels(act, kernels)
    for c in good:
        assert 0 < c.worst_ratio <= 1 and c.ok and c.at_z is not None  # a margin, not zeros
        assert c.abs_error > 0 and c.allowance > 0 and c.worst_ratio == pytest.approx(c.abs_error / c.allowance)
    assert good[0].at_z != -1000.0  # no longer the first grid point by default
    for which in (1, 2):
        z, ratios = _numpy_ratios(act, lambda zs: kernel_act_and_grad(kernels, zs), which)
        assert good[which].worst_ratio == pytest.approx(ratios.max(), rel=1e-9)
        assert good[which].at_z == float(z[np.argmax(ratios)])

    def wrong(zs):  # the derivative 1 - |a| of softsign_wrong: off by |a|(1 - |a|), a quarter at |z| = 1
        a, _ = kernel_act_and_grad(kernels, zs)
        return a, (1.0 - np.abs(a)).astype(np.float32)

    bad = check_kernels(act, kernels, evaluate=wrong)
    assert not bad[0].ok and not bad[2].ok and bad[1].ok
    for c in (bad[0], bad[2]):
        assert c.worst_ratio > 100 and abs(abs(c.at_z) - 1.0) < 0.1, c
        assert c.abs_error == pytest.approx(0.25, rel=0.05)
    z, ratios = _numpy_ratios(act, wrong, 2)
    assert bad[2].at_z == float(z[np.argmax(ratios)]) and bad[2].worst_ratio == pytest.approx(ratios.max())


def test_an_exact_comparison_names_no_point():
    comparisons = check_kernels(activations.get("identity"), builtin_kernels("identity"))
    assert all(c.worst_ratio == 0 and c.at_z is None and c.ok for c in comparisons)
    result = {"name": "identity", "origin": "built-in", "module": "m", "forward_c": "z", "derivative_c": "1.0f",
              "ok": True, "comparisons": [dict(dataclasses.asdict(c), ok=c.ok) for c in comparisons]}
    text = check_module.format_report(result)
    assert "-1000" not in text.split("\n", 1)[1] and text.count("exact at every point") == 3


@pytest.mark.parametrize("width,batch", [(4, 5), (9, 9)])  # specialised per-sample; generic width blocked
@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_builtin_train_step_matches_float64_reference(tmp_path, name, width, batch):
    builtin_kernels(name)  # skip if this build predates it
    layers, layer_lr, head_lr = 30, 0.5, 0.2
    path = make_model(tmp_path / "m.h5", layers=layers, width=width, activation=name, input_dim=12, seed=width)
    rng = np.random.default_rng(3)
    x = rng.uniform(0, 1, size=(batch, 12)).astype(np.float32)
    y = rng.integers(0, 10, size=batch)
    heads, core = read_weights(path)
    with DeepNet.open(path, writable=True) as net:
        assert net.kernels.module is builtin_module()
        ref = train_step(Model64.from_arrays(heads, core, net.file.alpha, name), x, y, layer_lr, head_lr)
        result = net.train_step(x, y, layer_lr=layer_lr, head_lr=head_lr)
    new_heads, new_core = read_weights(path)
    assert result.loss == pytest.approx(ref.loss, rel=1e-5)
    assert_close(new_core, ref.model.core, what=f"{name} core")
    for key, value in ref.model.heads().items():
        assert_close(new_heads[key], value, what=f"{name} {key}")
    assert np.max(np.abs(new_core - core)) > 1e-3  # the step changed the core well above the tolerance


def test_kernels_for_builtin_uses_the_package_module():
    for name in BUILTIN_NAMES:
        if name in builtin_module().ACTIVATION_NAMES:
            k = kernels_for(name)
            assert k.module is builtin_module() and k.index == builtin_module().ACTIVATION_NAMES.index(name)


def test_replace_keeps_definition_fields():
    relu = activations.get("relu")
    copy = dataclasses.replace(relu, name="relu_copy", origin="x")
    assert copy.forward_c == relu.forward_c and not activations.is_builtin(copy)


def test_only_call_free_branch_free_activations_get_unrolled_loops():
    """is_light picks the loop shape only (both shapes compute the same), but a wrong pick costs 1.6-3x."""
    from deepnet.kernels.template import is_light

    light = {a.name for a in BUILTINS if is_light(a)}
    assert light == {"softsign", "identity"}
    assert not is_light(Activation(name="isru_like", forward_c="z / sqrtf(1.0f + z * z)", derivative_c="1.0f",
                                   forward_np=np.tanh, derivative_np=lambda z, a: 1 - a * a, description="x"))


def test_plugin_problems_reach_the_command_line_as_one_line_each(tmp_path, monkeypatch, registry, capsys):
    """issue 18 item 12: a plugin that raises on import, has a syntax error, is not an Activation or lacks an
    attribute printed a RuntimeWarning and a source line before the error; now one line each."""
    from deepnet.cli import main

    (tmp_path / "fake_plugin_syntax.py").write_text("def (\n")
    _entry_points(tmp_path, monkeypatch, {"syn": "fake_plugin_syntax:ACT", "boom": "fake_plugin_mod:broken",
                                          "number": "fake_plugin_mod:NOT_AN_ACTIVATION",
                                          "missing": "fake_plugin_mod:NO_SUCH_ATTRIBUTE"})
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--activation", "nope", "--steps", "1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 5, lines
    assert all(line.startswith("deepnet: warning: activation plugin not loaded: ") for line in lines[:4]), lines
    for fragment in ("RuntimeError: boom", "AttributeError", "is a int, not an Activation", "SyntaxError"):
        assert any(fragment in line for line in lines[:4]), (fragment, lines)
    assert lines[-1].startswith("deepnet: error: activation 'nope' is not registered")
    assert not (tmp_path / "model.h5").exists()
