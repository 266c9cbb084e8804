"""Writing files atomically: a temporary name in the same folder, then a rename (never half a file)."""

from __future__ import annotations

import os
import tempfile
from typing import BinaryIO, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> str:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it to ``path``.

    On any error (or Ctrl-C) the temporary file is removed and ``path`` is left as it was.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path
