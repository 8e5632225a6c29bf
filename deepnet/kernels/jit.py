"""Compiles an activation that is not in the package's built kernels, on first use, into a disk cache.

The kernels of a plugin's activation come from the very template the built-ins are compiled from:
``deepnet.kernels.template.render_layer_loops([activation])`` is rendered next to a copy of
``deepnet/kernels/plugin_module.c`` named ``deepnet_act_<name>_<hash>.c`` and the runtime header
(``dn_runtime.h``), and compiled (C only: no Cython step) with the flags of the package's build in use
here (``deepnet.kernels.builds``: ``-O3 -fno-math-errno -fno-trapping-math -fopenmp-simd``, plus the AVX2
or AVX-512 flags when the package runs that build), and loaded. So a plugin's loops are the same code as a
built-in's, for every width the built-ins specialise, or for the one width it is first used at (the
others then compile on their first use: ``deepnet.kernels.loader.LayerKernels``). The module holds those
loops and nothing else (its KERNEL_TABLE): the checked calls that run them, and the backward pass's
thread driver, are the build module's, compiled once with the package; that keeps a first use's compile
short.

Cache layout (``$DEEPNET_CACHE``, else the per-user cache directory, e.g. ``~/.cache/deepnet``)::

    kernels/
      deepnet_act_<name>_<hash16>/                one finished module, never modified once there
        deepnet_act_<name>_<hash16><EXT_SUFFIX>   the compiled module
        definition.json                           what it was built from, with what, how long it took
        build.log                                 the compiler's output
      deepnet_act_<name>_<hash16>.lock            held while a process compiles it
      .build-.../                                 a build in progress (removed when done)

The hash covers the activation's name and C expressions, the deepnet version, the compile flags, the
compiler, the Python ABI, the Cython version (its Tempita renders the template), and the very text
compiled (the rendered template, the module's C, the runtime header), so a changed definition, template, header or upgrade
compiles afresh and never loads a stale module. A build happens in a temporary directory beside the cache
entry and is renamed into place when complete: a reader sees a finished module or none. Two processes
compiling the same activation at once serialise on the lock file (the second then loads the first's
module); without locks (a filesystem without ``flock``) both compile and the rename lets one win, the
other discarding its copy. Nothing read from a model file is compiled: only definitions in the registry,
which come from installed code.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
import uuid
from pathlib import Path
from types import ModuleType

import deepnet
from deepnet.errors import ActivationError
from deepnet.kernels import builds, builtin, template

CACHE_ENV = "DEEPNET_CACHE"
# An unknown function in an expression is an error here, not a warning and a failed import later; and no
# debug information, which changes no code but costs a first use's compile about a fifth of its time.
CHECK_FLAGS = ("-Werror=implicit-function-declaration", "-g0")
MODULE_PREFIX = "deepnet_act_"
# Read once, at import: sysconfig fills its table on first use without a lock, so two threads' first
# plugin loads could otherwise see it half filled (and hash a different cache key).
EXT_SUFFIX: str = sysconfig.get_config_var("EXT_SUFFIX")
CONFIG_CC: str | None = sysconfig.get_config_var("CC")
# The widths a plugin module specialises unless asked for fewer: those of the built-in modules.
ALL_WIDTHS: tuple[int, ...] = template.SPECIALISED_WIDTHS

# The compile runs in a fresh interpreter: isolated from this process (setuptools state, the
# current directory, output) and killed with it. Arguments: one JSON object.
_BUILD_SCRIPT = r"""
import json, os, sys
cfg = json.loads(sys.argv[1])
os.chdir(cfg["dir"])
from setuptools import Distribution, Extension
ext = Extension(cfg["module"], [cfg["module"] + ".c"], include_dirs=["."], extra_compile_args=cfg["flags"],
                define_macros=[("DN_MODULE", cfg["module"])])
dist = Distribution({"name": cfg["module"], "ext_modules": [ext], "script_name": "deepnet-build"})
cmd = dist.get_command_obj("build_ext")
cmd.inplace = True
cmd.build_temp = "build-temp"
dist.run_command("build_ext")
"""

_lock = threading.Lock()
_key_locks: dict[str, threading.Lock] = {}
_modules: dict[str, ModuleType] = {}
_history: list[dict] = []


# --------------------------------------------------------------------------------------------------
# where and what


def cache_root() -> Path:
    """``$DEEPNET_CACHE``, else the per-user cache directory of deepnet."""
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    try:  # optional: platformdirs knows each platform's cache location; no hard dependency on it
        from platformdirs import user_cache_dir
    except ImportError:
        base = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
        return Path(base) / "deepnet"
    return Path(user_cache_dir("deepnet"))


def kernel_cache_dir() -> Path:
    return cache_root() / "kernels"


def compile_flags() -> list[str]:
    """The flags of the package's own build of the kernels this process uses (see setup.py)."""
    return list(builds.BASE_FLAGS) + list(builds.flags_for(builtin.builtin_module().BUILT_FOR)) + list(CHECK_FLAGS)


