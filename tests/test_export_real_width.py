"""The real-scale export path (scripts/real_scale_export.sh) reduced to run in the suite: one DiT block
at the 1.3B model's real width (dim 1536, 12 heads of 128, ffn 8960, text_dim 4096, the
DiTConfig defaults), its weights large enough that the folding splits them off, the tiny VAE, latent
4 x 6, text_len 16, written by ``rf_runtime.testing.write_wan_random_dir`` in the layout of the
full-size rehearsal (bf16 ``generator.pt`` passed as the checkpoint).

Checked: `rf-export onnx --precision fp32,fp16` writes a bundle that the TensorRT view accepts
(``export.trt_view.check_bundle``: hashes, IO, every op and type in TensorRT 10's support matrix,
static shapes, strong typing), that `rf-export verify` passes against the PyTorch fp32 reference
(tolerances of export/verify.py: fp32 1e-4, fp16 1e-2 relative L2), that folding without the
weights (``fold_structure``) gives the graph folding with them gives, and that `rf-bench --estimate`
reads its fp16 K/V at half the fp32 bytes. The >2 GB file layout (torch's one file per tensor, rewritten
into one data file by ``save_streamed``) is checked at a small size by the last test.
"""

import os

import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from rf_runtime.models import DiTConfig, VAEConfig  # noqa: E402
from rf_runtime.testing import VAE, WAN_CHECKPOINT, write_wan_random_dir  # noqa: E402

MATRIX = os.path.join(os.path.dirname(__file__), "data", "tensorrt10_onnx_operators.csv")
REAL_WIDTH = DiTConfig(num_layers=1, text_len=16)  # dim 1536, heads 12, ffn 8960, text_dim 4096


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from rf_runtime.export.cli import main

    root = tmp_path_factory.mktemp("real_width")
    model = write_wan_random_dir(
        root / "model", dit_config=REAL_WIDTH, vae_config=VAEConfig(**VAE), resolution=(32, 48)
    )
    bundle = root / "bundle"
    args = ["onnx", "--model-dir", model, "--checkpoint", os.path.join(model, WAN_CHECKPOINT)]
    assert main([*args, "--out", str(bundle), "--precision", "fp32,fp16"]) == 0
    return model, str(bundle)


def test_the_tensorrt_view_accepts_the_bundle(exported):
    from rf_runtime.export.trt_view import check_bundle

    views = {v.name: v for v in check_bundle(exported[1], MATRIX)}
    assert len(views) == 10  # five graphs, fp32 and fp16
    assert {name: v.problems for name, v in views.items() if v.problems} == {}
    # the lowered step graph is stored folded: no shape arithmetic left for the parser
    assert not {"Shape", "If"} & set(views["dit_step@fp16"].ops)


def test_verify_passes_at_the_real_width(exported, capsys):
    from rf_runtime.export.cli import main

    model, bundle = exported
    checkpoint = os.path.join(model, WAN_CHECKPOINT)
    assert main(["verify", bundle, "--model-dir", model, "--checkpoint", checkpoint]) == 0
    table = capsys.readouterr().out
    assert table.count("PASS") == 10 and "FAIL" not in table


def test_folding_without_the_weights_gives_the_same_graph(exported):
    from polygraphy.backend.onnx import fold_constants as polygraphy_fold

    from rf_runtime.export.onnx_fold import MAX_FOLDED_BYTES, fold_structure

    model = onnx.load(os.path.join(exported[1], "dit_step.onnx"))
    light, weights = fold_structure(model)
    assert len(weights) > 10  # the block's projections are over the folding limit
    full = polygraphy_fold(model, fold_shapes=True, error_ok=False, size_threshold=MAX_FOLDED_BYTES)
    assert [n.op_type for n in light.graph.node] == [n.op_type for n in full.graph.node]
    assert [list(n.input) for n in light.graph.node] == [list(n.input) for n in full.graph.node]


