import os

import pytest

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


@pytest.fixture
def golden_path():
    def path(name):
        return os.path.join(GOLDEN, name)

    return path


@pytest.fixture(scope="session")
def tiny_engine_dirs(tmp_path_factory):
    """A tiny random model directory (EMA alpha 0.9: a visible fold) and its fp32 ONNX bundle, built once."""
    pytest.importorskip("onnxruntime")
    from export.bundle_builder import build_bundle
    from rf_runtime.testing import write_model_dir

    root = tmp_path_factory.mktemp("tiny_engine")
    write_model_dir(root / "model", seed=5, stream={"ema_alpha": 0.9})
    build_bundle(root / "model", root / "bundle")
    return root / "model", root / "bundle"
