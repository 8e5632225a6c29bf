"""The command line checked and rewritten before fire runs a command.

fire calls a command with the flags it recognises and only then complains about the rest (so a
mistyped flag would train with defaults first), reads ``--model 1e3`` as the number 1000.0, and lets a
switch swallow the next word. Here, before anything runs: the command exists (else "did you mean"),
each flag is one of its flags, a short flag or an alias (else "did you mean"), each has its value,
each word has a place, every required argument is there; and the line is rewritten as fire is to read
it: every flag by its parameter's name, switches as ``--flag=True|False``, text as a quoted literal.
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
from typing import Any, Callable

from deepnet.cli.conventions import aliases_of, flag_name, param_name, short_flags_of
from deepnet.errors import ConfigError
from deepnet.flags import finite_number, integer

#: What a switch's value may say (any case), as ``--flag=VALUE`` or as the next word; anything else is
#: refused (``=VALUE``) or is not the switch's (the next word).
SWITCH_VALUES = {"true": True, "false": False, "1": True, "0": False}
SWITCH_WORDS = {"true": True, "false": False}

#: fire's own tokens: what follows "-" or "--" is not the command's.
FIRE_SEPARATORS = ("-", "--")


def kinds(param: inspect.Parameter) -> set[str]:
    """The type names of a parameter's annotation (``int | None`` -> {"int", "None"})."""
    annotation = param.annotation
    if isinstance(annotation, str):
        return {part.strip() for part in annotation.split("|")}
    return {getattr(annotation, "__name__", str(annotation))}


def is_switch(param: inspect.Parameter) -> bool:
    return "bool" in kinds(param)


def is_text(param: inspect.Parameter) -> bool:
    return bool(kinds(param) & {"str", "PathLike"}) and not is_switch(param)


def is_flag(arg: str) -> bool:
    """A flag as fire sees one: a hyphen and a letter (``-x``, ``--x``), not a negative number."""
    return re.match(r"^--?[A-Za-z_]", arg) is not None


def did_you_mean(word: str, choices: list[str], prefix: str = "") -> str:
    """``"; did you mean X?"`` for the closest of ``choices`` to ``word``, else ``""``."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {prefix}{close[0]}?" if close else ""


def _literal(param: inspect.Parameter, value: str) -> str:
    return f"--{param.name}={value!r}" if is_text(param) else f"--{param.name}={value}"


def rewrite(name: str, fn: Callable[..., Any], signature: inspect.Signature, rest: list[str]) -> list[str]:
    """The arguments ``rest`` of command ``name`` (function ``fn``, whose flags are ``signature``'s) as
    fire is to get them, or ConfigError naming what is wrong. A flag given twice: the last one counts."""
    params = signature.parameters
    shorts = short_flags_of(signature)
    aliases = aliases_of(signature)
    positional = [p for p in params.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    known = sorted({flag_name(p) for p in params} | {flag_name(a) for a in aliases})
    given: set[str] = set()
    out: dict[str, str] = {}
    words: list[str] = []
    i = 0
    while i < len(rest):
        arg = rest[i]
        i += 1
        if arg in FIRE_SEPARATORS:
            raise ConfigError(f"deepnet {name}: unexpected argument {arg!r}")
        if not is_flag(arg):
            words.append(arg)
            continue
        if arg.startswith("--"):
            key, has_value, value = arg[2:].partition("=")
            spelled = "--" + key
        else:
            letter, has_value, value = arg[1:].partition("=")
            if len(letter) != 1:
                raise ConfigError(f"deepnet {name}: flags take two hyphens: {arg!r} (see `deepnet {name} --help`)")
            if letter not in shorts:
                raise ConfigError(f"deepnet {name} has no flag -{letter} (see `deepnet {name} --help`)")
            key, spelled = shorts[letter], arg.partition("=")[0]
        key = param_name(key)
        negated = None
        for prefix in ("no_", "no"):
            base = key[len(prefix):]
            base = aliases.get(base, base)
            if key not in params and key not in aliases and key.startswith(prefix) and base in params \
                    and is_switch(params[base]):
                negated, key = True, base
                break
        key = aliases.get(key, key)
        if key not in params:
            raise ConfigError(f"deepnet {name} has no flag {spelled}"
                              + did_you_mean(flag_name(key), known, "--") + f" (see `deepnet {name} --help`)")
        given.add(key)
        param = params[key]
        if is_switch(param):
            if negated and has_value:
                raise ConfigError(f"{spelled} takes no value, got {arg!r}")
            if has_value and value.lower() not in SWITCH_VALUES:
                raise ConfigError(f"--{flag_name(key)} is a switch: give it alone (or --no-{flag_name(key)}), or "
                                  f"as --{flag_name(key)}=true or =false; got {value!r}")
            if has_value:
                on = SWITCH_VALUES[value.lower()]
            elif not negated and i < len(rest) and rest[i].lower() in SWITCH_WORDS:
                on = SWITCH_WORDS[rest[i].lower()]  # `--progress False`, as people type it
                i += 1
            else:
                on = not negated
            out[key] = f"--{key}={on}"
            continue
        if not has_value:
            if i == len(rest) or is_flag(rest[i]):  # a value that looks like a flag: --model=-x.h5
                raise ConfigError(f"deepnet {name}: --{flag_name(key)} needs a value")
            value = rest[i]
            i += 1
        out[key] = _literal(param, value)
    free = [p for p in positional if p.name not in given]
    if len(words) > len(free):
        extra = words[len(free)]
        raise ConfigError(f"deepnet {name}: unexpected argument {extra!r} (see `deepnet {name} --help`)")
    for param, word in zip(free, words):
        given.add(param.name)
        out[param.name] = _literal(param, word)
    require_arguments(name, fn, signature, given)
    return list(out.values())


def require_arguments(name: str, fn: Callable[..., Any], signature: inspect.Signature, given: set[str]) -> None:
    """Refuse a command line without an argument the command cannot run without."""
    for param in signature.parameters.values():
        if param.default is inspect.Parameter.empty and param.name not in given:
            what = param.name.upper()
            raise ConfigError(f"{name} needs {described(fn, param.name)} (deepnet {name} {what})")


def described(fn: Callable[..., Any], name: str) -> str:
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
    or name. An integer flag given an integral float (``--steps 1e3``) gets the integer, in place."""
    for key, value in list(given.items()):
        param = signature.parameters[key]
        flag = flag_name(key)
        types = kinds(param)
        if value is None and "None" in types:
            continue
        if "bool" in types:
            if not isinstance(value, bool):
                raise ConfigError(f"--{flag} is a switch (true or false), got {value!r}")
        elif "float" in types:
            finite_number(flag, value)
        elif "int" in types and "tuple" in types and isinstance(value, tuple):  # several: --coarsen 2,3,4
            for item in value:
                integer(flag, item)
        elif "int" in types:
            if isinstance(value, float) and value.is_integer():
                given[key] = value = int(value)
            integer(flag, value)
        elif is_text(param) and (not isinstance(value, (str, os.PathLike)) or not os.fspath(value)):
            raise ConfigError(f"--{flag} needs a value, got {value!r}")
