"""Finds the compiled kernels of an activation and calls them.

Built-in activations live in ``deepnet._kernels`` (compiled when the package is built); any other
registered activation (a plugin's, or a built-in this build predates) is compiled from the same template
on first use and cached on disk (``deepnet.activations.compile``). The rest of the package talks to
kernels only through ``LayerKernels``, so where a kernel comes from is decided here.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from types import ModuleType

import numpy as np

from deepnet import activations
from deepnet.errors import ActivationError


# Which build of the built-in kernels to use: "auto" (the fastest this CPU runs), "portable" or "avx2".
KERNELS_ENV = "DEEPNET_KERNELS"


@functools.lru_cache(maxsize=None)
def builtin_module(choice: str | None = None) -> ModuleType:
    """The compiled module holding the built-in activations' kernels, for this CPU.

    The portable build always works; the AVX2+FMA build (x86-64) is loaded only after the CPU says it
    has those instructions, so a wheel can never die with SIGILL. ``$DEEPNET_KERNELS`` overrides.
    """
    choice = (choice or os.environ.get(KERNELS_ENV, "auto")).strip().lower()
    if choice not in ("auto", "portable", "avx2"):
        raise ActivationError(f"{KERNELS_ENV} must be auto, portable or avx2, not {choice!r}")
    try:
        from deepnet import _kernels as portable
    except ImportError as exc:  # a source checkout that was never built
        raise ActivationError(
            f"the compiled kernels are missing ({exc}); install the package with `pip install -e .`"
        ) from None
    if choice == "portable":
        return portable
    if not portable.cpu_has_avx2_fma():
        if choice == "avx2":
            raise ActivationError(f"{KERNELS_ENV}=avx2 but this CPU has no AVX2/FMA")
        return portable
    try:
        from deepnet import _kernels_avx2
    except ImportError:
        if choice == "avx2":
            raise ActivationError(f"{KERNELS_ENV}=avx2 but this build has no AVX2 kernels") from None
        return portable  # built with DEEPNET_MARCH, or not on x86-64: the one build is the right one
    return _kernels_avx2


@dataclass(frozen=True)
class LayerKernels:
    """The compiled forward/backward of one activation: one call runs a whole chunk of layers."""

    name: str
    module: ModuleType
    index: int

    def forward(self, params: np.ndarray, h: np.ndarray, alpha: float, saves: np.ndarray | None = None,
                save_every: int = 0, work: np.ndarray | None = None, part: int = 0, n_parts: int = 1) -> None:
        """h (width, batch) through the rows of params in place; see ``deepnet._kernels.forward``."""
        self.module.forward(self.index, params, h, alpha, saves, save_every, work, part, n_parts)

    def backward(self, params: np.ndarray, saves: np.ndarray, save_every: int, g: np.ndarray,
                 alpha: float, lr: float, work: np.ndarray | None = None, threads: int = 1) -> None:
        """Back-propagate g through the chunk, updating params in place; see ``deepnet._kernels.backward``."""
        self.module.backward(self.index, params, saves, save_every, g, alpha, lr, work, threads)

    def workspace_size(self, width: int, batch: int, save_every: int) -> int:
        return self.module.workspace_size(width, batch, save_every)


def in_builtin_module(activation: activations.Activation, module: ModuleType | None = None) -> bool:
    """Whether the package's compiled module holds this very definition of the activation."""
    module = builtin_module() if module is None else module
    if activation.name not in module.ACTIVATION_NAMES:
        return False
    compiled = getattr(module, "ACTIVATION_DEFINITIONS", None)  # (name, forward_c, derivative_c) per entry
    if compiled is not None:
        return (activation.name, activation.forward_c, activation.derivative_c) in [tuple(d) for d in compiled]
    # A module built before definitions were recorded: it holds the built-in definitions it was built from.
    return activation.is_builtin


def kernels_for(name: str) -> LayerKernels:
    """The compiled kernels of the registered activation ``name``.

    A built-in comes from the package's compiled module; any other activation is compiled the first
    time (tens of seconds, needs a C compiler) and then loaded from the cache. A name that is not
    registered is an error naming it and the installed activations.
    """
    activation = activations.get(name)  # unknown names fail here, with the list of known ones
    module = builtin_module()
    if not in_builtin_module(activation, module):
        from deepnet.activations import compile as compile_activation

        module = compile_activation.load(activation)
    try:
        index = module.activation_index(name)
    except ValueError:
        raise ActivationError(f"activation {name!r} is registered but has no compiled kernel") from None
    return LayerKernels(name=name, module=module, index=index)
