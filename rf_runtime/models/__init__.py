"""PyTorch reference models: the causal Wan DiT, the Wan VAE and the text encoders.

Names are imported on first use, so that torch-free modules of this package (``hashed_text``)
stay importable without torch.
"""

__all__ = ["CausalDiT", "DiTConfig", "VAEConfig", "WanVAE"]

_HOME = {"CausalDiT": "dit", "DiTConfig": "dit", "VAEConfig": "vae", "WanVAE": "vae"}


def __getattr__(name):
    if name in _HOME:
        import importlib

        return getattr(importlib.import_module(f"rf_runtime.models.{_HOME[name]}"), name)
    raise AttributeError(f"module 'rf_runtime.models' has no attribute {name!r}")
