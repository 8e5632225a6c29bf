"""The help pages of the ``deepnet`` command, rendered from the commands' signatures and docstrings.

fire runs the commands, but its help pages are not used: they start with an ``INFO:`` line, spell flags
with underscores, offer fire's automatic one-letter abbreviations (``-h`` for ``--hidden``) and cut an
argument's description at a line that looks like another argument. Here a command's page is built from
the same two sources fire reads (the signature and the docstring's ``Args:`` section), with the short
flags and aliases of deepnet.cli.conventions and the flags every command has.
"""

from __future__ import annotations

import inspect
import re
import shutil
import textwrap
from dataclasses import dataclass

from deepnet.cli.args import kinds
from deepnet.cli.conventions import COMMON_FLAGS, SHORT_FLAGS, aliases_of, flag_name, short_flags_of


@dataclass(frozen=True)
class Doc:
    """A docstring in parts: the summary line, the description paragraphs, each argument's text."""

    summary: str
    description: str
    args: dict[str, str]


def parse_doc(doc: str | None) -> Doc:
    """Split a Google-style docstring. An argument's text runs over the lines indented deeper than its
    ``name:`` line, so a continuation that starts with ``--flag:`` stays part of it."""
    lines = inspect.cleandoc(doc or "").splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
    except StopIteration:
        start = len(lines)
    head = "\n".join(lines[:start]).strip()
    summary, _, description = head.partition("\n\n")
    summary = re.sub(r"; returns .*$| \(returned as .*\)\.?$", ".", " ".join(summary.split())).replace("..", ".")
    args: dict[str, str] = {}
    name, indent = None, None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        match = re.match(r"^(\s*)(\w+): (.*)$", line)
        if match and (indent is None or depth <= indent):
            name, indent = match[2], depth
            args[name] = match[3].strip()
        elif name is not None:
            args[name] += " " + line.strip()
    return Doc(summary.strip(), description.strip(), args)


def _wrap(text: str, width: int) -> list[str]:
    return textwrap.wrap(text, width, break_on_hyphens=False)


def _for_people(paragraph: str) -> str:
    """A docstring paragraph as help text: without what the Python function returns, without rST quotes."""
    text = " ".join(paragraph.split())
    text = re.sub(r"\s*Returns\b[^.(]*(\([^)]*\)[^.(]*)*\.", "", text)
    return text.replace("``", "").strip()


def _columns() -> int:
    return max(60, min(100, shutil.get_terminal_size((100, 24)).columns))


def metavar(param: inspect.Parameter) -> str:
    """The placeholder of a flag's value in help: N, X, PATH or the flag's name in capitals."""
    types = kinds(param)
    if "bool" in types:
        return ""
    if "int" in types:
        return "N"
    if "float" in types:
        return "X"
    if "PathLike" in types:
        return "PATH"
    return param.name.upper()


def _default(param: inspect.Parameter, text: str) -> str:
    """"default: X" unless there is nothing to say or the text says it already."""
    value = param.default
    if value is inspect.Parameter.empty or value is None or isinstance(value, bool) or "default" in text:
        return ""
    shown = f"{value:_}" if isinstance(value, int) and abs(value) >= 10_000 else str(value)
    return f"default: {shown}"


def _with(text: str, *notes: str) -> str:
    """``text`` with ``notes`` in parentheses before its final full stop."""
    notes = tuple(n for n in notes if n)
    if not notes:
        return text
    body = text[:-1] if text.endswith(".") else text
    return f"{body} ({'; '.join(notes)})."


def _entries(rows: list[tuple[str, str]], width: int) -> list[str]:
    """Aligned two-column lines: the flag, then its text wrapped beside it."""
    left = min(30, max((len(flag) for flag, _ in rows), default=0) + 2)
    out = []
    for flag, text in rows:
        wrapped = textwrap.wrap(text, width=max(30, width - left - 2), break_on_hyphens=False) or [""]
        first = f"  {flag:<{left}}" if len(flag) < left else f"  {flag}\n  {'':<{left}}"
        out.append(first + wrapped[0])
        out.extend(f"  {'':<{left}}{line}" for line in wrapped[1:])
    return out


