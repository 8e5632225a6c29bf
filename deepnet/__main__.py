"""`python -m deepnet` and the `deepnet` console command.

The signal convention (deepnet.interrupts) is installed first, before the command line's heavy imports
(numpy, h5py, fire), so a Ctrl-C or SIGTERM at any moment after launch stops the command with one line
and its exit status, never a traceback.
"""

import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `deepnet` console command; returns its exit status."""
    from deepnet import interrupts
    from deepnet.distributed.launch import hold_signals

    restore = interrupts.install()
    hold_signals()  # one of several MPI ranks: until MPI has started (deepnet.distributed.launch)
    try:
        from deepnet.cli import main as run

        return run(argv)
    except KeyboardInterrupt as exc:  # before the command line's own handling was in place
        print(interrupts.stop_line(exc), file=sys.stderr)
        if argv is None:  # the console command itself is about to exit
            interrupts.ignore()
        return interrupts.exit_status(exc)
    finally:
        if argv is not None:  # called in-process: leave the caller's handlers as they were
            restore()


if __name__ == "__main__":
    sys.exit(main())
