"""The ``deepnet`` command: fire over the Python API (deepnet.api), and the only module that prints results.

Each command is an API function: its signature gives the flags (``progress`` and ``on_report`` are the
command line's to set: bars unless ``--json``, report rows printed as they come) and its docstring the
``--help``; a printer per command shows the returned result as aligned text, or as JSON with ``--json``.
User errors (``DeepnetError``) print one line and exit 2; ``--debug`` anywhere on the command line shows
the traceback instead.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import fire
from tqdm import tqdm

from deepnet import api, interrupts
from deepnet.activations.check import ActivationCheckError, failure_message, format_report
from deepnet.errors import ConfigError, DeepnetError
from deepnet.flags import finite_number, integer
from deepnet.formats.hdf5 import ModelFile
from deepnet.formats.values import one_line
from deepnet.report import ReportTable, format_rate, format_seconds, jsonable, print_fields, print_json, run_fields
from deepnet.tools.check import CheckReport
from deepnet.training.speedrun import TargetNotReached

#: What a printer gets: the API function's result and the arguments it was called with.
Printer = Callable[[Any, dict], None]

#: API parameters the command line sets itself rather than offering as flags.
NOT_FLAGS = ("progress", "on_report")

#: The output format is the command line's business, so every command has --json and no API function does.
JSON_FLAG = inspect.Parameter("json", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=bool)
JSON_HELP = "\n        json: print JSON (one object; a line per report while training) instead of aligned text.\n"


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


def command(fn: Callable[..., Any], show: Printer) -> Callable[..., None]:
    """The command of API function ``fn``: its flags and --help, its result printed by ``show``."""
    signature = inspect.signature(fn)
    flags = signature.replace(parameters=[p for name, p in signature.parameters.items() if name not in NOT_FLAGS]
                              + [JSON_FLAG])

    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> None:
        bound = flags.bind(*args, **kwargs)
        check_values(flags, bound.arguments)
        bound.apply_defaults()
        given = dict(bound.arguments)
        quiet = bool(given.pop("json"))
        extra: dict[str, Any] = {}
        if "progress" in signature.parameters:
            extra["progress"] = not quiet
        if "on_report" in signature.parameters:
            extra["on_report"] = ReportRows(quiet)
        show(fn(**given, **extra), {**given, "json": quiet})

    run.__signature__ = flags  # what fire and the flag check read
    run.__doc__ = (fn.__doc__ or "").rstrip() + JSON_HELP
    return run


# ------------------------------------------------------------------------------------------------
# printers


def show_init(result: ModelFile, args: dict) -> None:
    extra = f", with an MLP branch of {args['hidden']} hidden units" if args["branch"] else ""
    print(f"created {args['model']}: {args['layers']} layers x width {args['width']}, {args['activation']}{extra}")


def _final_fields(final: dict, model: str) -> dict:
    """The lines a training run's text summary starts with."""
    return {
        "model": model,
        "steps": f"{final['steps']} (now at step {final['step']})",
        "loss": f"{final['loss']:.4f} (mean of the last report window)",
        "batch_acc": f"{final['batch_acc']:.3f}",
        "time": f"{format_seconds(final['seconds'])} ({final['seconds_per_step']:.4f} s/step)",
    }


def _test_field(final: dict) -> dict:
    """The test evaluation's line, if the run made one."""
    if "test_acc" not in final:
        return {}
    return {"test": f"loss {final['test_loss']:.4f}, accuracy {final['test_acc']:.4f} on {final['test_samples']} images"}


def show_train(final: dict, args: dict) -> None:
    if args["json"]:
        print_json(final)
        return
    fields = _final_fields(final, final["model"])
    fields["layer-samples/s"] = format_rate(final["layer_samples_per_s"])
    fields.update(_test_field(final))
    fields.update(run_fields(final))
    print_fields(fields)


def show_eval(figures: dict, args: dict) -> None:
    if args["json"]:
        print_json(figures)
        return
    correct = int(round(figures["accuracy"] * figures["samples"]))
    fields = {
        "model": figures["model"],
        "step": figures["step"],
        "loss": f"{figures['loss']:.4f}",
        "accuracy": f"{figures['accuracy']:.4f} ({correct}/{figures['samples']})",
        "time": f"{format_seconds(figures['seconds'])} ({figures['samples_per_s']:.1f} images/s)",
    }
    if figures.get("ema"):
        fields["weights"] = f"the average (EMA {figures['ema_decay']:g}) taken at step {figures['ema_step']}"
    print_fields(fields)


