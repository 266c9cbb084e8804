"""Fault suite, missing extras: every command and import path says which extra to install, in one line.

Each case runs a fresh Python in which an import hook makes the named modules absent, exactly as an
environment without them: ``import torch`` raises ModuleNotFoundError(name='torch').
"""

import os
import subprocess
import sys
import textwrap

import pytest


BLOCKER = """
import importlib.abc, sys
BLOCKED = {blocked!r}
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _Absent())
"""


def run_without(blocked, code, cwd):
    script = BLOCKER.format(blocked=set(blocked)) + textwrap.dedent(code)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd, timeout=300, env=env
    )


def assert_names_the_extra(r, prog, module, extra, status=2):
    assert r.returncode == status, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith(("WARNING", "INFO"))]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"{prog}: error:") and f"'{module}'" in lines[0], lines[0]
    assert f"pip install 'rf_runtime[{extra}]'" in lines[0], lines[0]


CLI = "import sys\nfrom {module} import {func} as main\nsys.exit(main({argv!r}))\n"

COMMANDS = [
    (
        "rf-export",
        ["torch"],
        "rf_runtime.export.cli",
        "main",
        ["onnx", "--model-dir", "m", "--out", "b", "--training-stage", "random"],
        "torch",
        "torch",
    ),
    (
        "rf-export",
        ["onnx"],
        "rf_runtime.export.cli",
        "main",
        ["onnx", "--model-dir", "m", "--out", "b", "--training-stage", "random"],
        "onnx",
        "export",
    ),
    ("rf-train", ["torch"], "rf_runtime.train.cli", "main", ["--config", "c.json"], "torch", "torch"),
    ("rf-train", ["yaml"], "rf_runtime.train.cli", "main", ["--config", "c.yaml"], "yaml", "train"),
    (
        "rf-world",
        ["torch"],
        "rf_runtime.world.cli",
        "main",
        ["vae", "--out", "v.safetensors", "--tiny"],
        "torch",
        "torch",
    ),
    (
        "rf-generate",
        ["torch"],
        "rf_runtime.cli",
        "generate_main",
        ["--model-dir", "m", "--prompt", "a cat", "--out", "v.mp4"],
        "torch",
        "torch",
    ),
    (
        "rf-generate",
        ["onnxruntime"],
        "rf_runtime.cli",
        "generate_main",
        ["--prompt", "a cat", "--out", "v.mp4"],
        "onnxruntime",
        "cpu",
    ),
    (
        "rf-generate",
        ["tqdm"],
        "rf_runtime.cli",
        "generate_main",
        ["--prompt", "a cat", "--out", "v.mp4"],
        "tqdm",
        "video",
    ),
    (
        "rf-bench",
        ["onnxruntime"],
        "rf_runtime.cli",
        "bench_main",
        ["--soak", "0.01", "--json", "s.json"],
        "onnxruntime",
        "cpu",
    ),
]


@pytest.mark.parametrize(
    "prog, blocked, module, func, argv, missing, extra",
    COMMANDS,
    ids=[f"{c[0]}-without-{c[1][0]}" for c in COMMANDS],
)
def test_a_command_without_its_extra_is_one_line(sandbox, prog, blocked, module, func, argv, missing, extra):
    (sandbox.work / "c.yaml").write_text("teacher: m\n")
    (sandbox.work / "c.json").write_text("{}")
    os.mkdir(sandbox.work / "m")
    r = run_without(blocked, CLI.format(module=module, func=func, argv=argv), sandbox.work)
    assert_names_the_extra(r, prog, missing, extra)
    assert sorted(os.listdir(sandbox.work)) == ["c.json", "c.yaml", "m"]  # nothing written


def test_python_m_testing_without_torch(sandbox):
    r = run_without(
        ["torch"], "import runpy\nrunpy.run_module('rf_runtime.testing', run_name='__main__')\n", sandbox.work
    )
    assert_names_the_extra(r, "python -m rf_runtime.testing", "torch", "torch")


IMPORTS = [
    ("from rf_runtime.models import CausalDiT", "torch", "torch"),
    ("import rf_runtime.train.trainer", "torch", "torch"),
    ("import rf_runtime.testing", "torch", "torch"),
    ("from rf_runtime import Streamer\nStreamer.from_checkpoint('m')", "torch", "torch"),
]


@pytest.mark.parametrize("code, missing, extra", IMPORTS, ids=[i[0].splitlines()[-1] for i in IMPORTS])
def test_an_import_without_its_extra_names_it(sandbox, code, missing, extra):
    probe = (
        f"from rf_runtime.errors import MissingDependencyError\ntry:\n{textwrap.indent(code, '    ')}\n"
        "except MissingDependencyError as exc:\n    print('MDE', exc)\n"
    )
    r = run_without([missing], probe, sandbox.work)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("MDE ") and f"pip install 'rf_runtime[{extra}]'" in r.stdout, r.stdout


def test_the_runtime_path_runs_without_torch(engine_dirs, sandbox):
    """The positive control: numpy + onnxruntime stream a bundle with torch absent."""
    r = run_without(
        ["torch", "safetensors"],
        f"""
        from rf_runtime import Streamer
        frames = list(Streamer.from_engine({str(engine_dirs[1])!r}).stream("a red circle", num_frames=9))
        print(sum(len(f) for f in frames))
        """,
        sandbox.work,
    )
    assert r.returncode == 0 and r.stdout.strip() == "9", r.stderr
