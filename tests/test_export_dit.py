"""The exported DiT step graph: onnxruntime against the PyTorch reference path, TensorRT op support,
static shapes. One graph serves every cache state (chunk 0, chunk 1, steady state)."""

import csv
import os

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from rf_runtime.export.dit_graph import INPUTS, OUTPUTS, example_inputs, export_dit_step  # noqa: E402
from rf_runtime.sampler import renoise, x0_from_flow  # noqa: E402
from rf_runtime.testing import tiny_dit  # noqa: E402

TOL = 1e-4  # relative error of onnxruntime fp32 against the PyTorch fp32 reference
LATENT_HW, CONTEXT, CHUNK = (4, 6), 6, 3
TRT_OPS = os.path.join(os.path.dirname(__file__), "data", "tensorrt10_onnx_operators.csv")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny_dit(seed=2)
    path = str(tmp_path_factory.mktemp("onnx") / "dit_step.onnx")
    export_dit_step(model, path, example_inputs(model, LATENT_HW, CONTEXT, CHUNK, valid_frames=CONTEXT))
    return model, path


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("valid", [0, 3, 6])  # chunk 0, chunk 1, every later chunk
def test_step_graph_matches_reference(exported, valid):
    model, path = exported
    feeds = example_inputs(model, LATENT_HW, CONTEXT, CHUNK, valid_frames=valid, seed=valid)
    out = dict(zip(OUTPUTS, ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, feeds)))
    t = torch.full((1, CHUNK), 937.5)
    T = lambda name: torch.from_numpy(feeds[name])  # noqa: E731
    with torch.no_grad():  # the reference path: forward_chunk with an integer count of valid frames
        flow, k, v = model.forward_chunk(T("x"), t, T("text_k"), T("text_v"), T("ctx_k"), T("ctx_v"), valid)
    x0 = x0_from_flow(T("x"), flow, 0.9375)
    expect = {"x0": x0, "x_next": renoise(x0, T("eps"), 0.8333), "new_k": k, "new_v": v}
    for name in OUTPUTS:
        assert rel(out[name], expect[name].numpy()) < TOL, name


def test_invalid_context_is_ignored(exported):
    model, path = exported
    feeds = example_inputs(model, LATENT_HW, CONTEXT, CHUNK, valid_frames=3)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    a = sess.run(["x0"], feeds)[0]
    feeds["ctx_k"][:, :, 3 * 6 :] = 1e3  # garbage in the frames the mask marks invalid
    b = sess.run(["x0"], feeds)[0]
    assert np.array_equal(a, b)


def assert_tensorrt_ready(path):
    """Every op is marked Y in TensorRT 10's ONNX support matrix; every graph input/output is static."""
    with open(TRT_OPS) as f:
        supported = {row["operator"] for row in csv.DictReader(f) if row["supported"] == "Y"}
    graph = onnx.load(path).graph
    ops = {node.op_type for node in graph.node}
    assert ops - supported == set(), f"ops TensorRT 10 cannot parse: {sorted(ops - supported)}"
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        assert dims and all(d.HasField("dim_value") for d in dims), f"{value.name} has a dynamic shape"
    return graph


def test_step_graph_is_tensorrt_ready(exported):
    graph = assert_tensorrt_ready(exported[1])
    assert [i.name for i in graph.input] == INPUTS


def test_cache_update_graph_equals_commit(tmp_path):
    from rf_runtime.export.dit_graph import export_cache_update
    from rf_runtime.cache import CacheSpec, commit_chunk, commit_matrix

    spec, tpf = CacheSpec(ema_alpha=0.9), 6
    rng = np.random.default_rng(0)
    shape = lambda frames: (2, 1, frames * tpf, 2, 4)  # noqa: E731
    feeds = {
        "ctx_k": np.zeros(shape(6), np.float32),
        "ctx_v": np.zeros(shape(6), np.float32),
        "new_k": np.zeros(shape(3), np.float32),
        "new_v": np.zeros(shape(3), np.float32),
        "mix": commit_matrix(spec, 0).astype(np.float32),
    }
    path = str(tmp_path / "cache_update.onnx")
    export_cache_update(tpf, path, feeds)
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    ref_k, ref_v = feeds["ctx_k"].copy(), feeds["ctx_v"].copy()
    for n in range(5):  # write sink, write window, then evict + fold every chunk
        feeds["new_k"], feeds["new_v"] = (
            rng.standard_normal(shape(3), dtype=np.float32),
            rng.standard_normal(shape(3), dtype=np.float32),
        )
        feeds["mix"] = commit_matrix(spec, n).astype(np.float32)
        feeds["ctx_k"], feeds["ctx_v"] = sess.run(None, feeds)
        commit_chunk(spec, n, ref_k, feeds["new_k"], tpf)
        commit_chunk(spec, n, ref_v, feeds["new_v"], tpf)
        assert np.allclose(feeds["ctx_k"], ref_k, rtol=1e-6, atol=1e-6), n
        assert np.allclose(feeds["ctx_v"], ref_v, rtol=1e-6, atol=1e-6), n
    assert_tensorrt_ready(path)


def test_text_kv_graph(exported, tmp_path):
    from rf_runtime.export.dit_graph import export_text_kv

    model, _ = exported
    path = str(tmp_path / "text_kv.onnx")
    export_text_kv(model, path)
    embeds = np.random.default_rng(1).standard_normal(
        (1, model.config.text_len, model.config.text_dim), dtype=np.float32
    )
    k, v = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"text_embeds": embeds})
    with torch.no_grad():
        rk, rv = model.text_kv(torch.from_numpy(embeds))
    assert rel(k, rk.numpy()) < TOL and rel(v, rv.numpy()) < TOL
    assert_tensorrt_ready(path)
