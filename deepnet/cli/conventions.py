"""The naming conventions of the command line, as data: one table of short flags with one meaning each,
the aliases kept from the original experiment and from earlier releases, and the flags every command has.

docs/CLI.md states the conventions in words; tests/test_cli_conventions.py holds every command to them.
"""

from __future__ import annotations

import inspect
import re

#: Every short flag and the one long flag it stands for, in every command that has that long flag.
#: ``-h`` is help everywhere and nothing else may take it.
SHORT_FLAGS: dict[str, str] = {
    "h": "help",
    "q": "quiet",
    "j": "json",
    "m": "model",
    "o": "out",
    "n": "steps",
    "l": "layers",
    "w": "width",
    "a": "activation",
    "b": "batch",
}

#: Top-level options (before any command).
TOP_LEVEL_SHORT = {"h": "help", "V": "version"}

#: Other names of a flag: the original experiment's and earlier releases'. An alias applies to a command
#: that has the flag it stands for and no flag of its own by the alias's name.
FLAG_ALIASES: dict[str, str] = {
    "samples": "test_samples",       # the original experiment's eval/train-mlp flag
    "eval_samples": "test_samples",  # dense train before the names were made one
    "eval_images": "eval_samples",   # bench before the names were made one
}

#: Other names of a command: the original experiment's.
COMMAND_ALIASES: dict[str, str] = {
    "train-dense": "train",
    "eval-dense": "eval",
}

#: What a flag's name looks like: lower-case words joined by hyphens.
FLAG_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")

#: The flags the command line adds to every command (the API functions do not have them), with their help.
COMMON_FLAGS: dict[str, str] = {
    "json": "print JSON (one object; a line per report while training) instead of aligned text.",
    "quiet": "print nothing but errors and the final result (no report rows, notices, warnings or bars).",
    "progress": ("show progress bars on stderr (default: when stderr is a terminal and neither --json nor "
                 "--quiet is given; $DEEPNET_PROGRESS=0 or 1 sets the default)."),
    "debug": "show the traceback of an error instead of one line.",
    "help": "show this help and exit.",
}


def flag_name(param: str) -> str:
    """The command-line spelling of a parameter: ``layer_lr`` -> ``layer-lr``."""
    return param.replace("_", "-")


def param_name(flag: str) -> str:
    """The parameter a flag's name (without hyphens) stands for: ``layer-lr`` -> ``layer_lr``."""
    return flag.replace("-", "_")


def short_flags_of(params: inspect.Signature | dict) -> dict[str, str]:
    """The short flags a command has (short -> parameter name), given its parameters (common flags included)."""
    names = params.parameters if isinstance(params, inspect.Signature) else params
    return {short: long for short, long in SHORT_FLAGS.items() if long in names or long == "help"}


def aliases_of(params: inspect.Signature | dict) -> dict[str, str]:
    """The flag aliases a command has (alias parameter name -> parameter name)."""
    names = params.parameters if isinstance(params, inspect.Signature) else params
    return {alias: target for alias, target in FLAG_ALIASES.items() if target in names and alias not in names}
