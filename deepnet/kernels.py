"""Finds the compiled kernels of an activation and calls them.

Built-in activations live in ``deepnet._kernels`` (compiled when the package is built). The rest of
the package talks to kernels only through ``LayerKernels``, so where a kernel comes from is decided here.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import numpy as np

from deepnet import activations
from deepnet.errors import ActivationError


def _builtin_module() -> ModuleType:
    try:
        from deepnet import _kernels
    except ImportError as exc:  # a source checkout that was never built
        raise ActivationError(
            f"the compiled kernels are missing ({exc}); install the package with `pip install -e .`"
        ) from None
    return _kernels


@dataclass(frozen=True)
class LayerKernels:
    """The compiled forward/backward of one activation: one call runs a whole chunk of layers."""

    name: str
    module: ModuleType
    index: int

    def forward(self, params: np.ndarray, h: np.ndarray, alpha: float, saves: np.ndarray | None = None,
                save_every: int = 0, work: np.ndarray | None = None) -> None:
        """h (width, batch) through the rows of params in place; see ``deepnet._kernels.forward``."""
        self.module.forward(self.index, params, h, alpha, saves, save_every, work)

    def backward(self, params: np.ndarray, saves: np.ndarray, save_every: int, g: np.ndarray,
                 alpha: float, lr: float, work: np.ndarray | None = None) -> None:
        """Back-propagate g through the chunk, updating params in place; see ``deepnet._kernels.backward``."""
        self.module.backward(self.index, params, saves, save_every, g, alpha, lr, work)

    def workspace_size(self, width: int, batch: int, save_every: int) -> int:
        return self.module.workspace_size(width, batch, save_every)


def kernels_for(name: str) -> LayerKernels:
    """The compiled kernels of the registered activation ``name``."""
    activations.get(name)  # unknown names fail here, with the list of known ones
    module = _builtin_module()
    try:
        index = module.activation_index(name)
    except ValueError:
        raise ActivationError(f"activation {name!r} is registered but has no compiled kernel") from None
    return LayerKernels(name=name, module=module, index=index)
