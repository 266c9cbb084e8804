"""Constant folding (export/onnx_fold.py, through Polygraphy): the folded graphs compute what the raw
exported graphs compute (bit for bit through onnxruntime), with no shape arithmetic, subgraph or
untyped value left, every output computed by a node; the same result through Polygraphy's path for
models over 2 GB (shape inference from a file), and a clear error for an ``If`` on data."""

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx_graphsurgeon")

from onnx import TensorProto, helper  # noqa: E402

from rf_runtime.export.onnx_fold import fold_constants  # noqa: E402
from rf_runtime.errors import ConfigError  # noqa: E402

GRAPHS = ("dit_step", "cache_update", "text_kv", "vae_decode_first", "vae_decode")


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """The fp32 graphs of a tiny bundle: the exporter's own output (folding runs only when lowering)."""
    from rf_runtime.export.bundle_builder import build_bundle
    from rf_runtime.testing import write_model_dir

    root = tmp_path_factory.mktemp("fold")
    write_model_dir(root / "model", seed=4)
    build_bundle(root / "model", root / "bundle")
    return {g: root / "bundle" / f"{g}.onnx" for g in GRAPHS}


def run(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, feeds
    )


def random_feeds(model, seed=0):
    rng = np.random.default_rng(seed)
    return {
        v.name: rng.standard_normal([d.dim_value for d in v.type.tensor_type.shape.dim]).astype(
            helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
        )
        for v in model.graph.input
    }


def check_folded(raw_model, folded):
    g = folded.graph
    ops = {n.op_type for n in g.node}
    assert not ops & {"Shape", "If", "ConstantOfShape", "Constant"}, ops  # all shape work folded
    typed = {v.name for v in (*g.value_info, *g.input, *g.output)}
    assert all(o in typed for n in g.node for o in n.output if o)
    produced = {o for n in g.node for o in n.output}
    assert all(o.name in produced for o in g.output)
    assert [o.name for o in g.output] == [o.name for o in raw_model.graph.output]
    assert [i.name for i in g.input] == [i.name for i in raw_model.graph.input]
    feeds = random_feeds(raw_model)
    for a, b in zip(run(raw_model, feeds), run(folded, feeds)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("graph", GRAPHS)
def test_folded_graphs_compute_the_same(raw, graph):
    model = onnx.load(raw[graph])
    folded = fold_constants(model)
    assert len(folded.graph.node) < len(model.graph.node)
    check_folded(onnx.load(raw[graph]), folded)
    assert len(model.graph.node) == len(onnx.load(raw[graph]).graph.node)  # the input is left as it was


def test_the_large_model_path_gives_the_same_graph(raw, monkeypatch):
    """Polygraphy runs shape inference from a file for a model over the protobuf limit: lowered to 1 KiB here."""
    import polygraphy.backend.onnx.loader as loader

    in_memory = fold_constants(onnx.load(raw["vae_decode_first"]))
    monkeypatch.setattr(loader, "PROTOBUF_THRESHOLD", 1024)
    from_file = fold_constants(onnx.load(raw["vae_decode_first"]))
    assert [n.op_type for n in from_file.graph.node] == [n.op_type for n in in_memory.graph.node]
    check_folded(onnx.load(raw["vae_decode_first"]), from_file)


def test_an_if_on_data_is_refused():
    then = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["t"])],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])],
    )
    other = helper.make_graph(
        [helper.make_node("Neg", ["x"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])],
    )
    nodes = [
        helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
        helper.make_node("Greater", ["s", "zero"], ["c"]),
        helper.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
        [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ConfigError, match="still has a subgraph.*depends on data"):
        fold_constants(model)
