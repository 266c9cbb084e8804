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
