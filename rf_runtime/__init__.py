"""rf_runtime: real-time streaming text-to-video with Reward Forcing.

The public surface is small: ``Streamer`` (load a model, iterate frames), ``StreamSettings`` and
the errors. Importing ``rf_runtime`` does not import torch.
"""

import logging

from rf_runtime.errors import CheckpointError, ConfigError, InputError, MissingDependencyError, RFError
from rf_runtime.sampler import StreamSettings

__version__ = "0.1.0"
__all__ = [
    "Streamer",
    "StreamSettings",
    "RFError",
    "ConfigError",
    "CheckpointError",
    "InputError",
    "MissingDependencyError",
    "__version__",
]

logging.getLogger("rf_runtime").addHandler(logging.NullHandler())


def __getattr__(name):
    if name == "Streamer":
        from rf_runtime.streamer import Streamer

        return Streamer
    raise AttributeError(f"module 'rf_runtime' has no attribute {name!r}")
