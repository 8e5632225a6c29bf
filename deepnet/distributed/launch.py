"""Whether this process was started by an MPI launcher, read from its environment (nothing imported),
and the holding of Ctrl-C and SIGTERM while MPI starts.

A rank stopped by a signal before or inside MPI_Init leaves the other ranks spinning in MPI_Init for
ever (no deadline reaches into it, and SIGTERM cannot interrupt it). So a process started by a launcher
holds SIGINT and SIGTERM from its first moment (deepnet.__main__) until MPI has started (or until it
knows its command does not use MPI); a signal that came meanwhile is then handled as the command
handles signals (a training run: finish the step, save, stop).
"""

from __future__ import annotations

import os
import signal

#: Where launchers put a process's rank and the rank count (MPICH/Hydra, Open MPI, PMIx, Slurm).
RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")
SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "SLURM_NTASKS")

_HELD = {signal.SIGINT, signal.SIGTERM}


def _first_int(names: tuple[str, ...]) -> int | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def launched_size() -> int:
    """The rank count the launcher started (1 when not started by an MPI launcher)."""
    return _first_int(SIZE_VARIABLES) or 1


def launched_rank() -> int:
    """This process's rank as the launcher set it (0 when not started by one)."""
    return _first_int(RANK_VARIABLES) or 0 if launched_size() > 1 else 0


def hold_signals() -> None:
    """Hold SIGINT and SIGTERM (delivered later, by release_signals) if a launcher started several ranks."""
    if launched_size() > 1:
        signal.pthread_sigmask(signal.SIG_BLOCK, _HELD)


def release_signals() -> None:
    """Deliver the held signals from now on (a pending one is handled at once)."""
    if launched_size() > 1:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD)
