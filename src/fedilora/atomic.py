"""Files that are either the old version or the new one, never half written (checkpoints, spilled states)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO


def write_atomically(path: Path, data: bytes | Callable[[BinaryIO], None]) -> None:
    """``data`` (bytes, or a function that writes to an open file) to a temporary file beside ``path``,
    flushed to disk, then renamed into place; on any failure the temporary file is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # beside the target: os.replace is atomic only within one file system
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as handle:
            if isinstance(data, bytes):
                handle.write(data)
            else:
                data(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
