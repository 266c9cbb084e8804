"""What a newcomer meets first: every CLI answers --version, the wheel installs one package
(``rf_runtime``, with ``export`` inside it, ``py.typed`` and the license), and the files the README's
commands write are ignored by git."""

import os
import re
import subprocess
import sys
import zipfile

import pytest

import rf_runtime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def scripts() -> dict[str, str]:
    """[project.scripts] of pyproject.toml: {command: "module:function"}."""
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        section = f.read().split("[project.scripts]", 1)[1].split("\n[", 1)[0]
    return dict(re.findall(r'^([\w-]+)\s*=\s*"([\w.:]+)"', section, flags=re.M))


@pytest.mark.parametrize("name", sorted(scripts()))
def test_every_cli_has_version(name, capsys):
    import importlib

    module, func = scripts()[name].split(":")
    with pytest.raises(SystemExit) as exit_:
        getattr(importlib.import_module(module), func)(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"{name} {rf_runtime.__version__}"


def test_the_wheel_holds_one_package_with_export_inside(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            ROOT,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"rf_runtime"}  # no generic top-level "export" in site-packages
    assert "rf_runtime/export/cli.py" in names and "rf_runtime/py.typed" in names
    assert any(re.match(r"rf_runtime-[^/]+\.dist-info/licenses/LICENSE$", n) for n in names)
    entry_points = (
        zipfile.ZipFile(tmp_path / wheel)
        .read(next(n for n in names if n.endswith(".dist-info/entry_points.txt")))
        .decode()
    )
    assert "rf-export = rf_runtime.export.cli:main" in entry_points


def test_license_is_the_apache_license():
    with open(os.path.join(ROOT, "LICENSE")) as f:
        text = f.read()
    assert (
        "Apache License" in text
        and "Version 2.0, January 2004" in text
        and "END OF TERMS AND CONDITIONS" in text
    )


def readme_outputs() -> set[str]:
    """Files and folders the README's commands and snippets write into the current folder."""
    with open(os.path.join(ROOT, "README.md")) as f:
        text = f.read()
    found = set(re.findall(r"--(?:out|json|output-dir)\s+([\w./-]+)", text))
    found |= set(re.findall(r"\.save\(\"([\w./-]+)\"\)", text))
    found |= set(re.findall(r"rf_runtime\.testing\s+([\w-]+)", text))
    return {f for f in found if not f.startswith(("docs/", "engines/", "W/", "DIR"))}


def test_what_the_readme_writes_is_ignored_by_git():
    if not os.path.isdir(os.path.join(ROOT, ".git")) and not os.path.isfile(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout")
    outputs = readme_outputs()
    assert {"ball.mp4", "tiny-model", "tiny-bundle", "fox.npz"} <= outputs  # the parse finds them
    for path in sorted(outputs):  # a file, or a folder (then what it holds is ignored)
        ignored = [
            subprocess.run(["git", "-C", ROOT, "check-ignore", "-q", "--no-index", p]).returncode == 0
            for p in (path, f"{path}/anything")
        ]
        assert any(ignored), f"{path} (written by a README command) is not ignored by git"
