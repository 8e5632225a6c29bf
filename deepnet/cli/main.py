"""The ``deepnet`` command line: help, version and the checks of deepnet.cli.args first, then fire runs
the command; errors, warnings, notices and stops become one line each on stderr.

Why a layer over fire rather than fire alone: fire's help and errors are a library's (``INFO:`` lines,
underscored names, automatic one-letter abbreviations that take ``-h``, "Could not consume arg"), so
this module answers ``--help``, ``--version`` and every malformed line itself and hands fire only a
command line it will run as typed.
"""

from __future__ import annotations

import inspect
import logging
import os
import shlex
import signal
import sys
import warnings
from typing import Any, Callable

import fire
from tqdm import tqdm

from deepnet import __version__, interrupts
import deepnet.cli.args as cli_args
import deepnet.cli.commands as commands
import deepnet.cli.help as pages
from deepnet.cli.args import did_you_mean, is_flag
from deepnet.cli.conventions import COMMAND_ALIASES
from deepnet.distributed import mpi
from deepnet.distributed.launch import release_signals
from deepnet.errors import ConfigError, DeepnetError
from deepnet.formats.values import one_line

#: The commands whose interruption can be finished by `--until-step` (the command line is repeated
#: with it in place of --steps).
RESUMABLE = ("train", "train-dense", "train-mlp")


def _resolve(args: list[str]) -> tuple[str, Callable[..., Any], list[str]]:
    """The command ``args`` name: its name as typed, its function and the arguments after it."""
    name = args[0]
    value = commands.lookup(name)
    if value is None:
        names = [n for n in commands.command_names() if n not in COMMAND_ALIASES]
        raise ConfigError(f"unknown command {name!r}" + did_you_mean(name, commands.command_names())
                          + f" (commands: {', '.join(names)})")
    rest = args[1:]
    if isinstance(value, commands.Activations):  # a command group: its subcommand, else the group's default
        if rest and not is_flag(rest[0]):
            action = rest[0].replace("-", "_")
            if action not in commands.GROUP_COMMANDS:
                raise ConfigError(f"deepnet {name}: unknown action {rest[0]!r}"
                                  + did_you_mean(rest[0], list(commands.GROUP_COMMANDS))
                                  + f" (use {', '.join(commands.GROUP_COMMANDS)})")
            return f"{name} {rest[0]}", getattr(value, action), rest[1:]
        return name, value.__call__, rest
    return name, value.__func__, rest


def _wants_help(rest: list[str]) -> bool:
    return any(arg in ("-h", "--help") for arg in rest)


def prepare_args(args: list[str]) -> list[str]:
    """The whole command line as fire is to get it (the command's words, then its flags), or ConfigError
    naming what is wrong with it. A line asking for help is returned as it is."""
    if not args or args[0] in ("--help", "-h", "--version", "-V"):
        return args
    if is_flag(args[0]):
        raise ConfigError(f"a command comes first, got {args[0]!r} (commands: {', '.join(commands.command_names())})")
    name, fn, rest = _resolve(args)
    head = args[: len(args) - len(rest)]
    if _wants_help(rest):
        return args
    return head + cli_args.rewrite(name, fn, inspect.signature(fn), rest)


def help_text(args: list[str]) -> str:
    """The help page a command line asks for: the top page, or a command's."""
    if not args or is_flag(args[0]):
        return pages.top_help(__version__, commands.listing())
    name, fn, _ = _resolve(args)
    if name == "activations":
        fn = commands.Activations
        signature = inspect.signature(commands.Activations.list)
        return pages.command_help("activations [list | check NAME | compile [NAME]]", fn, signature,
                                 common=("json", "quiet"))
    signature = inspect.signature(fn)
    common = tuple(key for key in ("json", "quiet", "progress") if key in signature.parameters)
    return pages.command_help(name, fn, signature, common=common)


class _NoticeHandler(logging.Handler):
    """The library's notices and warnings (logging "deepnet") as ``deepnet: ...`` lines above any bar."""

    def emit(self, record: logging.LogRecord) -> None:
        prefix = "deepnet: warning: " if record.levelno >= logging.WARNING else "deepnet: "
        tqdm.write(prefix + one_line(record.getMessage()), file=sys.stderr)


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """A warning as one line on stderr (``deepnet: warning: ...``), above any progress bar."""
    tqdm.write(f"deepnet: warning: {one_line(message)}", file=sys.stderr)


