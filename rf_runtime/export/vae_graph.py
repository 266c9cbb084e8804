"""Lowering the streaming VAE decoder to ONNX: one latent frame per call, feature cache explicit.

Two graphs, because latent frame 0 is special (temporal upsampling skips it and it gives 1 video
frame instead of 4): ``vae_decode_first`` (z -> frames, cache) and ``vae_decode`` (z, cache ->
frames, cache). Every cache slot has a fixed shape, the reference's (see ``rf_runtime.models.vae``).

The exported module is ``FrameDecoder``: the reference decoder's modules and weights, called in a
form that onnxruntime's CPU provider runs fastest (docs/notes/speed.md). The reference keeps its
[B, C, T, H, W] tensors and Conv3d; the graph carries the frames of one call as 4-D tensors, so

- every causal 3-D convolution is a sum of 2-D convolutions, one per time tap (a causal conv with
  kernel (kt, kh, kw) making output frame t is the sum over k of the 2-D conv of input frame t + k
  with the weight's tap k). onnxruntime runs a 2-D ``Conv`` through its blocked NCHWc kernels (a
  3-D one through im2col + GEMM, measured 1.6x slower on the same arithmetic) and adds each term
  into the next convolution's output, so no time window is concatenated or sliced;
- the residual additions are between 4-D convolution outputs, which stay in the NCHWc layout;
- Wan's RMS norm is written with the fewest passes (``FrameRMSNorm``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from rf_runtime.errors import ConfigError
from rf_runtime.graph_io import VAE_FRAMES, VAE_LATENT
from rf_runtime.graph_io import vae_cache_names as cache_names
from rf_runtime.models.vae import (
    CACHE_T,
    AttentionBlock,
    CausalConv3d,
    Resample,
    ResidualBlock,
    RMSNorm,
    WanVAE,
)


class FrameCache:
    """The decoder's feature cache as the lowered graph (``FrameDecoder``) reads and writes it: the
    same slots in the same order and shapes as ``FeatureCache`` ([B, C, 2, H, W] per cached conv,
    zeros at first), so the graphs' IO and a stream's saved state are the reference's; only the
    frames between the slots are 4-D tensors."""

    def __init__(self, slots: list, first: bool):
        self.slots, self.first, self.index = slots, first, 0

    def _past(self, like: torch.Tensor):
        """This conv's slot; None when it is created in this call (zeros: nothing to convolve)."""
        if self.index == len(self.slots):
            b, c, h, w = like.shape
            self.slots.append(like.new_zeros((b, c, CACHE_T, h, w)))
            return None
        return self.slots[self.index]

    def conv(self, layer: CausalConv3d, frames: list) -> list:
        """A cached causal conv over ``frames``; its slot becomes the last CACHE_T input frames."""
        past = self._past(frames[0])
        slot = self.slots[self.index]
        history = [slot[:, :, i : i + 1] for i in range(CACHE_T)] + [f.unsqueeze(2) for f in frames]
        self.slots[self.index] = torch.cat(history[-CACHE_T:], dim=2)
        self.index += 1
        return causal_conv_frames(layer, frames, past)

    def time_up(self, layer: CausalConv3d, frames: list):
        """time_conv of temporal upsampling; None on frame 0 (which skips it but reserves the slot)."""
        if self.first:
            self._past(frames[0])
            self.index += 1
            return None
        return self.conv(layer, frames)


