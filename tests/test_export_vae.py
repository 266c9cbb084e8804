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


def test_shapes_from_the_meta_device_are_those_of_a_real_decode():
    """export_vae_decoder takes every shape from a decode on the meta device (no memory at any
    resolution): they equal a real decode's, for the first frame and the next, batched too."""
    from rf_runtime.export.vae_graph import decoder_shapes

    vae = tiny_vae(seed=4)
    for batch, latent_hw in ((1, (4, 6)), (2, (3, 5))):
        z = torch.randn(batch, 16, 1, *latent_hw)
        slots: list = []
        with torch.no_grad():
            first = vae.decode_step(z, slots, first=True)
            after_first = [list(s.shape) for s in slots]
            frames = vae.decode_step(z, slots, first=False)
        assert decoder_shapes(vae, latent_hw, batch) == (
            list(first.shape),
            list(frames.shape),
            after_first,
        )
        assert [list(s.shape) for s in slots] == after_first  # fixed shapes: one list serves both graphs
        assert not any(p.is_meta for p in vae.parameters())  # the model itself is untouched


def _plain_export(module, args, path):
    """The first-frame graph as torch.onnx.export writes it (the exporter before the rewrite)."""
    with torch.no_grad():
        torch.onnx.export(module, args, path, input_names=["z"], opset_version=17, dynamo=False)


def test_first_frame_graph_computes_its_zero_slots_instead_of_storing_them(tmp_path):
    """torch stores the first frame's zero cache slots as data (3.5 GB at 480x832): the exporter writes
    them as ConstantOfShape nodes. Against torch's own file: the same graph once folded (op list),
    the same outputs bit for bit through onnxruntime, and no all-zero tensor of 1 KiB or more left."""
    import onnx
    from onnx import numpy_helper

    from rf_runtime.export.onnx_fold import fold_constants
    from rf_runtime.export.vae_graph import DecodeFirst, FrameDecoder

    vae = tiny_vae(seed=4)
    first, step = str(tmp_path / "vae_decode_first.onnx"), str(tmp_path / "vae_decode.onnx")
    export_vae_decoder(vae, (4, 6), first, step)
    plain = str(tmp_path / "plain.onnx")
    _plain_export(DecodeFirst(FrameDecoder(vae)), (torch.zeros(1, 16, 1, 4, 6),), plain)

    def zero_tensors(model):
        tensors = [a.t for n in model.graph.node for a in n.attribute if a.type == onnx.AttributeProto.TENSOR]
        arrays = [numpy_helper.to_array(t) for t in [*tensors, *model.graph.initializer]]
        return [a.shape for a in arrays if a.nbytes >= 1024 and not a.any()]

    ours, theirs = onnx.load(first), onnx.load(plain)
    stored = zero_tensors(theirs)
    assert len(stored) >= 10  # what the rewrite is for: the slots, stored as zeros by torch
    assert zero_tensors(ours) == []
    fills = [n for n in ours.graph.node if n.op_type == "ConstantOfShape"]
    assert len(fills) == len(stored)
    ops = [[n.op_type for n in fold_constants(m).graph.node] for m in (ours, theirs)]
    assert ops[0] == ops[1]
    z = np.random.default_rng(0).standard_normal((1, 16, 1, 4, 6)).astype(np.float32)
    got, want = (
        ort.InferenceSession(p, providers=["CPUExecutionProvider"]).run(None, {"z": z})
        for p in (first, plain)
    )
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))


def test_zero_constants_in_external_files_are_read_one_at_a_time(tmp_path):
    """As torch writes a graph over 2 GB: the Constant values in data files beside it. The zero one
    becomes a ConstantOfShape, the non-zero one stays; the graph computes the same."""
    import onnx
    from onnx import helper, numpy_helper

    from rf_runtime.export.onnx_files import zero_constants_to_fills

    zeros, ones = np.zeros((4, 64), np.float32), np.ones((4, 64), np.float32)
    nodes = [
        helper.make_node("Constant", [], ["a"], value=numpy_helper.from_array(zeros, "a")),
        helper.make_node("Constant", [], ["b"], value=numpy_helper.from_array(ones, "b")),
        helper.make_node("Add", ["a", "x"], ["ax"]),
        helper.make_node("Add", ["ax", "b"], ["y"]),
    ]
    io = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [4, 64]) for n in ("x", "y")]
    model = helper.make_model(
        helper.make_graph(nodes, "g", io[:1], io[1:]), opset_imports=[helper.make_opsetid("", 17)]
    )
    path = str(tmp_path / "g.onnx")
    onnx.save(
        model,
        path,
        save_as_external_data=True,
        all_tensors_to_one_file=False,
        size_threshold=0,
        convert_attribute=True,
    )
    loaded = onnx.load(path, load_external_data=False)
    assert zero_constants_to_fills(loaded, str(tmp_path)) == 1
    assert [n.op_type for n in loaded.graph.node] == ["Constant", "ConstantOfShape", "Constant", "Add", "Add"]
    onnx.external_data_helper.load_external_data_for_model(loaded, str(tmp_path))
    x = np.arange(256, dtype=np.float32).reshape(4, 64)
    (y,) = ort.InferenceSession(loaded.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )
    assert np.array_equal(y, x + 1)
