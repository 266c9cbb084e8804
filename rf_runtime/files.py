"""Writing files atomically: a temporary name in the same folder, then a rename (never half a file)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import BinaryIO, Callable, Iterator

from rf_runtime.errors import InputError

_UMASK = os.umask(0o022)  # read once at import (os.umask can only be read by setting it)
os.umask(_UMASK)


def output_folder(path: str | os.PathLike, what: str = "the output") -> str:
    """The folder ``path`` will be written into, checked to exist and be writable (else an InputError
    naming the fix), so a bad output path fails before any work is done and never with a traceback."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(folder):
        raise InputError(f"cannot write {what} to {os.fspath(path)}: the folder {folder} does not exist; "
                         "create it first or pick another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {what} to {os.fspath(path)}: the folder {folder} is not writable; "
                         "pick a folder you can write to")
    return folder


def give_default_permissions(path: str, directory: bool = False) -> None:
    """The permissions ``open``/``mkdir`` would give under the umask, not mkstemp/mkdtemp's owner-only ones
    (an exported bundle or video must be readable by the service that serves it)."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, what: str = "the output") -> Iterator[str]:
    """A temporary file name beside ``path`` to write to; renamed to ``path`` when the block ends.

    On any error (or Ctrl-C) in the block the temporary file is removed and ``path`` is left as it was.
    """
    path = os.fspath(path)
    folder = output_folder(path, what)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise InputError(f"cannot write {what} to {path} ({exc.strerror}): pick a folder you can write to") from exc
    os.close(fd)
    try:
        give_default_permissions(tmp)
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], what: str = "the output") -> str:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it to ``path`` (``atomic_path``)."""
    with atomic_path(path, what) as tmp, open(tmp, "wb") as f:
        write(f)
    return os.fspath(path)
