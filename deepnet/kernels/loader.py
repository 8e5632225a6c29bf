"""Finds the compiled kernels of an activation and calls them.

Built-in activations live in the package's build module for this CPU (``deepnet.kernels.builtin``); any
other registered activation (a plugin's, or a built-in this build predates) is compiled from the same
template on first use and cached on disk (``deepnet.kernels.jit``), and runs through that build module. The rest of the package talks to
kernels only through ``LayerKernels``, so where a kernel comes from is decided here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import ModuleType

import numpy as np

from deepnet import activations
from deepnet.errors import ActivationError
from deepnet.kernels import jit
# Which build runs is decided in deepnet.kernels.builtin; these names are also imported from here.
from deepnet.kernels.builtin import KERNELS_ENV, build_label, builtin_module, in_builtin_module, runnable_builds

__all__ = ["KERNELS_ENV", "LayerKernels", "build_label", "builtin_module", "in_builtin_module", "kernels_for",
           "runnable_builds"]


@dataclass(frozen=True)
class LayerKernels:
    """The compiled forward/backward of one activation: one call runs a whole chunk of layers.

    ``module`` holds the activation's loops: a build of the built-in kernels, or a plugin's module.
    ``runner`` is the build module whose checked calls run them (``module`` itself when None); a plugin's
    module has loops only and runs through the build it was compiled for. ``plugin`` is the activation of
    a plugin module that may specialise only some widths: another width's loops are compiled on first
    use (``loops_for``), so every width runs the loops a built-in would.
    """

    name: str
    module: ModuleType
    index: int
    runner: ModuleType | None = None
    plugin: activations.Activation | None = None
    _more: dict[int, ModuleType] = field(default_factory=dict, compare=False, repr=False)

    @property
    def calls(self) -> ModuleType:
        """The build module whose forward/backward/workspace_size run this activation's loops."""
        return self.module if self.runner is None else self.runner

    def loops_for(self, width: int) -> ModuleType:
        """The module holding the loops this activation runs at ``width``."""
        if self.plugin is None or width in self.module.WIDTH_VARIANTS or not jit.widths_for(width):
            return self.module
        found = self._more.get(width)
        if found is None:  # jit.load serialises concurrent first uses; both then get its one module
            found = self._more.setdefault(width, jit.load(self.plugin, jit.widths_for(width)))
        return found

    def forward(self, params: np.ndarray, h: np.ndarray, alpha: float, saves: np.ndarray | None = None,
                save_every: int = 0, work: np.ndarray | None = None, part: int = 0, n_parts: int = 1) -> None:
        """h (width, batch) through the rows of params in place; see ``deepnet._kernels.forward``."""
        self.calls.forward(self.index, params, h, alpha, saves, save_every, work, part, n_parts,
                           self.loops_for(h.shape[0]).KERNEL_TABLE)

    def backward(self, params: np.ndarray, saves: np.ndarray, save_every: int, g: np.ndarray,
                 alpha: float, lr: float, work: np.ndarray | None = None, threads: int = 1,
                 block: int = 8, split: str = "blocks") -> bool:
        """Back-propagate g through the chunk, updating params in place; whether every updated weight is
        finite. See ``deepnet._kernels.backward``."""
        return self.calls.backward(self.index, params, saves, save_every, g, alpha, lr, work, threads,
                                   self.loops_for(g.shape[0]).KERNEL_TABLE, block, split)

    def backward_blocks(self, width: int) -> tuple[int, ...]:
        """The batch blocks (samples) the backward pass can run at ``width``: (8,) or (8, 16)."""
        return self.calls.backward_blocks(self.index, width, self.loops_for(width).KERNEL_TABLE)

    def backward_block_count(self, batch: int, block: int) -> int:
        """How many blocks the backward pass cuts a batch into with ``block`` (one per sample below 8)."""
        return self.calls.backward_block_count(batch, block)

    @property
    def block16_native(self) -> bool:
        """Whether the 16-sample blocks run in one register per unit here (AVX-512), so may be faster."""
        return bool(self.calls.BLOCK16_NATIVE)

    def block16_halves(self, width: int) -> bool:
        """Whether, not native, a one-block batch's 16-sample blocks split by segments still run well at
        ``width`` (their pieces on two 8-lane halves, AVX2), so may be faster than 8-sample blocks."""
        return width == self.calls.BLOCK16_HALVES_WIDTH and 16 in self.backward_blocks(width)

    def workspace_size(self, width: int, batch: int, save_every: int) -> int:
        """Floats of work buffer a backward call at this shape needs."""
        return self.calls.workspace_size(width, batch, save_every)


def kernels_for(name: str, width: int | None = None) -> LayerKernels:
    """The compiled kernels of the registered activation ``name``.

    A built-in comes from the package's compiled module; any other activation is compiled the first
    time (seconds, needs a C compiler) and then loaded from the cache, and runs through the package's
    build module. Given the ``width`` it will run at, a plugin compiles that width's loops only (the
    fastest first use); without, the loops of every width the built-ins specialise. A name that is not
    registered is an error naming it and the installed activations.
    """
    activation = activations.get(name)  # unknown names fail here, with the list of known ones
    build = builtin_module()
    module, runner, plugin = build, None, None
    if not in_builtin_module(activation, build):
        widths = jit.ALL_WIDTHS if width is None else jit.widths_for(width)
        module, runner, plugin = jit.load(activation, widths), build, activation
    try:
        index = module.activation_index(name)
    except ValueError:
        raise ActivationError(f"activation {name!r} is registered but has no compiled kernel") from None
    return LayerKernels(name=name, module=module, index=index, runner=runner, plugin=plugin)
