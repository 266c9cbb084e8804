"""Atomic writes: the file appears whole under its name or not at all, with ordinary permissions."""

import os

import numpy as np
import pytest

from rf_runtime.errors import RFError
from rf_runtime.files import atomic_path, atomic_write
from rf_runtime.video import Mp4Writer


def test_atomic_write_replaces_whole_or_leaves_the_old_file(tmp_path):
    path = tmp_path / "out.bin"
    atomic_write(path, lambda f: f.write(b"first"))
    assert path.read_bytes() == b"first"

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_bytes() == b"first"  # the old contents, not half of the new
    assert os.listdir(tmp_path) == ["out.bin"]  # no temporary file left behind
    with open(tmp_path / "plain.bin", "wb") as f:  # what open() gives under this process's umask
        f.write(b"x")
    assert os.stat(path).st_mode == os.stat(tmp_path / "plain.bin").st_mode


def test_atomic_path_for_writers_that_take_a_file_name(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    with atomic_path(path) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path) and not path.exists()  # beside it, renamed at the end
        with open(tmp, "wb") as f:
            f.write(b"weights")
    assert path.read_bytes() == b"weights" and sorted(os.listdir(tmp_path)) == ["ckpt.safetensors"]


def _umask_mode(tmp_path, directory: bool) -> int:
    """What open()/mkdir() give under this process's umask: the independent expectation."""
    probe = tmp_path / ("probe_dir" if directory else "probe.bin")
    probe.mkdir() if directory else probe.write_bytes(b"x")
    return os.stat(probe).st_mode


def test_missing_or_unwritable_folder_is_an_rferror_naming_the_fix(tmp_path):
    with pytest.raises(RFError, match="folder .*missing.* does not exist; create it first"):
        atomic_write(tmp_path / "missing" / "out.bin", lambda f: f.write(b"x"))
    if os.path.isdir("/proc/self"):  # Linux: no regular file can be created there, even by root
        with pytest.raises(RFError, match="cannot write the snapshot to /proc/x.npz"):
            atomic_write("/proc/x.npz", lambda f: f.write(b"x"), what="the snapshot")
        with pytest.raises(RFError, match="cannot write the video to /proc/v.mp4.*pick a folder"):
            Mp4Writer("/proc/v.mp4")  # before any frame is made


def test_mp4_and_bundle_get_ordinary_permissions(tmp_path, engine_dirs):
    """mkstemp/mkdtemp make owner-only files; a video or bundle must be readable like any other output."""
    out = tmp_path / "v.mp4"
    with Mp4Writer(out) as writer:
        writer.write(np.zeros((2, 16, 16, 3), np.uint8))
    assert os.stat(out).st_mode == _umask_mode(tmp_path, directory=False)
    with pytest.raises(RFError, match="does not exist; create it first"):
        Mp4Writer(tmp_path / "missing" / "v.mp4")
    _, bundle = engine_dirs
    assert os.stat(bundle).st_mode == _umask_mode(tmp_path, directory=True)
