"""The README runs as written: every ```python block, in order, in one namespace (later blocks use
what earlier ones made), in a fresh folder holding only what the README's own commands make before
them (the tiny model directory). The frame shape the first block states is checked on what it prints."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks() -> list[str]:
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.S | re.M)


def test_the_readme_has_python_blocks():
    assert len(python_blocks()) >= 4


def test_every_python_block_of_the_readme_runs(tmp_path, monkeypatch, capsys):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("torch")
    from rf_runtime.testing import write_model_dir

    monkeypatch.chdir(tmp_path)
    write_model_dir("tiny-model")  # what `python -m rf_runtime.testing tiny-model` makes, as the README says
    namespace: dict = {"__name__": "readme"}
    for i, block in enumerate(python_blocks()):
        try:
            exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
        except Exception as exc:  # name the block that failed
            raise AssertionError(
                f"README python block {i + 1} fails: {type(exc).__name__}: {exc}\n{block}"
            ) from exc
    # show() prints each chunk's frames: 45 frames in chunks of 3 (block 1), then 41 chunks (block 2),
    # all of the shape the README states for the shipped model
    shapes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("(")]
    assert shapes == ["(3, 64, 64, 3)"] * (45 // 3 + 41)
