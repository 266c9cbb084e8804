"""PyTorch reference models: the causal Wan DiT, the Wan VAE and the text encoder."""

from rf_runtime.models.dit import CausalDiT, DiTConfig

__all__ = ["CausalDiT", "DiTConfig", "VAEConfig", "WanVAE"]


def __getattr__(name):  # the VAE module is imported on first use
    if name in ("VAEConfig", "WanVAE"):
        from rf_runtime.models import vae

        return getattr(vae, name)
    raise AttributeError(f"module 'rf_runtime.models' has no attribute {name!r}")
