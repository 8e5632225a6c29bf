"""The package's compiled build modules: which one this CPU runs, and which activations each holds.

Built-in activations live in ``deepnet._kernels`` and its faster builds for x86-64 instruction sets
(compiled when the package is built, picked here at run time; see ``deepnet.kernels.builds``). A build is
loaded only after the CPU says it runs its instructions, so nothing dies with SIGILL.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

from deepnet import activations
from deepnet.errors import ActivationError
from deepnet.kernels import builds

# Which build of the built-in kernels to use: "auto" (the fastest this CPU runs), or one of deepnet.kernels.builds.
KERNELS_ENV = "DEEPNET_KERNELS"


def _portable() -> ModuleType:
    try:
        from deepnet import _kernels
    except ImportError as exc:  # a source checkout that was never built
        raise ActivationError(
            f"the compiled kernels are missing ({exc}); install the package with `pip install -e .`"
        ) from None
    return _kernels


def _load(build: builds.KernelBuild) -> ModuleType | None:
    """The module of ``build`` if this CPU runs it and this installation has it, else None."""
    portable = _portable()
    if build.cpu_check is not None and not getattr(portable, build.cpu_check, lambda: False)():
        return None
    try:
        return importlib.import_module(f"deepnet.{build.module}")
    except ImportError:  # built with DEEPNET_MARCH, or not on x86-64: no such module
        return None


@functools.lru_cache(maxsize=None)
def builtin_module(choice: str | None = None) -> ModuleType:
    """The compiled module holding the built-in activations' kernels, for this CPU.

    "auto" (the default) takes the fastest build the CPU runs: AVX-512, then AVX2+FMA, then the portable
    one, which always works. A build is loaded only after the CPU says it has its instructions, so a
    wheel can never die with SIGILL. ``$DEEPNET_KERNELS`` (auto, portable, avx2, avx512) overrides.
    """
    choice = (choice or os.environ.get(KERNELS_ENV, "auto")).strip().lower()
    if choice not in builds.CHOICES:
        raise ActivationError(f"{KERNELS_ENV} must be one of {', '.join(builds.CHOICES)}, not {choice!r}")
    portable = _portable()
    if choice == "portable":
        return portable
    if choice != "auto":
        module = _load(builds.by_name(choice))
        if module is None:
            raise ActivationError(f"{KERNELS_ENV}={choice} but this CPU or this build has no {choice} kernels")
        return module
    for build in builds.X86_BUILDS:
        module = _load(build)
        if module is not None:
            return module
    return portable  # not x86-64, or built with DEEPNET_MARCH: the one build is the right one


def runnable_builds() -> list[ModuleType]:
    """Every build of the built-in kernels this machine can run, the portable one first."""
    found = [_portable()]
    for build in reversed(builds.X86_BUILDS):
        module = _load(build)
        if module is not None:
            found.append(module)
    return found


def build_label(module: ModuleType) -> str:
    """Which compiled module a kernel comes from and what it was built for, e.g. "_kernels_avx2 (avx2+fma)"."""
    return f"{module.__name__.rsplit('.', 1)[-1]} ({module.BUILT_FOR})"


def in_builtin_module(activation: activations.Activation, module: ModuleType | None = None) -> bool:
    """Whether the package's compiled module holds this very definition of the activation."""
    module = builtin_module() if module is None else module
    if activation.name not in module.ACTIVATION_NAMES:
        return False
    compiled = getattr(module, "ACTIVATION_DEFINITIONS", None)  # (name, forward_c, derivative_c) per entry
    if compiled is not None:
        return (activation.name, activation.forward_c, activation.derivative_c) in [tuple(d) for d in compiled]
    # A module built before definitions were recorded: it holds the built-in definitions it was built from.
    return activations.is_builtin(activation)
