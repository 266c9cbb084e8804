"""Engine bundles: Streamer.from_engine (onnxruntime, no torch) against Streamer.from_checkpoint,
and the refusal of missing or altered bundles."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from export.bundle_builder import build_bundle  # noqa: E402
from rf_runtime import Streamer  # noqa: E402
from rf_runtime.bundle import BundleError  # noqa: E402
from rf_runtime.testing import write_model_dir  # noqa: E402


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    write_model_dir(root / "model", seed=5, stream={"ema_alpha": 0.9})
    build_bundle(root / "model", root / "bundle")
    return root / "model", root / "bundle"


def test_engine_frames_equal_checkpoint_frames(dirs):
    model, bundle = dirs
    n = 9 + 12 * 7  # 8 chunks: through evictions and EMA folds
    ref = np.concatenate(list(Streamer.from_checkpoint(model).stream("a red circle bouncing", seed=3, num_frames=n)))
    got = np.concatenate(list(Streamer.from_engine(bundle).stream("a red circle bouncing", seed=3, num_frames=n)))
    assert got.shape == ref.shape == (n, 32, 48, 3)
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 1  # uint8 frames may differ by one level


def test_engine_stream_does_not_import_torch(dirs):
    _, bundle = dirs
    code = ("import sys; from rf_runtime import Streamer; s = Streamer.from_engine(sys.argv[1]); "
            "f = [len(x) for x in s.stream('a cube', num_frames=21)]; assert f == [9, 12], f; "
            "assert 'torch' not in sys.modules, 'torch was imported'; print('ok')")
    out = subprocess.run([sys.executable, "-c", code, str(bundle)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def copy_bundle(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_altered_or_truncated_graph_is_refused(dirs, tmp_path):
    b = copy_bundle(dirs[1], tmp_path / "b")
    with open(b / "cache_update.onnx", "r+b") as f:
        f.truncate(100)
    with pytest.raises(BundleError, match="cache_update.onnx.*sha256.*rf-export"):
        Streamer.from_engine(b)


def test_missing_file_and_bad_manifest_are_refused(dirs, tmp_path):
    b = copy_bundle(dirs[1], tmp_path / "b")
    os.remove(b / "vae_decode.onnx")
    with pytest.raises(BundleError, match="vae_decode.onnx.*missing"):
        Streamer.from_engine(b)
    b2 = copy_bundle(dirs[1], tmp_path / "b2")
    manifest = json.loads((b2 / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (b2 / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="schema_version 99"):
        Streamer.from_engine(b2)
    with pytest.raises(BundleError, match="not an engine bundle"):
        Streamer.from_engine(tmp_path)


def test_rf_export_cli(dirs, tmp_path, capsys):
    from export.cli import main

    assert main(["onnx", "--model-dir", str(dirs[0]), "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["schema_version"] == 1
    assert main(["onnx", "--model-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "c")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
