"""The exported DiT step graph: onnxruntime against the PyTorch reference path, TensorRT op support,
static shapes. One graph serves every cache state (chunk 0, chunk 1, steady state)."""

import csv
import os

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from export.dit_graph import INPUTS, OUTPUTS, example_inputs, export_dit_step  # noqa: E402
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
    feeds["ctx_k"][:, :, 3 * 6:] = 1e3  # garbage in the frames the mask marks invalid
    b = sess.run(["x0"], feeds)[0]
    assert np.array_equal(a, b)


def test_ops_supported_by_tensorrt_and_shapes_static(exported):
    _, path = exported
    with open(TRT_OPS) as f:
        supported = {row["operator"] for row in csv.DictReader(f) if row["supported"] == "Y"}
    graph = onnx.load(path).graph
    ops = {node.op_type for node in graph.node}
    assert ops - supported == set(), f"ops TensorRT 10 cannot parse: {sorted(ops - supported)}"
    for value in list(graph.input) + list(graph.output):
        dims = value.type.tensor_type.shape.dim
        assert dims and all(d.HasField("dim_value") for d in dims), f"{value.name} has a dynamic shape"
    assert [i.name for i in graph.input] == INPUTS
