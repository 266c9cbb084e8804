import os

import pytest

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


@pytest.fixture
def golden_path():
    def path(name):
        return os.path.join(GOLDEN, name)

    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random model directory (rf_runtime.testing defaults), built once per session; read only."""
    from rf_runtime.testing import write_model_dir

    path = tmp_path_factory.mktemp("tiny_model")
    write_model_dir(path)
    return path


@pytest.fixture(scope="session")
def engine_dirs(tmp_path_factory):
    """A tiny random model directory and its fp32 engine bundle, built once per test session."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from rf_runtime.export.bundle_builder import build_bundle
    from rf_runtime.testing import write_model_dir

    root = tmp_path_factory.mktemp("engine")
    write_model_dir(root / "model", seed=5, stream={"ema_alpha": 0.9})
    build_bundle(root / "model", root / "bundle")
    return root / "model", root / "bundle"


@pytest.fixture
def sandbox(tmp_path, tmp_path_factory, monkeypatch):
    """The fault suite's sandbox (tests/fault_tools.py): the test runs in tmp_path/work; afterwards nothing
    outside the test's folders may have been written, nor its ``outside`` folder opened."""
    from fault_tools import sandboxed

    with sandboxed(tmp_path, tmp_path_factory.getbasetemp(), monkeypatch) as box:
        yield box


@pytest.fixture(autouse=True)
def _one_cpu_thread_for_training_tests(request):
    """Training tests run many tiny forwards: one intra-op thread is ~50x faster than two on a
    loaded 2-core machine (threads spin while the other core is busy)."""
    if not request.module.__name__.startswith("test_train"):
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