def causal_conv_frames(layer: CausalConv3d, frames: list, past: torch.Tensor | None = None) -> list:
    """A ``CausalConv3d`` over 4-D frames [B, C, H, W] as sums of 2-D convolutions, one term per time
    tap: output frame t = sum over k of conv2d(seq[t * st + k], W[:, :, k]) (+ bias), where seq is
    the past (the cache slot's CACHE_T frames, or zeros, which add nothing) and then ``frames``.
    Every term is an NCHWc convolution and onnxruntime adds each into the next one's output (its
    Conv + Add fusion): no time window is concatenated. The first window's two past taps are one
    conv over the slot [B, C, 2, H, W] viewed as [B, 2C, H, W] (channel c * 2 + i = frame i of
    channel c: a reshape, no copy), with the weight folded the same way."""
    kt, st = layer.kernel_size[0], layer.stride[0]
    if layer.time_pad not in (0, CACHE_T):
        raise ConfigError(
            f"a causal conv with time padding {layer.time_pad}: the ONNX export lowers only 0 or {CACHE_T} "
            "(the Wan VAE decoder's convolutions)"
        )
    n_past = layer.time_pad
    seq = [None] * n_past + list(frames)  # None: a past frame (from ``past``, or zero padding)
    pw, _, ph, _ = layer.space_pad
    o, c = layer.out_channels, layer.in_channels

    def conv(x, weight, bias):
        return F.conv2d(x, weight, bias, stride=layer.stride[1:], padding=(ph, pw))

    out = []
    for t in range((len(seq) - kt) // st + 1):
        y, start = None, t * st
        if past is not None and start == 0 and n_past == CACHE_T and kt >= CACHE_T:
            b, _, _, h, w = past.shape
            folded = layer.weight[:, :, :CACHE_T].reshape(o, c * CACHE_T, *layer.kernel_size[1:])
            y = conv(past.reshape(b, c * CACHE_T, h, w), folded, layer.bias)
        for k in range(CACHE_T if y is not None else 0, kt):
            i = start + k
            x = seq[i] if i >= n_past else (None if past is None else past[:, :, i])
            if x is None:
                continue
            term = conv(x, layer.weight[:, :, k], layer.bias if y is None else None)
            y = term if y is None else y + term
        if y is None:  # cannot happen for the decoder's convs: every window holds a frame of ``frames``
            raise ConfigError(f"a causal conv window of zero padding only (kernel {layer.kernel_size})")
        out.append(y)
    return out


class FrameRMSNorm(RMSNorm):
    """Wan's RMS_norm of 4-D frames, in the form onnxruntime runs with the fewest passes: the
    reference's F.normalize is ReduceL2, Clip, Expand, Div, then two Muls (sqrt(C), gamma); here
    ReduceL2, Clip and Reciprocal on the [B, 1, H, W] norm, then x * (1 / norm) * (sqrt(C) * gamma),
    the last factor folded at export (the same numbers up to float32 rounding). A subclass of
    ``RMSNorm`` with its parameters, so the graph's norm nodes carry an RMSNorm scope (the
    low-precision variants keep them in float32, export/precision.py)."""

    @classmethod
    def from_norm(cls, norm: RMSNorm) -> "FrameRMSNorm":
        new = cls.__new__(cls)
        new.__dict__.update(norm.__dict__)  # the same gamma and scale
        return new

    def forward(self, x):
        inv = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12).reciprocal()
        return x * inv * (self.gamma.reshape(-1, 1, 1) * self.scale)


class FrameDecoder(nn.Module):
    """The streaming decoder of a ``WanVAE`` (a copy of its modules and parameters), lowered for
    onnxruntime's CPU kernels: the frames of one call are a list of 4-D [B, C, H, W] tensors instead
    of one [B, C, T, H, W] tensor, so every convolution is a 2-D one on a frame
    (``causal_conv_frames``), the residual additions are on 4-D tensors that stay in onnxruntime's
    blocked NCHWc layout between convolutions, and no time axis is sliced, concatenated or
    transposed between layers. The feature cache keeps the reference's slots (``FrameCache``).
    Computes what ``WanVAE.decode_step`` computes (tests/test_export_vae.py)."""

    def __init__(self, vae: WanVAE):
        import copy

        super().__init__()
        self.vae = copy.deepcopy(vae)  # its norms become FrameRMSNorm; the caller's model is unchanged
        for module in list(self.vae.decoder.modules()):
            for name, child in list(module.named_children()):
                if type(child) is RMSNorm:
                    setattr(module, name, FrameRMSNorm.from_norm(child))

    def forward(self, z: torch.Tensor, slots: list, first: bool) -> torch.Tensor:
        vae, dec = self.vae, self.vae.decoder
        cache = FrameCache(slots, first)
        x = z / vae.latents_inv_std + vae.latents_mean  # [B, z, 1, H, W]
        frames = [x[:, :, i] for i in range(x.shape[2])]
        frames = [causal_conv_frames(vae.conv2, [f])[0] for f in frames]
        frames = cache.conv(dec.conv1, frames)
        for layer in (*dec.middle, *dec.upsamples):
            frames = self._layer(layer, frames, cache)
        frames = [F.silu(dec.head[0](f)) for f in frames]
        frames = cache.conv(dec.head[2], frames)
        return torch.stack(frames, dim=2)

    def _layer(self, layer, frames: list, cache: FrameCache) -> list:
        if isinstance(layer, ResidualBlock):
            if isinstance(layer.shortcut, CausalConv3d):
                h = causal_conv_frames(layer.shortcut, frames)
            else:
                h = frames
            for sub in layer.residual:
                if isinstance(sub, RMSNorm):
                    frames = [sub(f) for f in frames]
                elif isinstance(sub, nn.SiLU):
                    frames = [F.silu(f) for f in frames]
                elif isinstance(sub, CausalConv3d):
                    frames = cache.conv(sub, frames)
                elif not isinstance(sub, nn.Dropout):
                    raise ConfigError(
                        f"the ONNX export has no lowering for {type(sub).__name__} in a residual block"
                    )
            return [a + b for a, b in zip(frames, h)]
        if isinstance(layer, AttentionBlock):  # within each frame: the reference on a 1-frame view
            return [layer(f.unsqueeze(2), cache).squeeze(2) for f in frames]
        if isinstance(layer, Resample) and layer.mode in ("upsample2d", "upsample3d"):
            if layer.mode == "upsample3d":
                y = cache.time_up(layer.time_conv, frames)
                if y is not None:  # 2C channels -> 2 frames per input frame (channels [0:C], [C:2C])
                    c = y[0].shape[1] // 2
                    frames = [half for f in y for half in (f[:, :c], f[:, c:])]
            return [layer.resample(f) for f in frames]
        raise ConfigError(f"the ONNX export has no lowering for {type(layer).__name__} in the decoder")


