"""The fire command line of the developer scripts in bench/: a bad flag (a DeepnetError) is one line on
stderr and exit status 2, with no traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable

import fire

from deepnet.errors import DeepnetError


def run(command: Callable, prog: str) -> None:
    """Run ``command`` as a fire command line named ``prog``."""
    try:
        fire.Fire(command)
    except DeepnetError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)
