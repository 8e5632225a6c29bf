"""How many threads BLAS uses, set from Python (threadpoolctl when installed, else OpenBLAS's own setter).

BLAS calls made between two passes of the core kernels run on one thread (``one_blas_thread``): a
multi-threaded BLAS call leaves its worker threads spinning on the cores the kernels need next.
"""

from __future__ import annotations

import ctypes
import functools
import re
from contextlib import AbstractContextManager, contextmanager
from typing import Callable, Iterator, Sequence

# (set, get) function names of the OpenBLAS builds NumPy ships with (scipy-openblas, 64-bit ints) and of
# a system OpenBLAS.
_OPENBLAS_CALLS = (
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
    ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
    ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
    ("openblas_set_num_threads", "openblas_get_num_threads"),
)


def openblas_controls() -> list[tuple[Callable[[int], None], int]]:
    """(setter, current thread count) of every OpenBLAS loaded in this process (Linux; else none)."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted(set(re.findall(r"(/\S*openblas\S*\.so[\w.]*)", f.read())))
    except OSError:
        return []
    controls = []
    for path in paths:
        try:
            lib = ctypes.CDLL(path)  # already loaded: this only looks its symbols up
        except OSError:
            continue
        for set_name, get_name in _OPENBLAS_CALLS:
            if hasattr(lib, set_name) and hasattr(lib, get_name):
                getter = getattr(lib, get_name)
                getter.restype = ctypes.c_int
                setter = getattr(lib, set_name)
                setter.argtypes = [ctypes.c_int]
                setter.restype = None
                controls.append((setter, int(getter())))
                break
    return controls


@contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """Limit BLAS to ``n`` threads inside the block (0: leave it alone).

    Uses threadpoolctl when it is installed (any BLAS, any OS), else OpenBLAS's own setter found in
    the loaded libraries; without either it does nothing.
    """
    if not n:
        yield
        return
    try:
        from threadpoolctl import threadpool_limits  # an optional dependency
    except ImportError:
        threadpool_limits = None
    if threadpool_limits is not None:
        with threadpool_limits(limits=n, user_api="blas"):
            yield
        return
    with _openblas_limited(openblas_controls(), n):
        yield


@functools.cache
def _multi_threaded_openblas() -> tuple[tuple[Callable[[int], None], int], ...]:
    """(setter, thread count) of each loaded OpenBLAS using several threads: looked up once per process,
    since ``one_blas_thread`` runs twice a training step."""
    return tuple((setter, old) for setter, old in openblas_controls() if old > 1)


def one_blas_thread() -> AbstractContextManager[None]:
    """OpenBLAS limited to one thread inside the block (a no-op without OpenBLAS); cheaper per call than
    ``blas_threads(1)``."""
    return _openblas_limited(_multi_threaded_openblas(), 1)


@contextmanager
def _openblas_limited(controls: Sequence[tuple[Callable[[int], None], int]], n: int) -> Iterator[None]:
    """Each OpenBLAS (setter, thread count) set to ``n`` threads inside the block, restored after."""
    for setter, _ in controls:
        setter(n)
    try:
        yield
    finally:
        for setter, old in controls:
            setter(old)
