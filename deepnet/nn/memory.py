"""Memory needs, checked before work starts: what a command will allocate against what the machine has.

A size that cannot fit (``init --width 100000``, ``train --batch 1000000000000``, ``train-mlp --hidden
100000000``) is refused with one line saying how much memory is needed and how much is available now
(``MemAvailable`` of /proc/meminfo), before anything is created or read. Where there is no /proc/meminfo
nothing is refused. The figures are the large arrays each piece allocates (weights, their float64 draws,
gradients and new values, a step's batch-sized buffers), not every small temporary: a refusal means the
work surely cannot fit, not that it surely can.
"""

from __future__ import annotations

from deepnet.errors import ConfigError
from deepnet.flags import int_at_least
from deepnet.formats import h5io
from deepnet.formats.create import default_storage_chunk_layers

F32 = 4
F64 = 8


def meminfo(field: str) -> int | None:
    """A field of /proc/meminfo (e.g. "MemAvailable", "MemTotal") in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def mem_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    return meminfo("MemAvailable")


def size(n: float) -> str:
    """Bytes for a message: "3.20 GB", "1200.00 TB"."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 1e9:.2f} GB"


def require(need: int, what: str, *, available: int | None = None) -> None:
    """Refuse ``what`` (e.g. "a training step at batch 64") if it needs more than the memory available."""
    available = mem_available() if available is None else available
    if available is not None and need > available:
        raise ConfigError(f"{what} needs {size(need)} of memory but only {size(available)} is available now "
                          f"(MemAvailable)")


def mlp_bytes(input_dim: int, hidden: int, n_classes: int) -> int:
    """The float32 parameters of a 784-H-10 MLP (the baseline or a branch)."""
    return F32 * (input_dim * hidden + hidden + hidden * n_classes + n_classes)


def mlp_new_bytes(input_dim: int, hidden: int, n_classes: int) -> int:
    """Drawing a new MLP: its parameters and the float64 draws of its larger weight matrix."""
    return mlp_bytes(input_dim, hidden, n_classes) + F64 * input_dim * hidden


def mlp_step_bytes(input_dim: int, hidden: int, n_classes: int, batch: int) -> int:
    """One SGD step of an MLP beyond its parameters: gradients and new values (two more copies), the
    largest lr * gradient temporary, and the batch's hidden activations and their gradient."""
    params = mlp_bytes(input_dim, hidden, n_classes)
    return 2 * params + F32 * input_dim * hidden + F32 * batch * (2 * hidden + 4 * n_classes)


def new_model_bytes(*, layers: int, width: int, input_dim: int, n_classes: int, hidden: int | None) -> int:
    """What creating a dense model file holds in RAM at once: one block of core rows with its float64
    draws, the heads with theirs, and the branch (if any)."""
    row = width * width + width
    block = min(layers, h5io.block_layers(default_storage_chunk_layers(layers, width), row))
    core = block * (F32 * row + F64 * width * width)
    heads = (F32 + F64) * (input_dim * width + width * n_classes) + F32 * (width + n_classes)
    branch = 0 if hidden is None else mlp_new_bytes(input_dim, hidden, n_classes)
    return core + heads + branch


def dense_step_bytes(*, width: int, input_dim: int, n_classes: int, hidden: int | None, batch: int) -> int:
    """A dense training step's batch-sized arrays (the minibatch and its indices, the heads' states and
    gradients), the heads' new values and the branch's step; the core engine's buffers come on top
    (CoreEngine.buffer_bytes)."""
    per_sample = F32 * (2 * input_dim + 6 * width + 6 * n_classes) + 8
    heads = 3 * F32 * (input_dim * width + width * n_classes)
    branch = 0 if hidden is None else mlp_step_bytes(input_dim, hidden, n_classes, batch)
    return batch * per_sample + heads + branch


def check_new_model(*, layers: int, width: int, input_dim: int, n_classes: int, hidden: int | None,
                    batch: int | None = None) -> None:
    """Refuse a new dense model whose creation (or, with ``batch``, its training at that batch) cannot fit
    in memory, before the file is created."""
    input_dim = int_at_least("input-dim", input_dim, 1)
    n_classes = int_at_least("n-classes", n_classes, 2)
    shape = dict(width=width, input_dim=input_dim, n_classes=n_classes, hidden=hidden)
    require(new_model_bytes(layers=layers, **shape),
            f"a model of width {width}, {input_dim} inputs" + ("" if hidden is None else f", branch hidden {hidden}"))
    if batch is not None:
        require(dense_step_bytes(**shape, batch=batch), f"a training step at batch {batch}")


def check_mlp_training(*, input_dim: int, hidden: int, n_classes: int, batch: int, new: bool) -> None:
    """Refuse MLP training (``new``: of a model still to be drawn) that cannot fit in memory."""
    need = mlp_step_bytes(input_dim, hidden, n_classes, batch) + F32 * batch * input_dim
    need += mlp_new_bytes(input_dim, hidden, n_classes) if new else 0
    require(need, f"training an MLP of hidden {hidden} at batch {batch}")
