"""PyTorch reference models: the causal Wan DiT, the Wan VAE and the text encoders.

Names are imported on first use, so that torch-free modules of this package (``hashed_text``)
stay importable without torch.
"""

__all__ = ["CausalDiT", "DiTConfig", "VAEConfig", "WanVAE"]

_HOME = {"CausalDiT": "dit", "DiTConfig": "dit", "VAEConfig": "vae", "WanVAE": "vae"}


def __getattr__(name):
    if name in _HOME:
        import importlib

        from rf_runtime.errors import missing_extra

        try:
            module = importlib.import_module(f"rf_runtime.models.{_HOME[name]}")
        except ImportError as exc:  # no torch: one line naming the extra, not a bare ModuleNotFoundError
            raise (missing_extra(exc) or exc) from None
        return getattr(module, name)
    raise AttributeError(f"module 'rf_runtime.models' has no attribute {name!r}")
