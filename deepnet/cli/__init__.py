"""The ``deepnet`` command line over the Python API (deepnet.api): the only part of deepnet that prints.

- conventions: the naming rules as data (short flags, aliases, the flags every command has);
- args: the command line checked and rewritten before fire runs it;
- help: help pages from the commands' signatures and docstrings;
- printers: each command's result as aligned text or JSON;
- commands: the commands (an API function and its printer each);
- main: the entry point: help, version, errors, signals.
"""

from deepnet.cli.commands import NOT_FLAGS, DeepnetCLI
from deepnet.cli.main import main, prepare_args
from deepnet.cli.printers import show_speedrun

__all__ = ["NOT_FLAGS", "DeepnetCLI", "main", "prepare_args", "show_speedrun"]
