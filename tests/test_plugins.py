"""Plugin activations compiled on first use: the example package installed for real, the disk cache (miss,
hit, layout, races, a broken entry), compile errors, the check of a wrong derivative, a missing plugin.

Compiling costs tens of seconds, so the module compiles twice, at once, into a cache directory of its own:
the example's ``softsign_plugin`` and ``softsign_wrong`` (softsign with a wrong C derivative). The fake
compiler of the race tests copies those modules. A first use racing in two processes is marked slow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import deepnet
from deepnet import DeepNet, activations
from deepnet.activations import Activation, plugins
from deepnet.kernels import jit as compile_activation
from deepnet.activations.check import check_activation, kernel_act_and_grad
from deepnet.errors import ActivationError
from deepnet.kernels.loader import builtin_module, kernels_for
from helpers import make_model, read_weights
from reference import Model64, assert_close, train_step

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "deepnet-activation-example"
DIST = "deepnet-activation-example"
# A subprocess finds plugins only in the directories of its $PYTHONPATH, whatever else is installed.
ISOLATED = [sys.executable, str(Path(__file__).resolve().parent / "plugin_isolation.py")]


def _softsign(z):
    return z / (1.0 + np.abs(z))


WRONG = Activation(
    name="softsign_wrong",
    forward_c="z / (1.0f + fabsf(z))",
    derivative_c="(1.0f - fabsf(a))",  # the square is missing
    forward_np=_softsign,
    derivative_np=lambda z, a: 1.0 / (1.0 + np.abs(z)) ** 2,
    description="softsign with a wrong derivative (test)",
    origin="tests",
)


def _install_example(target: Path, work: Path) -> None:
    """pip-install the example (no deps, no index) into ``target``; without pip, lay out the same files."""
    src = work / "src"
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("*.egg-info", "build", "__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                           "--quiet", "--disable-pip-version-check", "--target", str(target), str(src)],
                          capture_output=True, text=True)
    if proc.returncode == 0:
        return
    try:
        import tomllib
    except ImportError:
        pytest.skip(f"cannot install the example package: {proc.stderr.strip().splitlines()[-1:]}")
    meta = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    shutil.copytree(src / "src" / "deepnet_activation_example", target / "deepnet_activation_example")
    info = target / f"deepnet_activation_example-{meta['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n")
    eps = meta["entry-points"]["deepnet.activations"]
    (info / "entry_points.txt").write_text("[deepnet.activations]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()))


@pytest.fixture(scope="session")
def example_site(tmp_path_factory) -> Path:
    """A directory holding the example plugin package as pip installs it (put it on sys.path to use it)."""
    target = tmp_path_factory.mktemp("example-site")
    _install_example(target, tmp_path_factory.mktemp("example-build"))
    assert list(target.glob("deepnet_activation_example-*.dist-info/entry_points.txt"))
    return target


@pytest.fixture(scope="session")
def kernel_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("kernel-cache")


@pytest.fixture(scope="module")
def compiled(example_site, kernel_cache):
    """The example installed and loaded, softsign_wrong registered, and both compiled (at once) into the
    test cache; returns the compile.history() of those first uses. Undone after the module."""
    mp = pytest.MonkeyPatch()
    mp.setenv("DEEPNET_CACHE", str(kernel_cache))
    mp.syspath_prepend(str(example_site))
    plugins.reload()
    activations.register(WRONG)
    before = len(compile_activation.history())
    t0 = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(kernels_for, ["softsign_plugin", "softsign_wrong"]))
    events = compile_activation.history()[before:]
    print(f"\ncompiled softsign_plugin and softsign_wrong in {time.perf_counter() - t0:.1f} s: {events}")
    yield events
    activations.unregister("softsign_wrong")
    mp.undo()
    plugins.reload()


def _env(**extra) -> dict:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _python(code: str, *args: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([*ISOLATED, "-c", code, *args], capture_output=True, text=True, env=_env(**env), cwd=REPO)


# -------------------------------------------------------------------------------------------------
# discovery of the installed example, and the cache


def test_example_is_discovered_through_its_entry_points(compiled, example_site, kernel_cache):
    proc = subprocess.run([*ISOLATED, "-m", "deepnet", "activations", "--json"], capture_output=True, text=True,
                          env=_env(PYTHONPATH=example_site, DEEPNET_CACHE=kernel_cache), cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    rows = {r["name"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert set(rows["isru"]) == {"name", "origin", "compiled", "description"}
    for name in ("isru", "softplus", "softsign_plugin"):
        assert rows[name]["origin"] == DIST
    assert rows["softsign_plugin"]["compiled"] == "cached"
    assert rows["isru"]["compiled"] == "not yet"  # loading a plugin compiles nothing
    assert rows["softsign"] == {"name": "softsign", "origin": "built-in", "compiled": "built in",
                                "description": activations.get("softsign").description}
    assert "softsign_wrong" not in rows  # registered in this process only
    text = subprocess.run([*ISOLATED, "-m", "deepnet", "activations"], capture_output=True, text=True,
                          env=_env(PYTHONPATH=example_site, DEEPNET_CACHE=kernel_cache), cwd=REPO).stdout
    assert any(line.split()[:3] == ["softsign_plugin", DIST, "cached"] for line in text.splitlines())


def test_first_use_compiles_into_the_cache_and_a_second_process_loads_it(compiled, example_site, kernel_cache):
    assert sorted(e["name"] for e in compiled if e["event"] == "compiled") == ["softsign_plugin", "softsign_wrong"]
    act = activations.get("softsign_plugin")
    assert act.origin == DIST and compile_activation.status(act) == "cached"
    entry = compile_activation.cached_path(act).parent
    assert entry.parent == kernel_cache / "kernels" and entry.name.startswith("deepnet_act_softsign_plugin_")
    assert sorted(p.name for p in entry.iterdir()) == sorted(["build.log", "definition.json",
                                                             compile_activation.cached_path(act).name])
    definition = json.loads((entry / "definition.json").read_text())
    assert definition["forward_c"] == act.forward_c and definition["key"] == compile_activation.cache_key(act)
    assert definition["deepnet"] == deepnet.__version__ and "-O3" in definition["flags"]
    assert not list((kernel_cache / "kernels").glob(".build-*"))  # nothing left of the builds

    code = ("import json, time; t = time.perf_counter()\n"
            "from deepnet.kernels.loader import kernels_for; from deepnet.kernels import jit as c\n"
            "k = kernels_for('softsign_plugin')\n"
            "print(json.dumps({'seconds': time.perf_counter() - t, 'events': c.history(), 'file': k.module.__file__}))")
    proc = _python(code, PYTHONPATH=example_site, DEEPNET_CACHE=kernel_cache)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert [e["event"] for e in out["events"]] == ["loaded"] and "compiling" not in proc.stderr
    assert out["file"] == str(compile_activation.cached_path(act))
    assert out["seconds"] < 10  # an import, not a compile


def test_cache_key_covers_the_definition_and_the_build():
    act = activations.get("softsign")
    copy = Activation("softsign_plugin", act.forward_c, act.derivative_c, np.abs, np.abs, origin="x")
    flags = ["-O3"]
    parts = compile_activation.cache_key_parts(copy, flags)
    assert parts["deepnet"] == deepnet.__version__ and parts["flags"] == flags
    assert parts["layer_loops"] == compile_activation.cache_key_parts(copy, flags, compile_activation.sources(copy))["layer_loops"]
    key = compile_activation.cache_key(copy, flags)
    assert key == compile_activation.cache_key(Activation("softsign_plugin", act.forward_c, act.derivative_c,
                                                          np.sin, np.cos, "other", origin="y"), flags)
    assert key != compile_activation.cache_key(copy, flags + ["-mavx2"])
    assert key != compile_activation.cache_key(Activation("softsign_plugin", act.forward_c + " * 1.0f",
                                                          act.derivative_c, np.abs, np.abs), flags)
    assert key != compile_activation.cache_key(Activation("softsign_other", act.forward_c, act.derivative_c,
                                                          np.abs, np.abs), flags)
    assert compile_activation.module_name(copy, key) == f"deepnet_act_softsign_plugin_{key[:16]}"
    pxi, pyx, runtime = compile_activation.sources(copy)
    assert set(runtime) == {"dn_runtime.h"}
    for path in runtime:  # the shared runtime is compiled into the module: a change to it is a new module
        changed = dict(runtime, **{path: runtime[path] + "\n"})
        assert key != compile_activation.cache_key(copy, flags, (pxi, pyx, changed))
    assert key != compile_activation.cache_key(copy, flags, (pxi, pyx + "\n", runtime))


# -------------------------------------------------------------------------------------------------
# the compiled plugin is the same kernel as the built-in


@pytest.mark.parametrize("width,batch", [(2, 3), (4, 16), (5, 11), (32, 1), (8, 40)])
def test_plugin_kernel_computes_what_the_builtin_does(compiled, width, batch):
    plugin, builtin = kernels_for("softsign_plugin"), kernels_for("softsign")
    assert plugin.module is not builtin_module() and builtin.module is builtin_module()
    assert plugin.module.BUILT_FOR == builtin.module.BUILT_FOR  # compiled with the same flags
    # the plugin's module holds its loops only; the build module's checked calls run them
    assert plugin.calls is builtin_module() and not hasattr(plugin.module, "forward")
    rng = np.random.default_rng(width * 100 + batch)
    layers, save_every = 60, 7
    params = rng.uniform(-0.5, 0.5, (layers, width * width + width)).astype(np.float32)
    h0 = rng.uniform(-1, 1, (width, batch)).astype(np.float32)
    g0 = rng.uniform(-1, 1, (width, batch)).astype(np.float32)
    out = {}
    for k in (plugin, builtin):
        h, p, g = h0.copy(), params.copy(), g0.copy()
        saves = np.zeros((-(-layers // save_every), width * batch), np.float32)
        k.forward(p, h, 0.3, saves, save_every)
        k.backward(p, saves, save_every, g, 0.3, 0.1)
        out[k.name] = (h, p, g)
    for a, b in zip(out["softsign_plugin"], out["softsign"]):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)


def test_a_plugin_compiled_for_its_width_runs_any_width_as_the_builtin_does(compiled, monkeypatch, tmp_path):
    """kernels_for(name, width) compiles that width's loops only; another width with loops of its own is
    compiled on first use, one without runs the any-width loops: each the very loops of the built-in."""
    monkeypatch.setenv("DEEPNET_CACHE", str(tmp_path))
    act = activations.get("softsign_plugin")
    plugin, builtin = kernels_for("softsign_plugin", width=4), kernels_for("softsign")
    assert plugin.module.WIDTH_VARIANTS == [4] and compile_activation.status(act) == "cached"
    assert compile_activation.cached_path(act) is None  # the module of every width was not compiled here
    rng = np.random.default_rng(5)
    for width, batch in [(4, 16), (2, 3), (9, 11), (4, 1)]:
        layers, save_every = 50, 6
        params = rng.uniform(-0.5, 0.5, (layers, width * width + width)).astype(np.float32)
        h0, g0 = (rng.uniform(-1, 1, (width, batch)).astype(np.float32) for _ in range(2))
        out = []
        for k in (plugin, builtin):
            h, p, g = h0.copy(), params.copy(), g0.copy()
            saves = np.zeros((-(-layers // save_every), width * batch), np.float32)
            k.forward(p, h, 0.3, saves, save_every)
            k.backward(p, saves, save_every, g, 0.3, 0.1)
            out.append((h, p, g))
        for a, b in zip(*out):
            np.testing.assert_array_equal(a, b)
    assert plugin.loops_for(2).WIDTH_VARIANTS == [2] and plugin.loops_for(9) is plugin.module
    assert plugin.loops_for(2) is plugin.loops_for(2)  # compiled once


def test_plugin_trains_end_to_end_and_matches_the_float64_reference(compiled, tmp_path):
    path = make_model(tmp_path / "m.h5", layers=40, width=4, activation="softsign_plugin", input_dim=12, seed=2)
    rng = np.random.default_rng(4)
    losses = []
    for step in range(4):
        x = rng.uniform(0, 1, size=(9, 12)).astype(np.float32)
        y = rng.integers(0, 10, size=9)
        heads, core = read_weights(path)
        with DeepNet.open(path, writable=True) as net:
            assert net.kernels.name == "softsign_plugin" and net.kernels.module.__name__.startswith("deepnet_act_")
            result = net.train_step(x, y, layer_lr=0.5, head_lr=0.2)
            ref = train_step(Model64.from_arrays(heads, core, net.file.alpha, "softsign_plugin"), x, y, 0.5, 0.2)
        assert result.step == step + 1 and np.isfinite(result.loss)
        assert result.loss == pytest.approx(ref.loss, rel=1e-5)
        assert_close(read_weights(path)[1], ref.model.core, what=f"step {step + 1} core")
        losses.append(result.loss)
    import h5py

    with h5py.File(path, "r") as f:  # the file names the activation, nothing more
        assert f.attrs["activation"] == "softsign_plugin"
        text = " ".join(str(v) for v in f.attrs.values())
        assert "fabsf" not in text and "forward" not in text


def test_a_model_whose_plugin_is_missing_fails_clearly_and_compiles_nothing(compiled, tmp_path):
    path = make_model(tmp_path / "m.h5", layers=5, width=4, activation="softsign_plugin", input_dim=12)
    import h5py

    with h5py.File(path, "r") as f:  # the file records the package that provided the activation
        assert f.attrs["activation_package"] == DIST and f.attrs["activation_package_version"] == "0.1.0"
    empty_cache = tmp_path / "cache"
    code = ("import deepnet, sys\n"
            "try:\n    deepnet.DeepNet.open(sys.argv[1])\n"
            "except deepnet.errors.ActivationError as e:\n    print(e); sys.exit(3)\n")
    proc = _python(code, str(path), DEEPNET_CACHE=empty_cache)  # the example is not on this path
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout.strip() == (f"{path} uses activation 'softsign_plugin' from package {DIST} 0.1.0, "
                                   f"which is not installed (pip install {DIST})")
    assert not empty_cache.exists()


# -------------------------------------------------------------------------------------------------
# check, compile errors, a missing compiler


def test_check_passes_the_plugin_and_reports_a_wrong_derivative(compiled, capsys):
    from deepnet.cli import main as cli_main

    good = check_activation("softsign_plugin")
    assert good["ok"]
    for c in good["comparisons"]:  # how much margin: a fraction of the allowance, at a named z, not zeros
        assert 0 < c["worst_ratio"] <= 1 and c["at_z"] is not None and c["ok"]
        assert c["worst_ratio"] == pytest.approx(c["abs_error"] / c["allowance"])
    z = np.array([c["at_z"] for c in good["comparisons"]], np.float32)  # the named z is the worst point
    a, d = kernel_act_and_grad(kernels_for("softsign_plugin"), z)
    fwd, der = good["comparisons"][1], good["comparisons"][2]
    assert fwd["abs_error"] == pytest.approx(abs(a[1] - _softsign(np.float64(z[1]))), rel=1e-6)
    assert der["abs_error"] == pytest.approx(abs(d[2] - 1 / (1 + abs(np.float64(z[2]))) ** 2), rel=1e-6)
    assert cli_main(["activations", "check", "softsign_plugin"]) == 0
    out = capsys.readouterr().out
    assert "C derivative vs finite differences of C forward" in out and "WRONG" not in out
    assert "worst/allowed" in out

    result = check_activation("softsign_wrong")
    fd, fwd, der = result["comparisons"]
    assert not result["ok"] and not fd["ok"] and fwd["ok"] and not der["ok"]
    for c in (fd, der):  # (1 - |a|) vs (1 - |a|)^2: off by a quarter at |z| = 1
        assert c["worst_ratio"] > 100 and abs(abs(c["at_z"]) - 1) < 0.1
        assert c["abs_error"] == pytest.approx(0.25, rel=0.05)
    assert cli_main(["activations", "check", "softsign_wrong"]) == 2
    captured = capsys.readouterr()
    assert "WRONG" in captured.out
    err = captured.err.strip()
    assert err.startswith("deepnet: error: activation 'softsign_wrong' fails its check: "
                          "C derivative vs finite differences of C forward: worst ")
    assert len(err.splitlines()) == 1 and "times the allowance (abs err 0.25 at z = " in err
    assert f"at z = {der['at_z']:.6g}" in err and "C forward vs NumPy forward" not in err
    assert cli_main(["activations", "check", "softsign_wrong", "--json"]) == 2
    row = json.loads(capsys.readouterr().out)
    assert row["ok"] is False
    assert set(row["comparisons"][0]) == {"what", "worst_ratio", "at_z", "abs_error", "allowance", "tolerance",
                                          "points", "ok"}


def _bad(name: str, **kw) -> Activation:
    return Activation(name, kw.get("forward_c", "z"), kw.get("derivative_c", "1.0f"), np.array, np.ones_like,
                      origin="tests")


def test_an_expression_that_does_not_compile_names_itself_and_the_first_error(compiled, monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPNET_CACHE", str(tmp_path))
    act = activations.register(_bad("bad_deriv", derivative_c="1.0f + no_such_function(a)"))
    try:
        with pytest.raises(ActivationError) as err:
            kernels_for("bad_deriv")
    finally:
        activations.unregister("bad_deriv")
    msg = str(err.value)
    assert msg.startswith("activation 'bad_deriv': C expression `1.0f + no_such_function(a)` (derivative) does not compile: ")
    assert "error" in msg and "no_such_function" in msg and "\n" not in msg
    assert compile_activation.status(act) == "not yet"
    assert not [p for p in (tmp_path / "kernels").iterdir() if p.is_dir()]  # no entry, no build left behind


def test_compile_error_message_points_at_the_forward(monkeypatch):
    act = _bad("bad_fwd", forward_c="z +* 2.0f")
    log = ("deepnet_act_bad_fwd_0123.c: In function 'dn_act_bad_fwd':\n"
           "/tmp/x/deepnet_act_bad_fwd_0123.c:1234:56: error: invalid type argument of unary '*' (have 'float')\n"
           " 1234 |     static inline float dn_act_bad_fwd(float z) { return (z +* 2.0f); }\n")
    msg = compile_activation._compile_error([act], log, "gcc")
    assert msg == ("activation 'bad_fwd': C expression `z +* 2.0f` (forward) does not compile: "
                   "deepnet_act_bad_fwd_0123.c:1234:56: error: invalid type argument of unary '*' (have 'float')")


def test_a_missing_compiler_says_what_to_install(compiled, monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPNET_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/nonexistent/bin/gcc-deepnet-test")
    activations.register(_bad("needs_cc", forward_c="z * 3.0f"))
    try:
        with pytest.raises(ActivationError, match=r"needs a C compiler to build plugin activation 'needs_cc'.*"
                                                  r"install gcc \(e\.g\. apt-get install gcc\) or clang"):
            kernels_for("needs_cc")
    finally:
        activations.unregister("needs_cc")


def test_a_missing_cython_says_what_to_install(compiled, monkeypatch, tmp_path):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "Cython" else real(name, *a))
    monkeypatch.setenv("DEEPNET_CACHE", str(tmp_path))
    activations.register(_bad("needs_cython", forward_c="z * 5.0f"))
    try:
        with pytest.raises(ActivationError, match=r"needs Cython to build plugin activation 'needs_cython': pip install cython"):
            kernels_for("needs_cython")
    finally:
        activations.unregister("needs_cython")


# -------------------------------------------------------------------------------------------------
# races and a broken cache entry (a fake compiler copies the module compiled above)


@pytest.fixture
def fake_compiler(compiled, monkeypatch):
    """compile.build_module replaced by a copy of softsign_plugin's compiled module; counts its calls."""
    act = activations.get("softsign_plugin")
    good = compile_activation.cached_path(act)
    calls = []

    def build_module(acts, name, directory, flags, source=None):
        assert [a.name for a in acts] == ["softsign_plugin"] and name == good.stem.split(".")[0]
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / good.name
        shutil.copyfile(good, target)
        calls.append(directory)
        return target, 0.01, "fake build"

    monkeypatch.setattr(compile_activation, "build_module", build_module)
    return act, good, calls