def widths_for(width: int) -> tuple[int, ...]:
    """The specialised widths a module for running at ``width`` needs: that width, if it has a variant."""
    return (width,) if width in ALL_WIDTHS else ()


def render_source(activations: list, widths: tuple[int, ...] = ALL_WIDTHS) -> str:
    """The C of the layer loops for ``activations`` (the template's, as for the built-ins)."""
    return template.render_layer_loops(activations, widths)


def _compiler() -> list[str]:
    cc = os.environ.get("CC") or CONFIG_CC or "cc"
    return shlex.split(cc)


# The files of a build directory besides the module's C (which is named after the module).
_RUNTIME_FILES = {"dn_runtime.h": template.RUNTIME_HEADER}


def sources(activation, widths: tuple[int, ...] = ALL_WIDTHS) -> tuple[str, str, dict[str, str]]:
    """(the rendered layer loops, the module's C, the runtime files by name): the exact text a module of
    ``activation`` specialising ``widths`` is compiled from."""
    runtime = {path: source.read_text() for path, source in _RUNTIME_FILES.items()}
    return render_source([activation], widths), template.PLUGIN_C.read_text(), runtime


def cache_key(activation, flags: list[str] | None = None, source: tuple | None = None,
              widths: tuple[int, ...] = ALL_WIDTHS) -> str:
    """sha256 of everything the compiled module depends on (``cache_key_parts``)."""
    parts = cache_key_parts(activation, flags, source, widths)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cache_key_parts(activation, flags: list[str] | None = None, source: tuple | None = None,
                    widths: tuple[int, ...] = ALL_WIDTHS) -> dict:
    """What the cache key hashes: the definition, the deepnet version, the flags, compiler, Python ABI,
    Cython version, and the very source text compiled (the rendered template with the expressions, the
    module's C, the runtime header; ``widths`` only renders the source when it is not given)."""
    import Cython  # optional: only a plugin's compile needs it, and its absence is reported there

    flags = compile_flags() if flags is None else flags
    loops, module_c, runtime = sources(activation, widths) if source is None else source
    digest = lambda text: hashlib.sha256(text.encode()).hexdigest()  # noqa: E731
    return {
        "name": activation.name,
        "forward_c": activation.forward_c,
        "derivative_c": activation.derivative_c,
        "deepnet": deepnet.__version__,
        "flags": list(flags),
        "compiler": _compiler()[:1],
        "ext_suffix": EXT_SUFFIX,
        "cython": Cython.__version__,
        "layer_loops": digest(loops),
        "module_c": digest(module_c),
        "runtime": {path: digest(text) for path, text in sorted(runtime.items())},
    }


def module_name(activation, key: str) -> str:
    return f"{MODULE_PREFIX}{activation.name}_{key[:16]}"


def _module_file(directory: Path, name: str) -> Path:
    return directory / (name + EXT_SUFFIX)


def cached_path(activation, widths: tuple[int, ...] = ALL_WIDTHS) -> Path | None:
    """The compiled module of ``activation`` specialising ``widths`` in the cache, if it is there."""
    name = module_name(activation, cache_key(activation, widths=widths))
    path = _module_file(kernel_cache_dir() / name, name)
    return path if path.exists() else None


def status(activation) -> str:
    """Where the activation's kernel is: "built in" (the package's module), "cached" (compiled on an
    earlier use), or "not yet" (compiled on first use)."""
    if builtin.in_builtin_module(activation):
        return "built in"
    every = [ALL_WIDTHS, ()] + [(w,) for w in ALL_WIDTHS]  # compiled for every width, or for one
    return "cached" if any(cached_path(activation, widths) is not None for widths in every) else "not yet"


def history() -> list[dict]:
    """What this process compiled or loaded from the cache: dicts of name, event, seconds, path."""
    return list(_history)


# --------------------------------------------------------------------------------------------------
# compile and load


