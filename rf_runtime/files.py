"""Writing files atomically: a temporary name in the same folder, then a rename (never half a file)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from typing import BinaryIO, Callable, Iterator

from rf_runtime.errors import InputError, OutputError

_UMASK = os.umask(0o022)  # read once at import (os.umask can only be read by setting it)
os.umask(_UMASK)


def output_folder(path: str | os.PathLike, what: str = "the output") -> str:
    """The folder ``path`` will be written into, checked to exist and be writable, and ``path`` checked not
    to be a directory (else an InputError naming the fix), so a bad output path fails before any work is
    done and never with a traceback."""
    if os.path.isdir(os.fspath(path)):
        raise InputError(
            f"cannot write {what} to {os.fspath(path)}: it is a directory; give a file name "
            "(an existing directory is never replaced by a file)"
        )
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(folder):
        raise InputError(
            f"cannot write {what} to {os.fspath(path)}: the folder {folder} does not exist; "
            "create it first or pick another path"
        )
    os.close(
        temp_file(path, what, folder=folder, remove=True)[0]
    )  # the one sure test of writability (root, /proc)
    return folder


def temp_file(
    path: str | os.PathLike,
    what: str = "the output",
    *,
    folder: str | None = None,
    suffix: str = ".tmp",
    remove: bool = False,
) -> tuple[int, str]:
    """(fd, name) of a new hidden temporary file beside ``path`` with ordinary permissions; an InputError
    naming the fix when the folder cannot take it. ``remove``: delete it at once (a writability probe)."""
    path = os.fspath(path)
    folder = folder or os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=suffix, dir=folder)
    except OSError as exc:
        raise InputError(
            f"cannot write {what} to {path} ({exc.strerror}): pick a folder you can write to"
        ) from exc
    if remove:
        os.remove(tmp)
    else:
        give_default_permissions(tmp)
    return fd, tmp


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
    output_folder(path, what)
    fd, tmp = temp_file(path, what)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(exc, OSError):  # a full disk, a quota, an I/O error: one line, nothing at ``path``
            raise OutputError(
                f"could not write {what} to {path} ({exc.strerror or exc}): free some space or "
                f"pick another folder; nothing was written there"
            ) from exc
        raise


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None], what: str = "the output") -> str:
    """Call ``write(f)`` on a temporary file beside ``path``, then rename it to ``path`` (``atomic_path``)."""
    with atomic_path(path, what) as tmp, open(tmp, "wb") as f:
        write(f)
    return os.fspath(path)


def output_dir(
    path: str | os.PathLike, what: str, *, marker: str, force: bool, option: str = "--force"
) -> str:
    """Check, before any work, that a directory output (an engine bundle) may be written to ``path``:
    a new name, or an existing directory of the same kind (it holds ``marker``) with ``force``.
    Anything else (a file, a directory of other files, a non-empty folder without ``marker``) is refused:
    a writer never deletes what it did not write. Returns the absolute path."""
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path):
        if not os.path.isdir(path) or os.path.islink(path):
            raise InputError(
                f"cannot write {what} to {path}: a file (or link) of that name exists; it is never "
                "replaced: remove it yourself or pick another path"
            )
        if not os.path.isfile(os.path.join(path, marker)):
            if os.listdir(path):
                raise InputError(
                    f"cannot write {what} to {path}: the directory exists and is not {what} (no {marker}); "
                    "its files are never deleted: pick a new path or empty it yourself"
                )
        elif not force:
            raise InputError(f"{path} already holds {what}: pass {option} to replace it, or pick a new path")
    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        raise InputError(
            f"cannot write {what} to {path}: the folder {folder} does not exist; create it first"
        )
    os.close(temp_file(path, what, folder=folder, remove=True)[0])  # writability, before the work
    return path


def replace_dir(tmp: str, path: str) -> None:
    """Move the finished directory ``tmp`` to ``path`` (same folder). An existing ``path`` (checked by
    ``output_dir``) is first renamed aside, then removed once the new one is in place; if the second
    rename fails the old one is put back."""
    if not os.path.lexists(path):
        os.rename(tmp, path)
        return
    aside = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=os.path.dirname(path))
    os.rmdir(aside)
    os.rename(path, aside)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(aside, path)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def atomic_save(
    write: Callable[[str], None],
    path: str | os.PathLike,
    what: str = "the output",
    *,
    create_folder: bool = False,
) -> str:
    """Call ``write(tmp_path)`` (a writer that takes a file name: ``safetensors.save_file``,
    ``savefig``, ...) on a temporary name beside ``path``, then rename it to ``path`` (``atomic_path``).
    ``create_folder``: make the folder of ``path`` first."""
    if create_folder:
        os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    with atomic_path(path, what) as tmp:
        write(tmp)
    return os.fspath(path)


def json_ready(value):
    """``value`` with tuples as lists and dataclasses as dicts, recursively: the JSON form of a setting."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = dataclasses.asdict(value)
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [json_ready(v) for v in value]
    return value


def atomic_write_json(
    path: str | os.PathLike, obj, what: str = "the output", *, create_folder: bool = False
) -> str:
    """``obj`` (made ``json_ready``) as indented JSON, written atomically."""
    text = json.dumps(json_ready(obj), indent=2)
    return atomic_save(lambda tmp: _write_text(tmp, text), path, what, create_folder=create_folder)


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