def show_speedrun(report: dict, args: dict) -> None:
    if args["json"]:
        print_json(report)
    else:
        r = report["recipe"]
        if report["reached"]:
            headline = (f"{format_seconds(report['time_to_target'])} ({report['time_to_target']:.1f} s) to held-out "
                        f"accuracy {report['heldout_acc']:.4f} >= {report['target_acc']:g}, at step {report['steps']}")
        else:
            best = "no held-out evaluation passed the gate" if report["best_heldout_acc"] is None else \
                f"best held-out accuracy {report['best_heldout_acc']:.4f} at step {report['best_heldout_step']}"
            headline = (f"target {report['target_acc']:g} NOT reached in {report['steps']} steps "
                        f"({format_seconds(report['seconds'])}; {best})")
        print_fields({
            "time to target": headline,
            "test": (f"accuracy {report['test_acc']:.4f}, loss {report['test_loss']:.4f} on "
                     f"{report['test_samples']} images"),
            "time": (f"{format_seconds(report['seconds'])}: steps {format_seconds(report['train_seconds'])} "
                     f"({report['seconds_per_step']:.4f} s/step), {report['evaluations']} held-out evaluations "
                     f"{format_seconds(report['eval_seconds'])}"),
            "workload": (f"{r['layers']:,} layers x width {r['width']}, {r['activation']}, batch {r['batch']}, "
                         f"lr {r['layer_lr']:g}/{r['head_lr']:g} {r['schedule']}, {report['mode']}, "
                         f"held-out {r['holdout']} images every {r['eval_every']} steps"),
            "machine": report["machine"],
            **({"model": report["model"]} if report["model"] else {}),
        })
    if not report["reached"]:
        raise TargetNotReached(f"the target held-out accuracy {report['target_acc']:g} was not reached in "
                               f"{report['steps']} steps")


def show_info(summary: dict, args: dict) -> None:
    if args["json"]:
        print_json(jsonable(summary))
    else:
        print_fields(summary)


class CheckFailed(DeepnetError):
    """`deepnet check` found a torn or damaged file (exit status 1)."""

    exit_status = 1


def show_check(report: CheckReport, args: dict) -> None:
    if args["json"]:
        print_json(report.as_dict())
    else:
        print(report.text())
    if not report.healthy:
        raise CheckFailed(f"{args['model']}: {report.summary}")


def show_bench(result: dict, args: dict) -> None:
    if args["json"]:
        print_json(result)
        return
    fields = {
        "workload": (f"{args['layers']:,} layers x width {args['width']}, {args['activation']}, batch "
                     f"{args['batch']}, {result['mode']}"),
        "s/step": (f"{result['seconds_per_step']:.4f} median of {args['steps']} "
                   f"(min {result['seconds_per_step_min']:.4f})"),
        "warm-up": f"{len(result['warmup_times'])} steps, "
                   + " ".join(f"{seconds:.3f}" for seconds in result["warmup_times"]) + " s",
        "threads": "forward/backward per step: " + " ".join(f"{fwd}/{bwd}" for fwd, bwd in result["step_threads"]),
        "layer-samples/s": format_rate(result["layer_samples_per_s"]),
        "kernels": result["kernels"],
        "peak memory": f"{result['peak_rss_bytes'] / 2**30:.2f} GiB",
    }
    stolen = result["cpu_stolen_fraction"]
    fields["cpu stolen"] = ("not measured (no steal count from the kernel, or timed steps too short to count)"
                            if stolen is None else f"{100 * stolen:.1f}% of the machine's CPU time during the "
                            "timed steps (run by the hypervisor for others)")
    if args["eval_images"]:
        fields["eval"] = f"{result['eval_images_per_s']:.1f} images/s over {args['eval_images']} images"
    print_fields(fields)


def show_train_mlp(final: dict, args: dict) -> None:
    if args["json"]:
        print_json(final)
        return
    print_fields({**_final_fields(final, f"{final['model']} (mlp, hidden {final['hidden']})"), **_test_field(final)})


def show_eval_mlp(figures: dict, args: dict) -> None:
    if args["json"]:
        print_json(figures)
        return
    correct = int(round(figures["accuracy"] * figures["samples"]))
    print_fields({
        "model": f"{figures['model']} (mlp, hidden {figures['hidden']})",
        "step": figures["step"],
        "loss": f"{figures['loss']:.4f}",
        "accuracy": f"{figures['accuracy']:.4f} ({correct}/{figures['samples']})",
        "time": f"{format_seconds(figures['seconds'])} ({figures['samples_per_s']:.0f} images/s)",
    })


