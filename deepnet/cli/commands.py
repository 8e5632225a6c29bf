"""The commands of ``deepnet``: each an API function (deepnet.api) with a printer for its result.

A command's flags are its API function's parameters (less ``progress`` and ``on_report``, which the
command line sets) plus the flags every command has (deepnet.cli.conventions.COMMON_FLAGS); its help
is the function's docstring. ``progress`` is on when stderr is a terminal, unless --json or --quiet,
``--progress``/``--no-progress`` or $DEEPNET_PROGRESS say otherwise; report rows are printed as they
come unless --quiet.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from typing import Any, Callable

from tqdm import tqdm

from deepnet import api
import deepnet.cli.printers as show
from deepnet.cli.args import check_values
from deepnet.cli.help import parse_doc
from deepnet.cli.printers import Printer
from deepnet.errors import ConfigError
from deepnet.report import ReportTable, print_json

#: API parameters the command line sets itself rather than offering as flags.
NOT_FLAGS = ("progress", "on_report")

#: $DEEPNET_PROGRESS: the default of --progress (0 or 1); unset, bars show on a terminal only.
PROGRESS_VARIABLE = "DEEPNET_PROGRESS"


def _switch(name: str, default: object) -> inspect.Parameter:
    annotation = "bool" if default is False else "bool | None"
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


class ReportRows:
    """The ``on_report`` of a command: each report row printed as it comes, as a JSON line or a table row
    (the columns follow the first row's fields)."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json
        self.table: ReportTable | None = None

    def __call__(self, row: dict) -> None:
        if self.as_json:
            print_json({k: v for k, v in row.items() if v is not None})  # None: not measured this time
            return
        if self.table is None:
            self.table = ReportTable(row, write=self._write)
        self.table.row(row)

    @staticmethod
    def _write(line: str) -> None:
        tqdm.write(line)  # above any progress bar
        sys.stdout.flush()


def show_progress(given: bool | None, *, as_json: bool, quiet: bool) -> bool:
    """Whether to draw progress bars: as --progress/--no-progress say, else as $DEEPNET_PROGRESS says,
    else on a terminal only (a log of a redirected run gets no bar updates) and never with --json or
    --quiet."""
    if given is not None:
        return given
    setting = os.environ.get(PROGRESS_VARIABLE, "").strip()
    if setting:
        if setting not in ("0", "1"):
            raise ConfigError(f"${PROGRESS_VARIABLE} must be 0 or 1, got {setting!r}")
        return setting == "1"
    if as_json or quiet:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stderr
        return False


def command(fn: Callable[..., Any], printer: Printer) -> Callable[..., None]:
    """The command of API function ``fn``: its flags and help, its result printed by ``printer``."""
    signature = inspect.signature(fn)
    common = [_switch("json", False), _switch("quiet", False)]
    if "progress" in signature.parameters:
        common.append(_switch("progress", None))
    flags = signature.replace(parameters=[p for name, p in signature.parameters.items() if name not in NOT_FLAGS]
                              + common)

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        bound = flags.bind(*args, **kwargs)
        check_values(flags, bound.arguments)
        bound.apply_defaults()
        given = dict(bound.arguments)
        as_json, quiet = bool(given.pop("json")), bool(given.pop("quiet"))
        wanted = given.pop("progress", None)
        extra: dict[str, Any] = {}
        if "progress" in signature.parameters:
            extra["progress"] = show_progress(wanted, as_json=as_json, quiet=quiet)
        if "on_report" in signature.parameters and not quiet:
            extra["on_report"] = ReportRows(as_json)
        printer(fn(**given, **extra), {**given, "json": as_json, "quiet": quiet})

    run.__signature__ = flags  # what fire, the flag check and the help read
    return run


#: The subcommands of `deepnet activations` (without one, it lists).
GROUP_COMMANDS = ("list", "check", "compile")


class Activations:
    """List the activations (built-in and plugins), check one, or compile plugins ahead of use.

    `deepnet activations` lists name, origin (built-in or the plugin's package), whether its kernel is
    compiled (built in, cached, or not yet: plugins compile on first use) and description.
    `deepnet activations check NAME` runs NAME's compiled kernel (compiling it if needed) over a grid
    of z, compares the C derivative with central finite differences of the C forward and both with
    the NumPy versions, prints the worst errors relative to their allowances, and fails if any is over.
    `deepnet activations compile [NAME]` compiles NAME (default: every activation not compiled yet).
    """

    __call__ = staticmethod(command(api.list_activations, show.show_activations))
    list = staticmethod(command(api.list_activations, show.show_activations))
    check = staticmethod(command(api.check_activation, show.show_activation_check))
    compile = staticmethod(command(api.compile_activations, show.show_compiled))


class DeepnetCLI:
    """Exact SGD through absurdly deep, narrow residual networks on MNIST."""

    init = staticmethod(command(api.init, show.show_init))
    train = staticmethod(command(api.train, show.show_train))
    eval = staticmethod(command(api.evaluate, show.show_eval))
    speedrun = staticmethod(command(api.speedrun, show.show_speedrun))
    # The original experiment's command names (deepnet.cli.conventions.COMMAND_ALIASES).
    train_dense = train
    eval_dense = eval
    bench = staticmethod(command(api.bench, show.show_bench))
    info = staticmethod(command(api.info, show.show_info))
    check = staticmethod(command(api.check, show.show_check))
    train_mlp = staticmethod(command(api.train_mlp, show.show_train_mlp))
    eval_mlp = staticmethod(command(api.evaluate_mlp, show.show_eval))
    import_raw = staticmethod(command(api.import_raw, show.show_import_raw))
    export_raw = staticmethod(command(api.export_raw, show.show_export_raw))
    plot = staticmethod(command(api.plot, show.show_plot))
    diagnose = staticmethod(command(api.diagnose, show.show_diagnose))
    shard = staticmethod(command(api.shard, show.show_shard))
    gather = staticmethod(command(api.gather, show.show_gather))
    data = staticmethod(command(api.fetch_data, show.show_data))
    teacher = staticmethod(command(api.teacher, show.show_teacher))
    luckmatters = staticmethod(command(api.luckmatters, show.show_luckmatters))
    activations = Activations()


def command_names() -> list[str]:
    """Every command's name as typed (dashes), aliases included, sorted."""
    return sorted(name.replace("_", "-") for name, value in vars(DeepnetCLI).items()
                  if isinstance(value, (staticmethod, Activations)))


def lookup(name: str) -> staticmethod | Activations | None:
    """The command called ``name`` (dashes or underscores), or None."""
    value = vars(DeepnetCLI).get(name.replace("-", "_"))
    return value if isinstance(value, (staticmethod, Activations)) else None


def listing() -> list[tuple[str, str, list[str]]]:
    """(name, summary, aliases) of every command, in the order of DeepnetCLI, for `deepnet --help`."""
    names: dict[Callable[..., Any], list[str]] = {}
    for name, value in vars(DeepnetCLI).items():
        if isinstance(value, staticmethod):
            names.setdefault(value.__func__, []).append(name.replace("_", "-"))
    rows = [(aliases[0], _summary(fn), aliases[1:]) for fn, aliases in names.items()]
    rows.append(("activations", _summary(Activations), []))
    return rows


def _summary(obj: object) -> str:
    return parse_doc(inspect.getdoc(obj)).summary
