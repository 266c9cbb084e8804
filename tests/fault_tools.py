"""Shared checks of the fault suite (tests/test_faults_*.py).

Every fault case asserts the exact outcome: the error type (API) or the exit status and one line on
stderr naming the problem (CLI), no traceback, no file at the final output name, no temporary file
left beside it, and nothing outside the test's folder written (or, for the folder ``outside``, read).

- ``sandbox`` (a fixture of tests/conftest.py, from ``sandboxed``): the test runs in ``tmp_path/work``; ``sandbox.outside`` holds sentinel files a
  hostile input points at: they must stay unread and unchanged. Python-level file opens are recorded
  with an audit hook (``sys.addaudithook``): an open of anything in ``outside``, or a write anywhere
  but the test's folders, fails the test. Reads by C++ code (onnxruntime) are caught with a FIFO in
  ``outside`` (``sandbox.fifo``): opening it for reading is seen by a watcher thread.
- ``run_cli(main, argv, capsys)``: (exit status, stdout, stderr) of a CLI entry point, in process.
- ``assert_one_line_error(code, err, prog, *needles)``.
- ``tmpfs(path, size, ro)``: mount a small tmpfs (root only; skips where mounting is not permitted).
- ``nan_weight_bundle(src, dest)``: a copy of a bundle with one DiT weight set to NaN, rehashed.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
import threading
import time

import pytest

_RECORD: list | None = None  # (event, path, mode or flags) while a sandbox is active
_WATCHER = "fault-fifo-watcher"  # its own opens of the FIFO are the probe, not a read
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _hook(event, args):
    if _RECORD is None or event != "open" or not args or threading.current_thread().name == _WATCHER:
        return
    path = args[0]
    if isinstance(path, int) or path is None:
        return
    mode = args[1] if len(args) > 1 else "r"
    flags = args[2] if len(args) > 2 else 0
    writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
        isinstance(flags, int) and flags & _WRITE_FLAGS
    )
    _RECORD.append(
        (os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path), bool(writing))
    )


sys.addaudithook(_hook)


def _within(path: str, roots) -> bool:
    p = os.path.realpath(os.path.abspath(path))
    return any(p == r or p.startswith(r + os.sep) for r in roots)


class Sandbox:
    def __init__(self, tmp_path, basetemp):
        self.root = tmp_path
        self.work = tmp_path / "work"
        self.outside = tmp_path / "outside"
        self.work.mkdir()
        self.outside.mkdir()
        self.secret = self.outside / "secret.bin"
        self.secret.write_bytes(os.urandom(4096))
        self.fifo = self.outside / "weights.fifo"
        os.mkfifo(self.fifo)
        self._stamp = self._state()
        self._fifo_opened = threading.Event()
        self._stop = threading.Event()
        self._allowed_writes = [os.path.realpath(str(tmp_path)), os.path.realpath(str(basetemp))]
        self._watch = threading.Thread(target=self._watch_fifo, daemon=True, name=_WATCHER)
        self._watch.start()

    def _state(self):
        return {
            p.name: (p.stat().st_mtime_ns, p.stat().st_size, p.read_bytes() if p.is_file() else None)
            for p in self.outside.iterdir()
        }

    def _watch_fifo(self):
        """A reader that opens the FIFO is seen here: O_WRONLY | O_NONBLOCK succeeds only when one exists."""
        while not self._stop.is_set():
            try:
                fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                time.sleep(0.005)
                continue
            self._fifo_opened.set()
            os.close(fd)  # the reader sees end-of-file and goes on; the test fails below
            time.sleep(0.005)

    def check(self, records):
        self._stop.set()
        self._watch.join(timeout=2)
        assert not self._fifo_opened.is_set(), (
            "something opened the FIFO outside the test's folder for reading"
        )
        assert self._state() == self._stamp, "a file outside the test's folder was changed"
        outside = os.path.realpath(str(self.outside))
        touched = [p for p, _ in records if _within(p, [outside])]
        assert not touched, f"opened outside the test's folder: {touched[:5]}"
        written = [
            p
            for p, w in records
            if w and not _within(p, self._allowed_writes) and not p.startswith("/dev/") and p != "/dev/null"
        ]
        written = [p for p in written if os.path.realpath(p) != os.path.realpath(tempfile.gettempdir())]
        assert not written, f"written outside the test's folder: {written[:5]}"


@contextlib.contextmanager
def sandboxed(tmp_path, basetemp, monkeypatch):
    """The ``sandbox`` fixture of tests/conftest.py: run in tmp_path/work, check the outside afterwards."""
    global _RECORD
    box = Sandbox(tmp_path, basetemp)
    monkeypatch.chdir(box.work)
    records: list = []
    _RECORD = records
    try:
        yield box
    finally:
        _RECORD = None
    box.check(records)


def run_cli(main, argv, capsys):
    """(exit status, stdout, stderr) of ``main(argv)``; argparse's SystemExit becomes its status."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, prog, *needles, status=2):
    """Exit ``status``, no traceback, and one line 'PROG: error: ...' naming every needle."""
    assert code == status, (code, err)
    assert "Traceback" not in err, err
    lines = [
        ln
        for ln in err.splitlines()
        if ln.strip() and not ln.startswith(("WARNING ", "INFO ")) and "\r" not in ln and "%|" not in ln
    ]
    errors = [ln for ln in lines if ln.startswith(f"{prog}: error:")]
    assert len(errors) == 1, err
    for needle in needles:
        assert needle.lower() in errors[0].lower(), (needle, errors[0])
    return errors[0]


def assert_no_output(path):
    """Nothing at ``path`` and no temporary file of it beside it."""
    path = os.fspath(path)
    assert not os.path.exists(path), f"{path} exists"
    folder, name = os.path.split(os.path.abspath(path))
    if os.path.isdir(folder):
        left = [n for n in os.listdir(folder) if n.startswith(f".{name}.")]
        assert not left, f"temporary files left beside {path}: {left}"


@contextlib.contextmanager
def tmpfs(path, size: str = "1m", ro: bool = False):
    """A small tmpfs at ``path`` (created), unmounted afterwards; skips where mounting is not permitted."""
    os.makedirs(path, exist_ok=True)
    opts = f"size={size}" + (",ro" if ro else "")
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", opts, "tmpfs", os.fspath(path)], capture_output=True, text=True
    )
    if r.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({r.stderr.strip() or r.returncode}): needs root and CAP_SYS_ADMIN"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", os.fspath(path)], capture_output=True)


def fill(folder, leave: int) -> None:
    """Fill the disk of ``folder`` until about ``leave`` bytes are free (a file ``.filler``)."""
    path = os.path.join(os.fspath(folder), ".filler")
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            written += os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    os.truncate(path, max(0, written - leave))


def nan_weight_bundle(src, dest):
    """A copy of the bundle ``src`` at ``dest`` with the first element of the DiT step's largest weight set
    to NaN and the manifest rehashed: a damaged export, consistently listed. Returns ``dest``."""
    import json
    import shutil

    import numpy as np
    import onnx
    from onnx import numpy_helper

    from rf_runtime.bundle import write_manifest

    shutil.copytree(src, dest)
    path = os.path.join(dest, "dit_step.onnx")
    model = onnx.load(path)
    init = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    w = numpy_helper.to_array(init).copy()
    w.flat[0] = np.nan
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, path)
    with open(os.path.join(dest, "manifest.json")) as f:
        write_manifest(str(dest), json.load(f))
    return dest