def show_import_raw(result: dict, args: dict) -> None:
    if args["json"]:
        print_json(result)
        return
    shape = (f"{result['layers']:,} layers x width {result['width']}, {result['activation']}, "
             f"alpha {result['alpha']:g}" if result["kind"] == "dense" else f"mlp, hidden {result['hidden']}")
    print(f"imported {args['model']}: {shape} ({result['bytes']:,} bytes in {result['seconds']:.2f}s)")


def show_export_raw(result: dict, args: dict) -> None:
    if args["json"]:
        print_json(result)
        return
    files = " and ".join(p for p in (result.get("weights"), result["head"]) if p)
    print(f"exported {args['model']} ({result['kind']}) to {files}: "
          f"{result['bytes']:,} bytes in {result['seconds']:.2f}s")


def show_plot(result: dict, args: dict) -> None:
    if args["json"]:
        print_json(result)
    else:
        print(f"wrote {result['out']}: {result['rows']:,} log rows, moving average of {result['smooth']}")


def show_data(path: Path, args: dict) -> None:
    print(f"MNIST is in {path}")


def show_activations(result: dict, args: dict) -> None:
    for row in result["activations"]:
        if args["json"]:
            print_json(row)
        else:
            print(f"{row['name']:<16} {row['origin']:<28} {row['compiled']:<9} {row['description']}")
    # result["problems"] reached stderr already, one line each, as the plugins' warnings (main()).


def show_activation_check(result: dict, args: dict) -> None:
    if args["json"]:
        print_json(result)
    else:
        print(format_report(result))
    if not result["ok"]:
        raise ActivationCheckError(failure_message(result))


def show_compiled(rows: list[dict], args: dict) -> None:
    for row in rows:
        if args["json"]:
            print_json(row)
        else:
            print(f"{row['name']}: {row['module']} ({row['path'] if row['path'] is not None else 'built in'})")


# ------------------------------------------------------------------------------------------------
# the commands


#: The subcommands of `deepnet activations` (without one, it lists).
GROUP_COMMANDS = ("list", "check", "compile")


class Activations:
    """List the activations (built-in and plugins), check one, or compile plugins ahead of use.

    `deepnet activations` lists name, origin (built-in or the plugin's package), whether its kernel is
    compiled (built in, cached, or not yet: plugins compile on first use) and description.
    `deepnet activations check NAME` runs NAME's compiled kernel (compiling it if needed) over a grid
    of z, compares the C derivative with central finite differences of the C forward and both with
    the NumPy versions, prints the worst errors, and fails if any is over its tolerance.
    `deepnet activations compile [NAME]` compiles NAME (default: every activation not compiled yet).
    """

    __call__ = staticmethod(command(api.list_activations, show_activations))
    list = staticmethod(command(api.list_activations, show_activations))
    check = staticmethod(command(api.check_activation, show_activation_check))
    compile = staticmethod(command(api.compile_activations, show_compiled))


class DeepnetCLI:
    """Exact SGD through absurdly deep, narrow residual networks on MNIST."""

    init = staticmethod(command(api.init, show_init))
    train = staticmethod(command(api.train, show_train))
    eval = staticmethod(command(api.evaluate, show_eval))
    speedrun = staticmethod(command(api.speedrun, show_speedrun))
    # The original experiment's command names.
    train_dense = train
    eval_dense = eval
    bench = staticmethod(command(api.bench, show_bench))
    info = staticmethod(command(api.info, show_info))
    check = staticmethod(command(api.check, show_check))
    train_mlp = staticmethod(command(api.train_mlp, show_train_mlp))
    eval_mlp = staticmethod(command(api.evaluate_mlp, show_eval_mlp))
    import_raw = staticmethod(command(api.import_raw, show_import_raw))
    export_raw = staticmethod(command(api.export_raw, show_export_raw))
    plot = staticmethod(command(api.plot, show_plot))
    data = staticmethod(command(api.fetch_data, show_data))
    activations = Activations()


def _flag_list(fn: Callable[..., Any]) -> str:
    return " ".join(f"--{name.replace('_', '-')}" for name in inspect.signature(fn).parameters)


