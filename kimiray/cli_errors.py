"""One-line errors for the ``kimiray`` commands that run work in this process (``demo``, ``contract-demo``)."""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable


class DemoError(Exception):
    """A problem with the user's input or environment: one ``kimiray: error:`` line, no traceback."""


def one_line_errors(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Expected failures (a missing file, a model that can't be loaded) as one ``kimiray: error:`` line and exit
    code 2 (input) or 1 (anything else); ``--debug`` shows the traceback instead."""

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except KeyboardInterrupt:
            print("kimiray: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:  # noqa: BLE001 - the point: no traceback unless asked for
            if getattr(args, "debug", False):
                raise
            message = " ".join(str(exc).split())[:600] or type(exc).__name__
            if not isinstance(exc, DemoError):
                message = f"{type(exc).__name__}: {message} (--debug shows the traceback)"
            print(f"kimiray: error: {message}", file=sys.stderr)
            return 2 if isinstance(exc, DemoError) else 1

    return run
