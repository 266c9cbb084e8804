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


class StreamError(RFError):
    """A stream produced values that cannot be turned into video (non-finite latents)."""


class OutputError(RFError, OSError):
    """An output file could not be written completely; nothing is left at its final name."""


# optional module (top-level import name) -> the extra of pyproject.toml that installs it
EXTRAS = {
    "torch": "torch",
    "safetensors": "torch",
    "onnx": "export",
    "onnxscript": "export",
    "onnxruntime": "cpu",
    "tokenizers": "cpu",
    "transformers": "text",
    "sentencepiece": "text",
    "ftfy": "text",
    "imageio": "video",
    "imageio_ffmpeg": "video",
    "tqdm": "video",
    "yaml": "train",
    "cv2": "eval",
    "matplotlib": "eval",
    "tensorrt": "gpu",
    "cuda": "gpu",
}


def missing_extra(exc: ImportError) -> MissingDependencyError | None:
    """A MissingDependencyError naming the extra to install for an ImportError of an optional module
    (``EXTRAS``); None when the missing module is not one of them (a real bug, to be shown as such)."""
    if isinstance(exc, MissingDependencyError):
        return exc
    name = (getattr(exc, "name", None) or "").split(".")[0]
    if name not in EXTRAS:
        return None
    return MissingDependencyError(
        f"{name!r} is needed for this command but is not installed: pip install 'rf_runtime[{EXTRAS[name]}]'"
    )


def require(module: str, extra: str):
    """Import an optional module, or raise a MissingDependencyError naming the extra."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{module!r} is needed for this feature but is not installed: pip install 'rf_runtime[{extra}]'"
        ) from exc
