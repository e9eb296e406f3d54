"""User-facing errors whose message names the fix, and the wrapper that turns them into one line and an exit code."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable, Sequence

__all__ = ["ToolkitError", "run_cli"]


class ToolkitError(ValueError):
    """A problem with the user's input or environment; the message says what to do about it.

    Command-line entry points print it as a single ``error: ...`` line and exit with status 2.
    """


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> int:
    """Run a CLI ``main(argv)`` and map failures to one readable line and a non-zero exit code.

    ``--debug`` anywhere in ``argv`` re-raises instead, so the traceback is shown.

    Args:
        main: The command's body; returns an exit code or None (success).
        argv: Arguments without the program name (``sys.argv[1:]`` when None).

    Returns:
        The process exit code: 0 on success, 2 for a :class:`ToolkitError`, 130 on Ctrl-C, 1 for anything else.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if not debug:
        warnings.showwarning = _one_line_warning
    try:
        code = main(args)
        return int(code or 0)
    except ToolkitError as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    except SystemExit as stop:  # argparse: usage errors (2) and --help (0), already printed
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted: finished work (checkpoints, reports) was kept", file=sys.stderr)
        return 130
    except Exception as err:  # a bug of ours: still one line, with the way to see more
        if debug:
            raise
        print(f"internal error: {type(err).__name__}: {err} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      file: object = None, line: str | None = None) -> None:
    if os.environ.get("RANK", "0") not in ("", "0"):  # under torchrun every rank meets the same warning: print it once
        return
    print(f"warning: {message}", file=sys.stderr)