def usage() -> str:
    """`deepnet --help`'s description: the commands and each one's flags, read from their signatures."""
    names: dict[Callable[..., Any], list[str]] = {}  # a command and its aliases
    for name, value in vars(DeepnetCLI).items():
        if isinstance(value, staticmethod):
            names.setdefault(value.__func__, []).append(name.replace("_", "-"))
    lines = [f"{', '.join(aliases)}: {_flag_list(fn)};" for fn, aliases in names.items()]
    lines.append(f"activations [list | check NAME | compile [NAME]]: {_flag_list(Activations.check)}.")
    return "\n".join([
        "Exact SGD through absurdly deep, narrow residual networks on MNIST.",
        "",
        "Commands: " + ", ".join(" (alias ".join(aliases) + ")" * (len(aliases) > 1) for aliases in names.values())
        + ", activations.",
        "`deepnet COMMAND --help` describes a command's flags:",
        *lines,
        "Add --debug to any command to see a traceback on error.",
    ])


DeepnetCLI.__doc__ = usage()  # derived, so a flag added to an API function shows up here too


#: What a switch's ``--flag=VALUE`` may say (any case); anything else is refused.
SWITCH_VALUES = {"true": True, "false": False, "1": True, "0": False}

#: fire's own tokens: what follows "-" or "--" is not the command's.
FIRE_SEPARATORS = ("-", "--")


def _kinds(param: inspect.Parameter) -> set[str]:
    """The type names of a parameter's annotation (``int | None`` -> {"int", "None"})."""
    annotation = param.annotation
    if isinstance(annotation, str):
        return {part.strip() for part in annotation.split("|")}
    return {getattr(annotation, "__name__", str(annotation))}


def _is_switch(param: inspect.Parameter) -> bool:
    return "bool" in _kinds(param)


def _is_text(param: inspect.Parameter) -> bool:
    return bool(_kinds(param) & {"str", "PathLike"}) and not _is_switch(param)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _is_flag(arg: str) -> bool:
    """A flag as fire sees one: a hyphen and a letter (``-x``, ``--x``), not a negative number."""
    return re.match(r"^--?[A-Za-z_]", arg) is not None


def _command_names() -> list[str]:
    names = [name.replace("_", "-") for name, value in vars(DeepnetCLI).items()
             if isinstance(value, (staticmethod, Activations))]
    return sorted(names)


def _resolve(args: list[str]) -> tuple[str, Callable[..., Any], list[str]]:
    """The command ``args`` name: its name as typed, its function and the arguments after it."""
    name = args[0]
    value = vars(DeepnetCLI).get(name.replace("-", "_"))
    if not isinstance(value, (staticmethod, Activations)):
        raise ConfigError(f"unknown command {name!r} (commands: {', '.join(_command_names())})")
    rest = args[1:]
    if isinstance(value, Activations):  # a command group: its subcommand, else the group's default
        if rest and not _is_flag(rest[0]):
            if rest[0].replace("-", "_") not in GROUP_COMMANDS:
                raise ConfigError(f"deepnet {name}: unknown action {rest[0]!r} (use {', '.join(GROUP_COMMANDS)})")
            return f"{name} {rest[0]}", getattr(value, rest[0].replace("-", "_")), rest[1:]
        return name, value.__call__, rest
    return name, value.__func__, rest