def test_the_loser_of_a_race_keeps_the_winners_module(fake_compiler, tmp_path):
    act, good, calls = fake_compiler
    source = compile_activation.sources(act)
    key = compile_activation.cache_key(act, source=source)
    name = compile_activation.module_name(act, key)
    root = tmp_path / "kernels"
    root.mkdir()
    final = root / name
    compile_activation._build_into(act, key, name, root, final, source)  # the winner
    winner = (final / "definition.json").read_text()
    compile_activation._build_into(act, key, name, root, final, source)  # finishes second: its rename fails
    assert len(calls) == 2 and compile_activation.history()[-1]["event"] == "discarded"
    assert (final / "definition.json").read_text() == winner
    assert sorted(p.name for p in root.iterdir()) == [name]  # no temporary directory left


def test_a_broken_cache_entry_is_set_aside_and_rebuilt(fake_compiler, tmp_path, monkeypatch):
    act, good, calls = fake_compiler
    monkeypatch.setenv("DEEPNET_CACHE", str(tmp_path))
    entry = tmp_path / "kernels" / good.parent.name
    shutil.copytree(good.parent, entry)
    (entry / good.name).write_bytes(b"not an ELF file")  # e.g. a truncated copy made by hand
    module = compile_activation.load(act)
    assert len(calls) == 1 and module.ACTIVATION_NAMES == ["softsign_plugin"]
    assert (entry / good.name).read_bytes() == good.read_bytes()
    assert sorted(p.name for p in (tmp_path / "kernels").iterdir() if p.is_dir()) == [entry.name]


@pytest.mark.slow
def test_two_processes_using_a_plugin_first_at_once(compiled, example_site, tmp_path):
    """Two processes use isru for the first time together: one compiles, the other waits and loads it."""
    code = ("import json; from deepnet.kernels.loader import kernels_for; from deepnet.kernels import jit as c\n"
            "k = kernels_for('isru'); print(json.dumps({'events': c.history(), 'file': k.module.__file__}))")
    env = _env(PYTHONPATH=example_site, DEEPNET_CACHE=tmp_path)
    procs = [subprocess.Popen([*ISOLATED, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env, cwd=REPO) for _ in range(2)]
    outs = [p.communicate() for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1] for o in outs]
    results = [json.loads(o[0]) for o in outs]
    events = sorted(e["event"] for r in results for e in r["events"])
    assert events in (["compiled", "loaded"], ["compiled", "discarded"]), events
    assert results[0]["file"] == results[1]["file"]
    entries = [p.name for p in (tmp_path / "kernels").iterdir() if p.is_dir()]
    assert len(entries) == 1 and entries[0].startswith("deepnet_act_isru_")
