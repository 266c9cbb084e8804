"""Lowering the streaming VAE decoder to ONNX: one latent frame per call, feature cache explicit.

Two graphs, because latent frame 0 is special (temporal upsampling skips it and it gives 1 video
frame instead of 4): ``vae_decode_first`` (z -> frames, cache) and ``vae_decode`` (z, cache ->
frames, cache). Every cache slot has a fixed shape (see ``rf_runtime.models.vae``).

The causal 3-D convolutions are exported as 2-D convolutions (``lower_convs``): onnxruntime's CPU
provider runs a 2-D ``Conv`` through its blocked NCHWc kernels, a 3-D one through im2col + GEMM,
measured 1.6x slower on the same arithmetic for the shipped model's decoder (docs/notes/speed.md). A causal conv with kernel
(kt, kh, kw) that makes T output frames is the same sum of products as a 2-D conv over the stacked
windows of kt input frames: window t is the input frames t*st .. t*st+kt-1 with the frames folded
into the channels ([C, kt] -> C*kt, a reshape), and the weight [O, C, kt, kh, kw] folded the same way.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from rf_runtime.graph_io import VAE_FRAMES, VAE_LATENT
from rf_runtime.graph_io import vae_cache_names as cache_names
from rf_runtime.models.vae import CausalConv3d, WanVAE


class CausalConvAs2d(CausalConv3d):
    """A ``CausalConv3d`` computed as one 2-D convolution over stacked time windows (same weights,
    same numbers up to float32 summation order). Only for export: the reference keeps its Conv3d."""

    @classmethod
    def from_conv(cls, conv: CausalConv3d) -> "CausalConvAs2d":
        new = cls.__new__(cls)
        new.__dict__.update(conv.__dict__)  # the same parameters, time_pad / space_pad and conv settings
        return new

    def forward(self, x, past=None):
        pad_t = self.time_pad
        if past is not None and pad_t > 0:
            x = torch.cat([past, x], dim=2)
            pad_t -= past.shape[2]
        if pad_t > 0:
            x = F.pad(x, (0, 0, 0, 0, pad_t, 0))
        b, c, t_in, h, w = x.shape
        kt, st = self.kernel_size[0], self.stride[0]
        t_out = (t_in - kt) // st + 1
        weight = self.weight.reshape(self.out_channels, c * kt, *self.kernel_size[1:])
        if t_out == 1:  # the streaming decoder's usual case: no slice, no transpose, only reshapes
            x2 = x[:, :, :kt] if t_in > kt else x
            x2 = x2.reshape(b, c * kt, h, w)
        else:  # windows stacked on the batch axis: [t_out * b, c * kt, h, w]
            x2 = torch.cat(
                [x[:, :, i * st : i * st + kt].reshape(b, c * kt, h, w) for i in range(t_out)], dim=0
            )
        pw, _, ph, _ = self.space_pad
        y = F.conv2d(x2, weight, self.bias, stride=self.stride[1:], padding=(ph, pw))
        if t_out == 1:
            return y.unsqueeze(2)
        return y.unflatten(0, (t_out, b)).permute(1, 2, 0, 3, 4)  # [b, o, t_out, h', w']


def lower_convs(vae: WanVAE) -> WanVAE:
    """A copy of ``vae`` whose causal convolutions run as 2-D convolutions (``CausalConvAs2d``)."""
    import copy

    lowered = copy.deepcopy(vae)
    for name, module in list(lowered.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is CausalConv3d:
                if child.space_pad[0] != child.space_pad[1] or child.space_pad[2] != child.space_pad[3]:
                    raise ValueError(f"{name}.{child_name}: asymmetric spatial padding {child.space_pad}")
                setattr(module, child_name, CausalConvAs2d.from_conv(child))
    return lowered


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
    """Export both graphs (causal convolutions lowered to 2-D, see ``lower_convs``) for ``batch``
    rows; returns the number of cache slots.

    The graphs' shapes come from a decode on the meta device (``decoder_shapes``) and the per-frame
    graph is traced with its cache inputs as a zero broadcast to each slot's shape (no data; the
    decoder has no data-dependent branch), so the trace of each graph is the only decode that holds
    activations: peak memory is one decode, not the three it was (docs/notes/export.md)."""
    vae = lower_convs(vae.eval())
    first_shape, frames_shape, slot_shapes = decoder_shapes(vae, latent_hw, batch)
    ins, outs = cache_names(len(slot_shapes))
    z = torch.zeros(batch, vae.config.z_dim, 1, *latent_hw)
    cache = [torch.zeros(()).expand(shape) for shape in slot_shapes]
    outputs = [VAE_FRAMES, *outs]
    export_graph(
        DecodeFirst(vae), (z,), first_path, [VAE_LATENT], outputs, [first_shape, *slot_shapes], opset
    )
    export_graph(
        DecodeNext(vae),
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
    import os
    import tempfile

    import onnx

    from rf_runtime.export.onnx_files import save_onnx, zero_constants_to_fills

    with tempfile.TemporaryDirectory(
        prefix=".rf-vae-", dir=os.path.dirname(os.path.abspath(path))
    ) as scratch:
        raw = os.path.join(scratch, os.path.basename(path))
        with torch.no_grad():
            torch.onnx.export(
                module,
                args,
                raw,
                input_names=input_names,
                output_names=output_names,
                opset_version=opset,
                dynamo=False,
            )
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