def test_the_estimate_reads_the_fp16_cache_at_half_the_bytes(exported):
    from rf_runtime import memory

    bundle = memory.read_bundle(exported[1])
    fp32 = memory.estimate(bundle, "tensorrt", "fp32")
    fp16 = memory.estimate(bundle, "tensorrt", "fp16")
    for part in ("kv_cache", "new_kv", "text_kv"):
        assert fp16.parts[part] * 2 == fp32.parts[part], part
    # 1 layer x 6 context frames x 6 tokens x 1536 x 4 bytes, K and V, two copies
    assert fp32.parts["kv_cache"] == 2 * 2 * 1 * 6 * 6 * 1536 * 4
    # the matmul weights are stored in fp16; the timestep MLP (14 M parameters at this width) stays fp32
    assert fp16.parts["weights"] < 0.65 * fp32.parts["weights"]


def test_a_graph_in_one_file_per_tensor_is_rewritten_with_one_data_file(tmp_path):
    """What torch's exporter writes for a graph over 2 GB (one file per tensor), rewritten by
    ``save_streamed`` byte for byte into ``<graph>.data``: the 1.3B step graph's path, at a small size."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper
    from onnx.external_data_helper import ExternalDataInfo

    from rf_runtime.export.onnx_files import ALIGNMENT, save_streamed
    from rf_runtime.onnx_external import external_refs

    rng = np.random.default_rng(0)
    w = [rng.standard_normal((64, 64)).astype(np.float32) for _ in range(3)]
    bias = rng.standard_normal(64).astype(np.float32)  # 256 bytes: stays in the graph
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["a"]),
        helper.make_node("MatMul", ["a", "w1"], ["b"]),
        helper.make_node("MatMul", ["b", "w2"], ["c"]),
        helper.make_node("Add", ["c", "bias"], ["y"]),
    ]
    inits = [numpy_helper.from_array(v, f"w{i}") for i, v in enumerate(w)] + [
        numpy_helper.from_array(bias, "bias")
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    src = tmp_path / "raw"
    src.mkdir()
    onnx.save(
        model,
        str(src / "g.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=False,
        size_threshold=1024,
    )
    assert len(os.listdir(src)) == 4  # the graph and one file per weight
    out = tmp_path / "out"
    out.mkdir()
    assert save_streamed(str(src / "g.onnx"), str(out / "g.onnx")) == ["g.onnx.data"]
    assert sorted(os.listdir(out)) == ["g.onnx", "g.onnx.data"]
    refs = external_refs(str(out / "g.onnx"))
    assert sorted(r.tensor for r in refs) == ["w0", "w1", "w2"] and all(
        r.locations == ["g.onnx.data"] for r in refs
    )
    data = (out / "g.onnx.data").read_bytes()
    for t in onnx.load(str(out / "g.onnx"), load_external_data=False).graph.initializer:
        if t.name == "bias":
            assert t.HasField("raw_data")
            continue
        info = ExternalDataInfo(t)
        assert info.offset % ALIGNMENT == 0
        assert data[info.offset : info.offset + info.length] == w[int(t.name[1])].tobytes()
    x = rng.standard_normal((1, 64)).astype(np.float32)
    expect = ((x @ w[0]) @ w[1]) @ w[2] + bias
    got = ort.InferenceSession(str(out / "g.onnx")).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, expect, rtol=1e-5, atol=1e-4)


def test_the_tensorrt_view_finds_what_the_parser_refuses():
    from onnx import TensorProto, helper

    from rf_runtime.export.trt_view import op_problems, read_matrix

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 4])  # a dynamic batch
    y = helper.make_tensor_value_info("y", TensorProto.DOUBLE, ["n"])
    nodes = [
        helper.make_node("Cast", ["x"], ["d"], to=TensorProto.DOUBLE),
        helper.make_node("Det", ["d"], ["y"]),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)]
    )
    problems = op_problems(model, read_matrix(MATRIX))
    assert any("x has a dynamic shape" in p for p in problems)
    assert any("Cast" in p and "type 11" in p for p in problems)  # DOUBLE is no TensorRT type
    assert any("Det is not supported" in p for p in problems)
