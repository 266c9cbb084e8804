import os

import pytest

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


@pytest.fixture
def golden_path():
    def path(name):
        return os.path.join(GOLDEN, name)

    return path


@pytest.fixture(scope="session")
def engine_dirs(tmp_path_factory):
    """A tiny random model directory and its fp32 engine bundle, built once per test session."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from export.bundle_builder import build_bundle
    from rf_runtime.testing import write_model_dir

    root = tmp_path_factory.mktemp("engine")
    write_model_dir(root / "model", seed=5, stream={"ema_alpha": 0.9})
    build_bundle(root / "model", root / "bundle")
    return root / "model", root / "bundle"