class DecodeFirst(nn.Module):
    """Graph ``vae_decode_first``: z -> (frames, *cache). ``decode(z, slots, first)`` is the decoder:
    ``FrameDecoder(vae)`` in the exported graph, ``vae.decode_step`` as the reference it is checked
    against (``rf-export verify``)."""

    def __init__(self, decode):
        super().__init__()
        self.decode = decode

    def forward(self, z):
        slots: list = []
        frames = self.decode(z, slots, first=True).clamp(-1, 1)
        return (frames, *slots)


class DecodeNext(nn.Module):
    """Graph ``vae_decode``: (z, *cache) -> (frames, *cache); ``decode`` as in ``DecodeFirst``."""

    def __init__(self, decode):
        super().__init__()
        self.decode = decode

    def forward(self, z, *cache):
        slots = list(cache)
        frames = self.decode(z, slots, first=False).clamp(-1, 1)
        return (frames, *slots)


def decoder_shapes(vae: WanVAE, latent_hw, batch: int = 1) -> tuple[list, list, list]:
    """(frames of the first graph, frames of the per-frame graph, every cache slot) as shapes, from
    one decode of each kind by a copy of the decoder on the meta device: no memory, whatever the
    resolution (at 480x832 the slots of the Wan VAE alone are 3.6 GB)."""
    with torch.device("meta"):
        meta = WanVAE(vae.config)
    meta.eval()
    z = torch.zeros(batch, vae.config.z_dim, 1, *latent_hw, device="meta")
    slots: list = []
    with torch.no_grad():
        first = meta.decode_step(z, slots, first=True)
        frames = meta.decode_step(z, slots, first=False)
    return list(first.shape), list(frames.shape), [list(s.shape) for s in slots]


def export_vae_decoder(
    vae: WanVAE, latent_hw, first_path: str, next_path: str, opset: int = 17, batch: int = 1
) -> int:
    """Export both graphs (the decoder lowered to 2-D frames, ``FrameDecoder``) for ``batch`` rows;
    returns the number of cache slots.

    The graphs' shapes come from a decode on the meta device (``decoder_shapes``) and the per-frame
    graph is traced with its cache inputs as a zero broadcast to each slot's shape (no data; the
    decoder has no data-dependent branch), so the trace of each graph is the only decode that holds
    activations: peak memory is one decode, not the three it was (docs/notes/export.md)."""
    vae = vae.eval()
    decoder = FrameDecoder(vae)
    first_shape, frames_shape, slot_shapes = decoder_shapes(vae, latent_hw, batch)
    ins, outs = cache_names(len(slot_shapes))
    z = torch.zeros(batch, vae.config.z_dim, 1, *latent_hw)
    cache = [torch.zeros(()).expand(shape) for shape in slot_shapes]
    outputs = [VAE_FRAMES, *outs]
    export_graph(
        DecodeFirst(decoder), (z,), first_path, [VAE_LATENT], outputs, [first_shape, *slot_shapes], opset
    )
    export_graph(
        DecodeNext(decoder),
        (z, *cache),
        next_path,
        [VAE_LATENT, *ins],
        outputs,
        [frames_shape, *slot_shapes],
        opset,
    )
    return len(slot_shapes)


def export_graph(module, args, path: str, input_names, output_names, output_shapes, opset: int) -> None:
    """``torch.onnx.export`` into a scratch folder beside ``path``, then the graph saved as ``path`` with
    its all-zero constants as ConstantOfShape nodes (``onnx_files.zero_constants_to_fills``: the
    first-frame graph's cache slots start as zeros, which the TorchScript exporter stores as data,
    3.5 GB at 480x832, where torch then writes the graph as one file per tensor) and its outputs'
    shapes pinned (``pin_output_shapes``)."""
    import onnx

    from rf_runtime.export.onnx_files import save_onnx, traced_in_scratch, zero_constants_to_fills

    with traced_in_scratch(module, args, path, input_names, output_names, opset) as (raw, scratch):
        model = onnx.load(raw, load_external_data=False)
        zero_constants_to_fills(model, scratch)
        onnx.external_data_helper.load_external_data_for_model(model, scratch)  # the weights, if apart
    pin_output_shapes(model, output_shapes)
    save_onnx(model, path, external=False)


def pin_output_shapes(model, shapes) -> None:
    """Write the concrete output shapes into the graph (the tracer loses them through the nearest
    upsampling); every input is static, so they are the shapes the graph always produces."""
    import onnx

    for value, shape in zip(model.graph.output, shapes, strict=True):
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        for size in shape:
            dims.add().dim_value = int(size)
    onnx.checker.check_model(model)
