"""Atomic writes: the file appears whole under its name or not at all, with ordinary permissions."""

import os

import pytest

from rf_runtime.files import atomic_path, atomic_write


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
