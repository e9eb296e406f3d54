"""Files on disk: atomic writes (complete or absent), and checked reads that turn damage into one clear error.

Every file the toolkit reads back (a report, a run record, a checkpoint, a saved MSUN or model) goes through
:func:`read_json`, :func:`read_torch` or :func:`read_safetensors`: a missing, truncated, damaged or foreign file ends
in one :class:`~scale_common.errors.ToolkitError` that names the file and the fix, never a traceback three modules
later.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from scale_common.errors import ToolkitError

__all__ = [
    "atomic_path",
    "atomic_torch_save",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "read_json",
    "read_safetensors",
    "read_torch",
]


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    Args:
        path: The final file. Its parent folder is created if missing.

    Yields:
        A temporary file path in the same folder to write to. It is removed if the block raises.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (flushed to disk before the rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically; NaN is written as ``NaN`` (Python's json reads it)."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to ``path`` atomically."""
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def _damaged(path: Path, what: str, detail: str, fix: str) -> ToolkitError:
    return ToolkitError(f"{str(path)!r} is not a readable {what} ({detail}): {fix}")


def read_json(path: str | os.PathLike[str], *, what: str, fix: str, format: str | None = None) -> dict[str, Any]:
    """Read a JSON object written by the toolkit, checking that it is whole and of the expected format.

    Args:
        path: The file.
        what: What the file is, for the message (``run record``, ``CKA report``).
        fix: What to do about a bad file (``start the run again without --resume``).
        format: The expected value of the object's ``"format"`` key (e.g. ``msun-run/2``); not checked when None.

    Returns:
        The parsed object.

    Raises:
        ToolkitError: The file is missing, not JSON (truncated or damaged), not an object, or of another format.
    """
    file = Path(path)
    if not file.is_file():
        raise ToolkitError(f"no {what} at {str(file)!r}: {fix}")
    try:
        obj = json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _damaged(file, what, f"damaged or truncated JSON: {err}", fix) from None
    if not isinstance(obj, dict):
        raise _damaged(file, what, "not a JSON object", fix)
    if format is not None and obj.get("format") != format:
        found = obj.get("format", "no format key")
        raise _damaged(file, what, f"format {found!r}, this version reads {format!r}", fix)
    return obj


def read_torch(path: str | os.PathLike[str], *, what: str, fix: str, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load a ``torch.save`` dict safely (tensors and plain containers only) and check its keys.

    Args:
        path: The file.
        what: What the file is, for the message.
        fix: What to do about a bad file.
        keys: Keys the dict must have.

    Returns:
        The loaded dict, tensors on the CPU.

    Raises:
        ToolkitError: Missing, truncated, damaged, not a dict, or lacking a key.
    """
    import pickle

    import torch

    file = Path(path)
    if not file.is_file():
        raise ToolkitError(f"no {what} at {str(file)!r}: {fix}")
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        detail = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise _damaged(file, what, f"damaged or truncated: {detail}", fix) from None
    if not isinstance(obj, dict) or any(k not in obj for k in keys):
        missing = [k for k in keys if not isinstance(obj, dict) or k not in obj]
        raise _damaged(file, what, f"missing {', '.join(missing) or 'its contents'}", fix)
    return obj


def read_safetensors(path: str | os.PathLike[str], *, what: str, fix: str) -> dict[str, Any]:
    """Load a safetensors file into CPU tensors.

    Args:
        path: The file.
        what: What the file is, for the message.
        fix: What to do about a bad file.

    Returns:
        Name -> tensor.

    Raises:
        ToolkitError: Missing, truncated or damaged.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = Path(path)
    if not file.is_file():
        raise ToolkitError(f"no {what} at {str(file)!r}: {fix}")
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise _damaged(file, what, f"damaged or truncated: {str(err).splitlines()[0][:160]}", fix) from None