class _Output:
    """stderr's conventions for one command: notices (INFO) and warnings as one line each, nothing but
    errors with --quiet; undone on exit, so that an in-process caller keeps its own settings."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.logger = logging.getLogger("deepnet")
        self.handler = _NoticeHandler()

    def __enter__(self) -> "_Output":
        self.saved = (self.logger.level, self.logger.propagate, warnings.showwarning, warnings.filters[:])
        self.logger.addHandler(self.handler)
        self.logger.setLevel(logging.ERROR if self.quiet else logging.INFO)
        self.logger.propagate = False
        warnings.showwarning = _show_warning
        if self.quiet:
            warnings.simplefilter("ignore")
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self.handler)
        self.logger.setLevel(self.saved[0])
        self.logger.propagate = self.saved[1]
        warnings.showwarning = self.saved[2]
        warnings.filters[:] = self.saved[3]


def finish_command(args: list[str], until_step: int) -> str:
    """The command line ``args`` with ``--until-step N`` in place of its run length (--steps, -n,
    --until-step), as the user is to type it to finish an interrupted run."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
            continue
        key = arg.partition("=")[0]
        if key in ("--steps", "-n", "--until-step", "--until_step"):
            skip = "=" not in arg
            continue
        out.append(arg)
    launcher = ["mpiexec", "-n", str(mpi.launched_size())] if mpi.launched_size() > 1 else []
    return shlex.join([*launcher, "deepnet", *out, "--until-step", str(until_step)])


def _stopped(exc: KeyboardInterrupt, args: list[str]) -> str:
    """The line of a stopped command; for a training run, the command that finishes it."""
    line = interrupts.stop_line(exc)
    until = getattr(exc, "until_step", None)
    held = getattr(exc, "held_step", None)
    if args and args[0] in RESUMABLE and until is not None and held is not None and held < until:
        line += f"; to finish the run: {finish_command(args, until)}"
    return line


def _report_error(exc: DeepnetError) -> None:
    """The error line. Under mpiexec, rank 0 reports what every rank found (a bad flag); another rank
    reports, prefixed with its number, only what it alone found."""
    rank = mpi.launched_rank()
    if rank == 0:
        print(f"deepnet: error: {one_line(exc)}", file=sys.stderr)
    elif not isinstance(exc, ConfigError):
        print(f"deepnet: error: rank {rank}: {one_line(exc)}", file=sys.stderr)


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that flushing it at exit does not fail on the closed pipe again."""
    try:
        fd = os.open(os.devnull, os.O_WRONLY)
        os.dup2(fd, sys.stdout.fileno())
        os.close(fd)
    except (OSError, ValueError, AttributeError):  # no file descriptor (a captured stdout): nothing to flush
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `deepnet` command line; returns its exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    quiet = any(a in ("-q", "--quiet", "--quiet=true", "--quiet=1") for a in args)
    restore = interrupts.install()
    try:
        with _Output(quiet):
            if args[:1] in (["--version"], ["-V"]):
                if len(args) > 1:
                    raise ConfigError(f"--version takes nothing after it, got {args[1]!r}")
                print(f"deepnet {__version__}")
                return 0
            if not args or args[0] in ("-h", "--help") or (not is_flag(args[0]) and _wants_help(args[1:])):
                print(help_text(args))
                return 0
            prepared = prepare_args(args)
            if args[0] not in RESUMABLE[:2]:
                release_signals()  # held at launch for a run over MPI ranks, which this is not
                if mpi.launched_rank() > 0:
                    return 0  # under mpiexec only training spans the ranks; rank 0 runs any other command alone
            # An instance, not the class: fire resolves the command on it.
            fire.Fire(commands.DeepnetCLI(), command=prepared, name="deepnet")
    except DeepnetError as exc:
        if debug:
            raise
        status = getattr(exc, "exit_status", 2)
        _report_error(exc)
        abort = getattr(exc, "abort", None)  # a rank failed mid-run: the others must not wait for it
        if abort is not None:
            abort(status)
        return status
    except KeyboardInterrupt as exc:
        if mpi.launched_rank() == 0:  # every rank stops after the same step; rank 0 says so
            print(_stopped(exc, args), file=sys.stderr)
        if argv is None:  # the console command itself is about to exit
            interrupts.ignore()
        return interrupts.exit_status(exc)
    except fire.core.FireExit as exc:
        return exc.code if isinstance(exc.code, int) else 2
    except BrokenPipeError:
        # The reader of the output went away (`deepnet activations | head -1`): stop quietly, with the
        # status of a writer killed by SIGPIPE, as other commands in a pipeline do.
        _discard_stdout()
        return 128 + signal.SIGPIPE
    finally:
        if argv is not None:  # called in-process (tests, scripts): leave the caller's handlers as they were
            restore()
    return 0
