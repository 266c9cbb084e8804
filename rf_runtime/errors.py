"""One root exception for everything rf_runtime raises on purpose.

Every message says what is wrong and what to do about it.
"""


class RFError(Exception):
    """Root of all rf_runtime errors."""


class ConfigError(RFError, ValueError):
    """A setting or configuration value is invalid."""


class CheckpointError(RFError):
    """A checkpoint or state dict does not match the model it is loaded into."""


class InputError(RFError, ValueError):
    """An argument passed to the API has the wrong shape, type or value."""


class MissingDependencyError(RFError, ImportError):
    """An optional dependency is needed for this feature and is not installed."""


def require(module: str, extra: str):
    """Import an optional module, or raise a MissingDependencyError naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{module!r} is needed for this feature but is not installed: "
            f"pip install 'rf_runtime[{extra}]'"
        ) from exc
