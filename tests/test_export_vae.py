"""The exported streaming VAE decoder: first-frame graph + per-frame graph through onnxruntime
equal the PyTorch full decode; TensorRT op support and static shapes."""

import numpy as np
import pytest
import torch

ort = pytest.importorskip("onnxruntime")

from rf_runtime.export.vae_graph import cache_names, export_vae_decoder  # noqa: E402
from rf_runtime.testing import tiny_vae  # noqa: E402
from tests.test_export_dit import TOL, assert_tensorrt_ready, rel  # noqa: E402


def test_streamed_graphs_equal_full_decode(tmp_path):
    vae = tiny_vae(seed=4)
    first, step = str(tmp_path / "vae_decode_first.onnx"), str(tmp_path / "vae_decode.onnx")
    n = export_vae_decoder(vae, (4, 6), first, step)
    torch.manual_seed(0)
    z = torch.randn(1, 16, 5, 4, 6)
    with torch.no_grad():
        expect = vae.decode(z).numpy()
    s_first = ort.InferenceSession(first, providers=["CPUExecutionProvider"])
    s_step = ort.InferenceSession(step, providers=["CPUExecutionProvider"])
    zn = z.numpy()
    frames, *cache = s_first.run(None, {"z": zn[:, :, :1]})
    parts = [frames]
    ins, _ = cache_names(n)
    for i in range(1, 5):
        frames, *cache = s_step.run(None, {"z": zn[:, :, i : i + 1], **dict(zip(ins, cache))})
        parts.append(frames)
    assert [p.shape[2] for p in parts] == [1, 4, 4, 4, 4]
    assert rel(np.concatenate(parts, axis=2), expect) < TOL
    assert_tensorrt_ready(first)
    assert_tensorrt_ready(step)


def test_lowered_convs_equal_the_reference_conv3d():
    """causal_conv_frames (a sum of 2-D convs over 4-D frames, one per time tap) against the reference
    CausalConv3d, for every kernel / stride / past form the decoder has: 3x3x3 with a 2-frame past and
    1 or several output frames, no past (zero padding), the 1x1x1 shortcut, time_conv (3x1x1) with a
    past, a spatial stride."""
    from rf_runtime.export.vae_graph import causal_conv_frames
    from rf_runtime.models.vae import CausalConv3d

    torch.manual_seed(1)
    cases = [
        ((5, 7, 3), dict(padding=1), 1, True),
        ((5, 7, 3), dict(padding=1), 4, True),
        ((5, 7, 3), dict(padding=1), 3, False),
        ((5, 7, 1), {}, 4, False),
        ((5, 10, (3, 1, 1)), dict(padding=(1, 0, 0)), 2, True),
        ((5, 6, 3), dict(padding=1, stride=(1, 2, 2)), 1, True),
    ]
    for (cin, cout, k), kw, frames, with_past in cases:
        ref = CausalConv3d(cin, cout, k, **kw).eval()
        x = torch.randn(1, cin, frames, 6, 8)
        past = torch.randn(1, cin, 2, 6, 8) if with_past else None
        with torch.no_grad():
            want = ref(x, past)
            got = torch.stack(causal_conv_frames(ref, list(x.unbind(2)), past), dim=2)
        assert got.shape == want.shape, (k, kw, frames)
        assert rel(got.numpy(), want.numpy()) < 1e-6, (k, kw, frames)


def test_lowered_norm_equals_wan_rms_norm():
    """FrameRMSNorm against the reference RMSNorm (F.normalize * sqrt(C) * gamma), a zero pixel
    included (the reference's eps clamp: it stays 0, no NaN)."""
    from rf_runtime.export.vae_graph import FrameRMSNorm
    from rf_runtime.models.vae import RMSNorm

    torch.manual_seed(2)
    norm = RMSNorm(6, images=False)
    with torch.no_grad():
        norm.gamma.copy_(torch.randn(6, 1, 1, 1))
    x = torch.randn(1, 6, 1, 5, 7)
    x[:, :, :, 2, 3] = 0.0
    with torch.no_grad():
        want, got = norm(x)[:, :, 0], FrameRMSNorm.from_norm(norm)(x[:, :, 0])
    assert torch.isfinite(got).all() and float(got[0, :, 2, 3].abs().max()) == 0.0
    assert rel(got.numpy(), want.numpy()) < 1e-6


