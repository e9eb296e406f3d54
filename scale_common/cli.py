"""Command-line helpers both commands use: argument types, common flags, ``--version``, args -> config dataclass.

Imports nothing heavy: the commands build their parsers and answer ``--help``, ``--version`` and usage errors
before torch or timm is imported.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

from scale_common import __version__

__all__ = ["add_common", "config_from_args", "defaults_formatter", "parse_scales", "positive_int"]

T = TypeVar("T")


def parse_scales(text: str) -> tuple[int, ...]:
    """Parse ``--scales 32,128,224`` into integers (argparse type; a bad value becomes a usage error)."""
    try:
        scales = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers, e.g. 64,128,224") from None
    if not scales or any(s <= 0 for s in scales):
        raise argparse.ArgumentTypeError(f"{text!r}: every scale must be a positive integer (pixels)")
    return scales


def positive_int(text: str) -> int:
    """An argparse type for a positive integer."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def add_common(parser: argparse.ArgumentParser, *, device: bool = False) -> None:
    """Add ``--quiet``, ``--debug`` and ``--version`` (and ``--device`` when asked) to ``parser``."""
    if device:
        parser.add_argument("--device", default=None, help="auto (CUDA when present), cpu, cuda or cuda:N "
                                                           "(default: auto)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or tables (for scripts)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def config_from_args(cls: type[T], args: argparse.Namespace | dict[str, Any], **overrides: Any) -> T:
    """Build the dataclass ``cls`` from parsed arguments, keeping its own default wherever a flag was not given.

    Flags default to None in the parsers, so a value here is one the user chose; the defaults live once, in the
    dataclass (as timm's ``create_model`` only overrides model defaults that were set).

    Args:
        cls: A dataclass type.
        args: The parsed arguments (attribute names equal to field names are used; others are ignored).
        **overrides: Values that win over ``args``.

    Returns:
        The config.
    """
    values = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    chosen = {k: v for k, v in values.items() if k in names and v is not None}
    chosen.update({k: v for k, v in overrides.items() if v is not None})
    return cls(**chosen)


def _shown(value: Any) -> str:
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value)
    return str(value)


def defaults_formatter(*configs: type) -> type[argparse.HelpFormatter]:
    """A help formatter that shows each flag's default as the config dataclasses define it.

    Flags default to None (so :func:`config_from_args` can tell what the user chose); this formatter appends
    ``(default: X)`` from the dataclass field of the same name, so the default is written once and shown anyway.

    Args:
        *configs: Dataclass types whose field defaults are shown (the first that has the field wins).

    Returns:
        A formatter class for ``argparse.ArgumentParser(formatter_class=...)``.
    """
    defaults: dict[str, Any] = {}
    for cls in reversed(configs):
        for f in dataclasses.fields(cls):
            if f.default is not dataclasses.MISSING:
                defaults[f.name] = f.default

    class _Formatter(argparse.RawDescriptionHelpFormatter):
        def _get_help_string(self, action: argparse.Action) -> str | None:
            text = action.help or ""
            if action.default is None and action.dest in defaults and "default" not in text:
                value = defaults[action.dest]
                if isinstance(value, bool):
                    return text
                text += f" (default: {_shown(value)})"
            return text

    return _Formatter