def prepare_args(args: list[str]) -> list[str]:
    """The command line as fire is to get it, or ConfigError naming what is wrong with it.

    Checked before the command runs (fire calls a command with the flags it recognises and only then
    complains about the rest, so a mistyped flag would otherwise train with defaults first): the
    command exists, each flag is one of its flags (given twice, the last counts) and has its value,
    each positional argument has a place, every required argument is there. Rewritten so that fire reads each value as its type says:
    a switch (a bool flag) never takes the next argument (``--json M`` is ``--json`` and ``M``) and
    ``--flag=VALUE`` must be true/false/1/0; the text of a path or name reaches the command as
    typed (fire would read ``--model 1e3`` as the number 1000.0).
    """
    if not args or args[0] in ("--help", "-h"):
        return args
    if _is_flag(args[0]):
        raise ConfigError(f"a command comes first, got {args[0]!r} (commands: {', '.join(_command_names())})")
    name, fn, rest = _resolve(args)
    head = args[: len(args) - len(rest)]
    if "--help" in rest or "-h" in rest:
        return args
    params = inspect.signature(fn).parameters
    positional = [p for p in params.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    given: set[str] = set()
    out: dict[str, str] = {}  # a flag given twice: the last one counts
    words: list[str] = []
    i = 0
    while i < len(rest):
        arg = rest[i]
        i += 1
        if arg in FIRE_SEPARATORS:
            raise ConfigError(f"deepnet {name}: unexpected argument {arg!r}")
        if not _is_flag(arg):
            words.append(arg)
            continue
        if not arg.startswith("--"):
            raise ConfigError(f"deepnet {name}: flags take two hyphens: {arg!r} (see `deepnet {name} --help`)")
        key, has_value, value = arg[2:].partition("=")
        key = key.replace("-", "_")
        negated = key not in params and key.startswith("no") and key[2:] in params and _is_switch(params[key[2:]])
        if negated:
            key = key[2:]
        if key not in params:
            raise ConfigError(f"deepnet {name} has no flag {_flag(key)} (see `deepnet {name} --help`)")
        given.add(key)
        param = params[key]
        if _is_switch(param):
            if negated and has_value:
                raise ConfigError(f"--no{key.replace('_', '-')} takes no value, got {arg!r}")
            if has_value and value.lower() not in SWITCH_VALUES:
                raise ConfigError(f"{_flag(key)} is a switch: give it alone (or --no{key.replace('_', '-')}), or "
                                  f"as {_flag(key)}=true or =false; got {value!r}")
            on = (not negated) if not has_value else SWITCH_VALUES[value.lower()]
            out[key] = f"--{key}={on}"
            continue
        if not has_value:
            if i == len(rest) or _is_flag(rest[i]):  # a value that looks like a flag: --model=-x.h5
                raise ConfigError(f"deepnet {name}: {_flag(key)} needs a value")
            value = rest[i]
            i += 1
        out[key] = f"--{key}={value!r}" if _is_text(param) else f"--{key}={value}"
    free = [p for p in positional if p.name not in given]
    if len(words) > len(free):
        extra = words[len(free)]
        raise ConfigError(f"deepnet {name}: unexpected argument {extra!r} (see `deepnet {name} --help`)")
    for param, word in zip(free, words):
        given.add(param.name)
        out[param.name] = f"--{param.name}={word!r}" if _is_text(param) else f"--{param.name}={word}"
    for param in params.values():
        if param.default is inspect.Parameter.empty and param.name not in given:
            what = param.name.upper()
            raise ConfigError(f"{name} needs {_described(fn, param.name)} (deepnet {name} {what})")
    return head + list(out.values())


def _described(fn: Callable[..., Any], name: str) -> str:
    """A parameter as its docstring's Args: line describes it (``model: HDF5 model file.`` -> "a model
    file"), else its name."""
    match = re.search(rf"^\s*{name}: (.+?)\.?$", fn.__doc__ or "", re.MULTILINE)
    if match is None:
        return name.upper()
    words = match[1].split()
    noun = " ".join(w for w in words if w != "HDF5")
    return noun if noun.lower().startswith(("a ", "an ", "the ")) else f"a {noun[0].lower()}{noun[1:]}"


def check_values(signature: inspect.Signature, given: dict[str, Any]) -> None:
    """Refuse a flag value of the wrong type, with one line naming the flag: a switch that is not a bool,
    an integer flag given a fraction or a word, a number flag given nan, inf or a word, an empty path
    or name."""
    for key, value in given.items():
        param = signature.parameters[key]
        kinds = _kinds(param)
        if value is None and "None" in kinds:
            continue
        if "bool" in kinds:
            if not isinstance(value, bool):
                raise ConfigError(f"{_flag(key)} is a switch (true or false), got {value!r}")
        elif "float" in kinds:
            finite_number(_flag(key)[2:], value)
        elif "int" in kinds:
            integer(_flag(key)[2:], value)
        elif _is_text(param) and (not isinstance(value, (str, os.PathLike)) or not os.fspath(value)):
            raise ConfigError(f"{_flag(key)} needs a value, got {value!r}")


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    """A warning as one line on stderr (``deepnet: warning: ...``), above any progress bar."""
    text = one_line(message)
    tqdm.write(f"deepnet: warning: {text}", file=sys.stderr)


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
    restore = interrupts.install()
    showwarning, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        # An instance, not the class: fire then lists the commands in `deepnet --help`.
        fire.Fire(DeepnetCLI(), command=prepare_args(args), name="deepnet")
    except DeepnetError as exc:
        if debug:
            raise
        print(f"deepnet: error: {one_line(exc)}", file=sys.stderr)
        return getattr(exc, "exit_status", 2)
    except KeyboardInterrupt as exc:
        print(interrupts.stop_line(exc), file=sys.stderr)
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
        warnings.showwarning = showwarning
        if argv is not None:  # called in-process (tests, scripts): leave the caller's handlers as they were
            restore()
    return 0


if __name__ == "__main__":
    sys.exit(main())
