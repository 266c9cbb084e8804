import os

import pytest

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


@pytest.fixture
def golden_path():
    def path(name):
        return os.path.join(GOLDEN, name)

    return path


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
