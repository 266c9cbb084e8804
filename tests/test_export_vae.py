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
        frames, *cache = s_step.run(None, {"z": zn[:, :, i:i + 1], **dict(zip(ins, cache))})
        parts.append(frames)
    assert [p.shape[2] for p in parts] == [1, 4, 4, 4, 4]
    assert rel(np.concatenate(parts, axis=2), expect) < TOL
    assert_tensorrt_ready(first)
    assert_tensorrt_ready(step)
