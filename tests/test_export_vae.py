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
    """CausalConvAs2d (a 2-D conv over stacked time windows) against the reference CausalConv3d, for every
    kernel / stride / past form the VAE has: 3x3x3 with a 2-frame past, 1 and several output frames,
    the 1x1x1 shortcut, time_conv (3x1x1), the encoder's stride-2 time_conv, and no past (zero padding)."""
    from rf_runtime.export.vae_graph import CausalConvAs2d
    from rf_runtime.models.vae import CausalConv3d

    torch.manual_seed(1)
    cases = [
        ((5, 7, 3), dict(padding=1), 1, 2),
        ((5, 7, 3), dict(padding=1), 4, 2),
        ((5, 7, 3), dict(padding=1), 3, None),
        ((5, 7, 1), {}, 4, None),
        ((5, 10, (3, 1, 1)), dict(padding=(1, 0, 0)), 2, 2),
        ((5, 5, (3, 1, 1)), dict(stride=(2, 1, 1)), 4, 1),
        ((5, 6, 3), dict(padding=1, stride=(1, 2, 2)), 1, 2),
    ]
    for (cin, cout, k), kw, frames, past_frames in cases:
        ref = CausalConv3d(cin, cout, k, **kw).eval()
        low = CausalConvAs2d.from_conv(ref)
        x = torch.randn(1, cin, frames, 6, 8)
        past = torch.randn(1, cin, past_frames, 6, 8) if past_frames else None
        with torch.no_grad():
            if kw.get("stride", (1,))[0] == 2:  # time_down: the caller concatenates its 1-frame past
                x = torch.cat([past, x], dim=2)
                past = None
            want, got = ref(x, past), low(x, past)
        assert got.shape == want.shape, (k, kw, frames)
        assert rel(got.numpy(), want.numpy()) < 1e-6, (k, kw, frames)


def test_exported_decoder_has_only_2d_convolutions(tmp_path):
    """The lowering is in the exported graphs: every Conv weight is 4-D (onnxruntime's NCHWc kernels)."""
    import onnx

    first, step = str(tmp_path / "f.onnx"), str(tmp_path / "s.onnx")
    export_vae_decoder(tiny_vae(seed=4), (4, 6), first, step)
    for path in (first, step):
        model = onnx.load(path)
        ranks = {t.name: len(t.dims) for t in model.graph.initializer}
        convs = [n for n in model.graph.node if n.op_type == "Conv"]
        assert convs and all(ranks[n.input[1]] == 4 for n in convs if n.input[1] in ranks)
        assert all(n.input[1] in ranks for n in convs)  # weights are initializers, reshaped at export


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
        torch.onnx.export(module, args, path, opset_version=17, dynamo=False)


def test_first_frame_graph_computes_its_zero_slots_instead_of_storing_them(tmp_path):
    """torch stores the first frame's zero cache slots as data (3.5 GB at 480x832): the exporter writes
    them as ConstantOfShape nodes. Against torch's own file: the same graph once folded (op list),
    the same outputs bit for bit through onnxruntime, and no all-zero tensor of 1 KiB or more left."""
    import onnx
    from onnx import numpy_helper

    from rf_runtime.export.onnx_fold import fold_constants
    from rf_runtime.export.vae_graph import DecodeFirst, lower_convs

    vae = tiny_vae(seed=4)
    first, step = str(tmp_path / "vae_decode_first.onnx"), str(tmp_path / "vae_decode.onnx")
    export_vae_decoder(vae, (4, 6), first, step)
    plain = str(tmp_path / "plain.onnx")
    _plain_export(DecodeFirst(lower_convs(vae)), (torch.zeros(1, 16, 1, 4, 6),), plain)

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
