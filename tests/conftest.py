import os

import pytest

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


@pytest.fixture
def golden_path():
    def path(name):
        return os.path.join(GOLDEN, name)

    return path
