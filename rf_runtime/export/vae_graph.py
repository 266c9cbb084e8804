"""Lowering the streaming VAE decoder to ONNX: one latent frame per call, feature cache explicit.

Two graphs, because latent frame 0 is special (temporal upsampling skips it and it gives 1 video
frame instead of 4): ``vae_decode_first`` (z -> frames, cache) and ``vae_decode`` (z, cache ->
frames, cache). Every cache slot has a fixed shape (see ``rf_runtime.models.vae``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from rf_runtime.graph_io import VAE_FRAMES, VAE_LATENT
from rf_runtime.graph_io import vae_cache_names as cache_names
from rf_runtime.models.vae import WanVAE


class DecodeFirst(nn.Module):
    def __init__(self, vae: WanVAE):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        slots: list = []
        frames = self.vae.decode_step(z, slots, first=True).clamp(-1, 1)
        return (frames, *slots)


class DecodeNext(nn.Module):
    def __init__(self, vae: WanVAE):
        super().__init__()
        self.vae = vae

    def forward(self, z, *cache):
        slots = list(cache)
        frames = self.vae.decode_step(z, slots, first=False).clamp(-1, 1)
        return (frames, *slots)


def initial_cache(vae: WanVAE, latent_hw, batch: int = 1) -> list:
    """Shapes (and zero values) of the cache slots, found by decoding one frame."""
    slots: list = []
    with torch.no_grad():
        vae.decode_step(torch.zeros(batch, vae.config.z_dim, 1, *latent_hw), slots, first=True)
    return slots


def export_vae_decoder(vae: WanVAE, latent_hw, first_path: str, next_path: str, opset: int = 17) -> int:
    """Export both graphs; returns the number of cache slots."""
    vae = vae.eval()
    slots = initial_cache(vae, latent_hw)
    ins, outs = cache_names(len(slots))
    z = torch.zeros(1, vae.config.z_dim, 1, *latent_hw)
    cache = [torch.zeros_like(s) for s in slots]
    with torch.no_grad():
        torch.onnx.export(DecodeFirst(vae), (z,), first_path, input_names=[VAE_LATENT], output_names=[VAE_FRAMES, *outs],
                          opset_version=opset, dynamo=False)
        pin_output_shapes(first_path, DecodeFirst(vae)(z))
        torch.onnx.export(DecodeNext(vae), (z, *cache), next_path,
                          input_names=[VAE_LATENT, *ins], output_names=[VAE_FRAMES, *outs], opset_version=opset,
                          dynamo=False)
        pin_output_shapes(next_path, DecodeNext(vae)(z, *cache))
    return len(slots)


def pin_output_shapes(path: str, outputs) -> None:
    """Write the concrete output shapes into the graph (the tracer loses them through the nearest
    upsampling); every input is static, so they are the shapes the graph always produces."""
    import onnx

    model = onnx.load(path)
    for value, tensor in zip(model.graph.output, outputs):
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for size in tensor.shape:
            dims.add().dim_value = int(size)
    onnx.checker.check_model(model)
    onnx.save(model, path)