def positional_params(signature: inspect.Signature) -> list[inspect.Parameter]:
    """The parameters a command takes as words (its model file, a name, a directory)."""
    return [p for p in signature.parameters.values() if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]


def usage_line(name: str, signature: inspect.Signature) -> str:
    words = []
    for param in positional_params(signature):
        word = param.name.upper()
        words.append(word if param.default is inspect.Parameter.empty else f"[{word}]")
    return " ".join(["usage: deepnet", name, *words, "[FLAGS]"])


def command_help(name: str, fn: object, signature: inspect.Signature, *, common: tuple[str, ...]) -> str:
    """The help page of command ``name``: usage, description, its flags, the common flags, aliases."""
    width = _columns()
    doc = parse_doc(getattr(fn, "__doc__", None))
    shorts = {long: short for short, long in short_flags_of(signature).items()}
    lines = [usage_line(name, signature), ""]
    lines += _wrap(doc.summary, width)
    for paragraph in doc.description.split("\n\n"):
        text = _for_people(paragraph)
        if text:
            lines += ["", *_wrap(text, width)]
    positional = positional_params(signature)
    if positional:
        rows = []
        for param in positional:
            text = doc.args.get(param.name, "")
            short = f"-{shorts[param.name]}, " if param.name in shorts else ""
            rows.append((param.name.upper(), _with(f"{text.rstrip('.')}; or {short}--{flag_name(param.name)} "
                                                   f"{param.name.upper()}.", _default(param, text))))
        lines += ["", "arguments:", *_entries(rows, width)]
    rows = []
    for param in signature.parameters.values():
        if param in positional or param.name in common:
            continue
        text = doc.args.get(param.name, "")
        flag = f"--{flag_name(param.name)}"
        value = metavar(param)
        short = shorts.get(param.name)
        left = (f"-{short}, " if short else "    ") + flag + (f" {value}" if value else "")
        off = f"off: --no-{flag_name(param.name)}" if not value else ""
        rows.append((left, _with(text, _default(param, text), off)))
    if rows:
        lines += ["", "flags:", *_entries(rows, width)]
    rows = []
    for key in (*common, "debug", "help"):
        short = shorts.get(key)
        rows.append(((f"-{short}, " if short else "    ") + f"--{key}", COMMON_FLAGS[key]))
    lines += ["", "every command:", *_entries(rows, width)]
    aliases = aliases_of(signature)
    if aliases:
        lines += ["", "aliases: " + ", ".join(f"--{flag_name(a)} for --{flag_name(t)}" for a, t in aliases.items())]
    return "\n".join(lines)


def top_help(version: str, commands: list[tuple[str, str, list[str]]]) -> str:
    """``deepnet --help``: what deepnet is, its commands (name, summary, aliases) and the common flags."""
    width = _columns()
    lines = [f"deepnet {version}: exact SGD through absurdly deep, narrow residual networks on MNIST.", "",
             "usage: deepnet COMMAND [ARGS] [FLAGS]", "", "commands:"]
    rows = [(name + (f" ({', '.join(aliases)})" if aliases else ""), summary) for name, summary, aliases in commands]
    lines += _entries(rows, width)
    lines += ["", "options:", *_entries([("-h, --help", "show this help and exit."),
                                         ("-V, --version", "print deepnet's version and exit.")], width)]
    lines += ["", "`deepnet COMMAND --help` describes a command and its flags. Every command also takes "
                  "--json, -q/--quiet and --debug; short flags mean the same in every command: "
              + ", ".join(f"-{s} --{flag_name(l)}" for s, l in SHORT_FLAGS.items()) + "."]
    return "\n".join(lines[:-1] + _wrap(lines[-1], width))