def load(activation, widths: tuple[int, ...] = ALL_WIDTHS) -> ModuleType:
    """The compiled kernel module of ``activation`` with the loops of ``widths`` (and of any other width):
    this process's, the cache's, or compiled now."""
    source = sources(activation, widths)  # read once: the key and a build see the same text
    key = cache_key(activation, source=source)
    where = str(kernel_cache_dir() / module_name(activation, key))  # a process may switch caches
    with _lock:
        if where in _modules:
            return _modules[where]
        key_lock = _key_locks.setdefault(where, threading.Lock())
    with key_lock:  # threads of this process: one compiles, the others wait and share the module
        if where in _modules:
            return _modules[where]
        module = _load_or_build(activation, key, source)
        with _lock:
            _modules[where] = module
        return module


def _load_or_build(activation, key: str, source: tuple) -> ModuleType:
    name = module_name(activation, key)
    root = kernel_cache_dir()
    final = root / name
    if final.exists():
        module = _try_load(activation, final, name, "cache")
        if module is not None:
            return module
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ActivationError(f"cannot create the kernel cache {root}: {exc} (set ${CACHE_ENV} to a writable directory)") from None
    with _file_lock(root / (name + ".lock")):
        if final.exists():  # another process finished it while this one waited for the lock
            module = _try_load(activation, final, name, "cache")
            if module is not None:
                return module
            _set_aside(final)  # a broken entry (an interrupted copy by hand, another Python): rebuild
        _build_into(activation, key, name, root, final, source)
    module = _try_load(activation, final, name, "compiled")
    if module is None:
        raise ActivationError(f"activation {activation.name!r}: the module just compiled into {final} does not load")
    return module


def _try_load(activation, directory: Path, name: str, how: str) -> ModuleType | None:
    path = _module_file(directory, name)
    t0 = time.perf_counter()
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError as exc:
        if how == "compiled":
            raise ActivationError(f"activation {activation.name!r}: the compiled kernel does not load: {exc}") from None
        return None
    if list(module.ACTIVATION_NAMES) != [activation.name]:
        return None
    sys.modules.setdefault(name, module)
    seconds = time.perf_counter() - t0
    if how == "cache":
        _history.append({"name": activation.name, "event": "loaded", "seconds": seconds, "path": str(path)})
    return module