def test_frame_decoder_equals_decode_step_with_its_cache():
    """FrameDecoder (the exported form) against the reference decode_step frame by frame: the frames
    and every cache slot (same order, same shapes, same values), with temporal upsampling (the tiny
    Wan-shaped VAE) and without (the shipped model's geometry: stride 1 in time)."""
    from rf_runtime.export.vae_graph import FrameDecoder
    from rf_runtime.models.vae import VAEConfig, WanVAE

    torch.manual_seed(3)
    flat = WanVAE(
        VAEConfig(
            dim=8,
            z_dim=4,
            dim_mult=(1, 2, 2),
            num_res_blocks=1,
            temperal_downsample=(False, False),
            latents_mean=(0.0,) * 4,
            latents_std=(1.0,) * 4,
        )
    ).eval()
    for vae, z_dim in ((tiny_vae(seed=4).eval(), 16), (flat, 4)):
        low = FrameDecoder(vae)
        z = torch.randn(1, z_dim, 4, 4, 6)
        ref_slots, low_slots = [], []
        with torch.no_grad():
            for i in range(4):
                want = vae.decode_step(z[:, :, i : i + 1], ref_slots, first=i == 0)
                got = low(z[:, :, i : i + 1], low_slots, first=i == 0)
                assert got.shape == want.shape and rel(got.numpy(), want.numpy()) < 1e-5, i
                assert [s.shape for s in low_slots] == [s.shape for s in ref_slots]
                for a, b in zip(low_slots, ref_slots):
                    assert float((a - b).abs().max()) <= 1e-5 * max(float(b.abs().max()), 1.0), i


def test_exported_decoder_has_only_2d_convolutions(tmp_path):
    """The lowering is in the exported graphs: every Conv weight is 4-D (onnxruntime's NCHWc kernels),
    and no convolution reads a concatenation (no time window is built: the taps are summed)."""
    import onnx

    first, step = str(tmp_path / "f.onnx"), str(tmp_path / "s.onnx")
    export_vae_decoder(tiny_vae(seed=4), (4, 6), first, step)
    for path in (first, step):
        model = onnx.load(path)
        ranks = {t.name: len(t.dims) for t in model.graph.initializer}
        convs = [n for n in model.graph.node if n.op_type == "Conv"]
        assert convs and all(ranks[n.input[1]] == 4 for n in convs if n.input[1] in ranks)
        assert all(n.input[1] in ranks for n in convs)  # weights are initializers, reshaped at export
        made_by = {o: n.op_type for n in model.graph.node for o in n.output}
        assert not [n.name for n in convs if made_by.get(n.input[0]) == "Concat"]


def test_lowered_norms_keep_their_float32_policy(tmp_path):
    """The lowered graph's norm nodes still carry an RMSNorm scope, so the fp16 / bf16 variants keep
    every one of them (sum of squares, clamp, reciprocal, the scaling) in float32 as before."""
    import onnx

    from rf_runtime.export import precision
    from rf_runtime.export.vae_graph import DecodeNext, FrameDecoder
    from rf_runtime.models import vae as vae_module

    vae = tiny_vae(seed=4)
    first, step = str(tmp_path / "f.onnx"), str(tmp_path / "s.onnx")
    export_vae_decoder(vae, (4, 6), first, step)
    policy = precision.module_policy(DecodeNext(FrameDecoder(vae)), {"z", "frames"}, (vae_module.RMSNorm,))
    nodes = onnx.load(step).graph.node
    norms = [n for n in nodes if n.op_type in ("ReduceL2", "Reciprocal")]
    assert norms and all(policy.fp32_node(n.name) for n in norms)
    assert not all(policy.fp32_node(n.name) for n in nodes if n.op_type == "Conv")  # the convs are not


def test_profiled_flops_are_the_reference_convolutions(tmp_path):
    """rf-bench --profile counts a VAE call's FLOPs from the graph; the lowered graph must count what
    the reference decoder computes, no more: 2 x multiply-adds of every Conv3d / Conv2d / attention
    matmul the reference runs for one frame, counted by hand from forward hooks on its modules."""
    import torch.nn as nn

    from rf_runtime.models.vae import AttentionBlock
    from rf_runtime.profile import graph_flops

    vae = tiny_vae(seed=4).eval()
    first, step = str(tmp_path / "f.onnx"), str(tmp_path / "s.onnx")
    export_vae_decoder(vae, (4, 6), first, step)
    counted = {"flops": 0}

    def hook(module, args, out):
        kernel = module.weight.shape[1:].numel()  # C_in / groups x the kernel's taps
        counted["flops"] += 2 * out.numel() * kernel

    def attention(module, args, out):  # SDPA within each frame: q k^T and p v, 2 x (HW)^2 x C each
        _, c, t, h, w = out.shape
        counted["flops"] += t * 2 * 2 * (h * w) ** 2 * c

    convs = [m for m in vae.decoder.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    handles = [m.register_forward_hook(hook) for m in (*convs, vae.conv2)]
    handles += [
        m.register_forward_hook(attention) for m in vae.decoder.modules() if isinstance(m, AttentionBlock)
    ]
    slots = []
    with torch.no_grad():
        z = torch.randn(1, 16, 1, 4, 6)
        vae.decode_step(z, slots, first=True)
        counted["flops"] = 0
        vae.decode_step(z, slots, first=False)
    for h in handles:
        h.remove()
    assert any(isinstance(m, AttentionBlock) for m in vae.decoder.modules())
    assert graph_flops(step)["flops"] == counted["flops"]