def _set_aside(directory: Path) -> None:
    trash = directory.with_name(f".broken-{directory.name}-{uuid.uuid4().hex[:8]}")
    with contextlib.suppress(OSError):
        directory.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # no flock (Windows): the atomic rename alone keeps the cache whole
        yield
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        except OSError:  # a filesystem without locks
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def build_module(activations: list, name: str, directory: Path, flags: list[str],
                 source: tuple | None = None) -> tuple[Path, float, str]:
    """Compile the layer loops of ``activations`` into extension module ``name`` inside ``directory``.

    ``source`` is (layer loops, module C, runtime files) as ``sources()`` gives them; rendered here if not
    given.
    Returns (the module file, seconds, compiler output); ActivationError on a missing compiler or an
    expression that does not compile. The cache's builds go through here; so can a throwaway build.
    """
    compiler = _compiler()
    what = ", ".join(repr(a.name) for a in activations)
    if not compiler or shutil.which(compiler[0]) is None:
        raise ActivationError(
            f"deepnet needs a C compiler to build plugin activation {what} "
            f"(looked for {compiler[0] if compiler else 'cc'!r}): install gcc (e.g. apt-get install gcc) or clang"
        )
    missing = [pkg for pkg, module in (("Cython", "Cython"), ("setuptools", "setuptools"))
               if importlib.util.find_spec(module) is None]
    if missing:
        raise ActivationError(
            f"deepnet needs {' and '.join(missing)} to build plugin activation {what}: "
            f"pip install {' '.join(m.lower() for m in missing)}"
        )
    directory.mkdir(parents=True, exist_ok=True)
    if source is None:
        source = (render_source(list(activations)),) + sources(activations[0])[1:]
    loops, module_c, runtime = source
    for path, text in runtime.items():
        (directory / path).write_text(text)
    _preflight(list(activations), loops, directory, flags, compiler)
    (directory / template.RENDERED_NAME).write_text(loops)
    (directory / f"{name}.c").write_text(module_c)
    t0 = time.perf_counter()
    cfg = {"dir": str(directory), "module": name, "flags": list(flags)}
    try:
        proc = subprocess.run([sys.executable, "-c", _BUILD_SCRIPT, json.dumps(cfg)], cwd=directory,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except OSError as exc:
        raise ActivationError(f"activation {what}: cannot run the compiler: {exc}") from None
    seconds = time.perf_counter() - t0
    log = proc.stdout or ""
    built = _module_file(directory, name)
    if proc.returncode != 0 or not built.exists():
        raise ActivationError(_compile_error(list(activations), log, compiler[0]))
    return built, seconds, log


def _preflight(activations: list, loops: str, directory: Path, flags: list[str], compiler: list[str]) -> None:
    """Syntax-check the activations' C functions with the runtime header, in well under a second, so a
    wrong expression fails at once rather than after the whole module's compile. Skipped if the rendered
    source does not have the expected shape (the full build then reports any error)."""
    end = loops.find(f"static inline float dn_dact_{activations[-1].name}(")
    if end < 0:
        return
    test = directory / "preflight.c"
    test.write_text(loops[:loops.find("\n", end)] + "\n")
    include = sysconfig.get_paths()["include"]
    try:
        proc = subprocess.run([*compiler, "-fsyntax-only", *flags, f"-I{include}", str(test)], cwd=directory,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return
    if proc.returncode != 0 and _ERROR_LINE.search(proc.stdout or ""):
        raise ActivationError(_compile_error(activations, proc.stdout, compiler[0]))


def _build_into(activation, key: str, name: str, root: Path, final: Path, source: tuple) -> None:
    """Compile ``activation`` in a temporary directory under ``root`` and rename it to ``final``."""
    flags = compile_flags()
    build = root / f".build-{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    build.mkdir()
    try:
        print(f"deepnet: compiling activation {activation.name!r} (first use; cached in {root})...",
              file=sys.stderr, flush=True)
        built, seconds, log = build_module([activation], name, build, flags, source)
        stage = build / "out"
        stage.mkdir()
        built.rename(_module_file(stage, name))
        (stage / "build.log").write_text(log)
        (stage / "definition.json").write_text(json.dumps({
            "module": name, "key": key, "name": activation.name, "origin": activation.origin,
            "forward_c": activation.forward_c, "derivative_c": activation.derivative_c,
            "flags": flags, "python": EXT_SUFFIX,
            "deepnet": deepnet.__version__, "compile_seconds": round(seconds, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }, indent=1) + "\n")
        try:
            os.rename(stage, final)
            _history.append({"name": activation.name, "event": "compiled", "seconds": seconds,
                             "path": str(_module_file(final, name))})
        except OSError:
            if not final.exists():
                raise
            # Another process got there first (no file lock here): its module is the same; keep it.
            _history.append({"name": activation.name, "event": "discarded", "seconds": seconds,
                             "path": str(_module_file(final, name))})
    finally:
        shutil.rmtree(build, ignore_errors=True)


_ERROR_LINE = re.compile(r"\berror\b", re.IGNORECASE)


def _compile_error(activations: list, log: str, compiler: str) -> str:
    """One line: which activation, which expression, and the compiler's first error line."""
    lines = log.splitlines()
    names = ", ".join(repr(a.name) for a in activations)
    if re.search(r"command '?[^']*'? failed: No such file or directory|unable to execute|: not found", log):
        return (f"deepnet needs a C compiler to build plugin activation {names} ({compiler} could not "
                "be run): install gcc (e.g. apt-get install gcc) or clang")
    first = next((i for i, line in enumerate(lines) if _ERROR_LINE.search(line)), None)
    if first is None:
        tail = lines[-1].strip() if lines else "no output"
        return f"activation {names}: compiling its kernel failed: {tail}"
    error = re.sub(r"^.*?([^/\s]+\.(c|h|pyx|pxi):\d+)", r"\1", lines[first].strip())
    # gcc and clang say which function an error is in ("In function 'dn_dact_x':") and quote the line.
    context = "\n".join(lines[max(0, first - 6): first + 3])
    for act in activations:
        if f"dn_dact_{act.name}" in context or act.derivative_c in context:
            return f"activation {act.name!r}: C expression `{act.derivative_c}` (derivative) does not compile: {error}"
        if f"dn_act_{act.name}" in context or act.forward_c in context:
            return f"activation {act.name!r}: C expression `{act.forward_c}` (forward) does not compile: {error}"
    exprs = "; ".join(f"{a.name}: `{a.forward_c}` / `{a.derivative_c}`" for a in activations)
    return f"activation {names}: C expressions {exprs} do not compile: {error}"
