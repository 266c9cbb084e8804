"""Strongly typed fp16 / bf16 variants of the bundle graphs (export/precision.py) and `rf-export verify`.

Numbers: each low-precision graph against the PyTorch fp32 reference on the tiny config, relative
error ||got - ref|| / ||ref|| below FP16_TOL (fp16 through onnxruntime CPU) or BF16_TOL (bf16 through
onnx's numpy reference evaluator, since onnxruntime's CPU provider has no bf16 kernels). Structure:
every value typed, no node mixing float types, every op and tensor type in TensorRT 10's ONNX
support matrix (tests/data/tensorrt10_onnx_operators.csv), static shapes.
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
ml_dtypes = pytest.importorskip("ml_dtypes")

from onnx import TensorProto, helper  # noqa: E402

from rf_runtime.export.bundle_builder import build_bundle  # noqa: E402
from rf_runtime.export.dit_graph import OUTPUTS, example_inputs  # noqa: E402
from rf_runtime.export.precision import check_strongly_typed  # noqa: E402
from rf_runtime.models import CausalDiT, VAEConfig, WanVAE  # noqa: E402
from rf_runtime.sampler import renoise, x0_from_flow  # noqa: E402
from rf_runtime.testing import VAE, write_model_dir  # noqa: E402

FP16_TOL, BF16_TOL = 1e-2, 5e-2
TRT_OPS = os.path.join(os.path.dirname(__file__), "data", "tensorrt10_onnx_operators.csv")
LOW = {"fp16": (TensorProto.FLOAT16, np.float16), "bf16": (TensorProto.BFLOAT16, ml_dtypes.bfloat16)}
GRAPHS = ("dit_step", "cache_update", "text_kv", "vae_decode_first", "vae_decode")
# float32 at the graph boundary: the small tensors whose arithmetic is float32 (everything else is low)
FP32_IO = {
    "dit_step": {
        "x",
        "eps",
        "t_freq",
        "sigma",
        "sigma_next",
        "key_mask",
        "cos_ctx",
        "sin_ctx",
        "cos_q",
        "sin_q",
        "x0",
        "x_next",
    },
    "cache_update": {"mix"},
    "text_kv": {"text_embeds"},
    "vae_decode_first": {"z", "frames"},
    "vae_decode": {"z", "frames"},
}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("precision")
    write_model_dir(root / "model", seed=7, stream={"ema_alpha": 0.9})
    build_bundle(root / "model", root / "bundle", precisions=("fp32", "fp16", "bf16"))
    return root / "model", root / "bundle"


@pytest.fixture(scope="module")
def models(dirs):
    from safetensors.torch import load_file

    dit = CausalDiT.from_pretrained(dirs[0]).eval()
    vae = WanVAE.from_state_dict(load_file(dirs[0] / "vae.safetensors"), VAEConfig(**VAE)).eval()
    return dit, vae


def rel(a, b):
    return float(np.linalg.norm(np.asarray(a, np.float32) - b) / np.linalg.norm(b))


def run(path, feeds, precision):
    """Run a graph with its low-precision inputs rounded; onnxruntime for fp16, onnx.reference for bf16."""
    model = onnx.load(path)
    dtype = LOW[precision][1]
    typed = {
        v.name: feeds[v.name].astype(dtype)
        if v.type.tensor_type.elem_type == LOW[precision][0]
        else feeds[v.name]
        for v in model.graph.input
    }
    if precision == "fp16":
        return ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, typed)
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model).run(None, typed)


def rounded(feeds, path, precision):
    """The fp32 values the low-precision graph actually sees (its low inputs rounded)."""
    model = onnx.load(path)
    low = {v.name for v in model.graph.input if v.type.tensor_type.elem_type == LOW[precision][0]}
    return {k: v.astype(LOW[precision][1]).astype(np.float32) if k in low else v for k, v in feeds.items()}


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_dit_step_matches_fp32_reference(dirs, models, precision):
    dit = models[0]
    path = str(dirs[1] / f"dit_step.{precision}.onnx")
    tol = FP16_TOL if precision == "fp16" else BF16_TOL
    for valid in (0, 6):  # chunk 0 and the steady state
        feeds = rounded(example_inputs(dit, (4, 6), 6, 3, valid_frames=valid, seed=valid), path, precision)
        got = dict(zip(OUTPUTS, run(path, feeds, precision)))
        T = lambda n: torch.from_numpy(feeds[n])  # noqa: E731
        with torch.no_grad():
            flow, k, v = dit.forward_chunk(
                T("x"), torch.full((1, 3), 937.5), T("text_k"), T("text_v"), T("ctx_k"), T("ctx_v"), valid
            )
        x0 = x0_from_flow(T("x"), flow, 0.9375)
        expect = {"x0": x0, "x_next": renoise(x0, T("eps"), 0.8333), "new_k": k, "new_v": v}
        for name in OUTPUTS:
            assert rel(got[name], expect[name].numpy()) < tol, (precision, valid, name)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_text_kv_and_cache_update_match_reference(dirs, models, precision):
    from rf_runtime.cache import CacheSpec, commit_chunk, commit_matrix

    dit = models[0]
    tol = FP16_TOL if precision == "fp16" else BF16_TOL
    rng = np.random.default_rng(1)
    path = str(dirs[1] / f"text_kv.{precision}.onnx")
    embeds = rng.standard_normal((1, 8, 16), dtype=np.float32)
    k, v = run(path, {"text_embeds": embeds}, precision)
    with torch.no_grad():
        rk, rv = dit.text_kv(torch.from_numpy(embeds))
    assert rel(k, rk.numpy()) < tol and rel(v, rv.numpy()) < tol

    path = str(dirs[1] / f"cache_update.{precision}.onnx")
    spec, tpf = CacheSpec(ema_alpha=0.9), 6
    shape = lambda frames: (2, 1, frames * tpf, 2, 16)  # noqa: E731
    feeds = {
        "ctx_k": rng.standard_normal(shape(6), dtype=np.float32),
        "ctx_v": rng.standard_normal(shape(6), dtype=np.float32),
        "new_k": rng.standard_normal(shape(3), dtype=np.float32),
        "new_v": rng.standard_normal(shape(3), dtype=np.float32),
        "mix": commit_matrix(spec, 4).astype(np.float32),
    }  # window full: write, evict and fold
    feeds = rounded(feeds, path, precision)
    got_k, got_v = run(path, feeds, precision)
    for got, ctx, new in ((got_k, "ctx_k", "new_k"), (got_v, "ctx_v", "new_v")):
        ref = feeds[ctx].copy()
        commit_chunk(spec, 4, ref, feeds[new], tpf)
        assert rel(got, ref) < tol


def test_vae_decoder_fp16_matches_full_decode(dirs, models):
    vae = models[1]
    torch.manual_seed(0)
    z = torch.randn(1, 16, 4, 4, 6)
    with torch.no_grad():
        expect = vae.decode(z).numpy()
    first, step = str(dirs[1] / "vae_decode_first.fp16.onnx"), str(dirs[1] / "vae_decode.fp16.onnx")
    s_first = ort.InferenceSession(first, providers=["CPUExecutionProvider"])
    s_step = ort.InferenceSession(step, providers=["CPUExecutionProvider"])
    names = [i.name for i in s_step.get_inputs()][1:]
    zn = z.numpy()
    frames, *cache = s_first.run(None, {"z": zn[:, :, :1]})
    parts = [frames]
    for i in range(1, 4):  # the fp16 cache is carried from call to call, as the runtime does
        frames, *cache = s_step.run(None, {"z": zn[:, :, i : i + 1], **dict(zip(names, cache))})
        parts.append(frames)
    assert all(c.dtype == np.float16 for c in cache)
    assert rel(np.concatenate(parts, axis=2), expect) < FP16_TOL


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_zero_slots_left_unfolded_are_lowered_too(dirs, models, tmp_path, monkeypatch, precision):
    """At full size the first frame's zero cache slots are over the folding limit and stay
    ConstantOfShape nodes (export/vae_graph.py); lowered, each value has its output's type. Made so
    here by lowering the limit: the graph is strongly typed and computes what the stored one does."""
    import rf_runtime.export.onnx_fold as onnx_fold
    import rf_runtime.export.precision as precision_module

    monkeypatch.setattr(onnx_fold, "MAX_FOLDED_BYTES", 512)
    policy = precision_module.graph_policies(*models)["vae_decode_first"]
    out = str(tmp_path / f"vae_decode_first.{precision}.onnx")
    precision_module.lower_file(str(dirs[1] / "vae_decode_first.onnx"), out, precision, policy)
    model = onnx.load(out)
    fills = [n for n in model.graph.node if n.op_type == "ConstantOfShape"]
    _, types = tensor_types(model)  # each fill makes its value's type, the one its scope computes in
    assert len(fills) >= 10 and all(n.attribute[0].t.data_type == types[n.output[0]] for n in fills)
    assert check_strongly_typed(model) == []
    z = np.random.default_rng(3).standard_normal((1, 16, 1, 4, 6)).astype(np.float32)
    got = run(out, {"z": z}, precision)
    want = run(str(dirs[1] / f"vae_decode_first.{precision}.onnx"), {"z": z}, precision)
    assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))


def tensor_types(model):
    g = onnx.shape_inference.infer_shapes(model, strict_mode=True).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*g.value_info, *g.input, *g.output)}
    types.update({t.name: t.data_type for t in g.initializer})
    return g, types


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("name", GRAPHS)
def test_low_precision_graph_is_strongly_typed(dirs, name, precision):
    model = onnx.load(str(dirs[1] / f"{name}.{precision}.onnx"))
    assert check_strongly_typed(model) == []
    g, types = tensor_types(model)
    low = LOW[precision][0]
    for v in (*g.input, *g.output):
        want = TensorProto.FLOAT if v.name in FP32_IO[name] else low
        assert v.type.tensor_type.elem_type == want, (v.name, v.type.tensor_type.elem_type)
    for node in g.node:
        assert all(types.get(o) for o in node.output), node.name  # every value has an element type
        # normalization statistics and softmax in float32, through explicit Casts
        if node.op_type in ("Softmax", "LayerNormalization", "ReduceMean", "ReduceL2", "Sqrt"):
            assert types[node.input[0]] == TensorProto.FLOAT, node.name
        if node.op_type != "Cast" and node.name.startswith(
            ("/time_embedding/", "/time_projection/", "/sampler_update/")
        ):
            assert all(types[o] == TensorProto.FLOAT for o in node.output), node.name
    if name == "cache_update":  # the EMA fold: computed in float32
        assert all(types[n.output[0]] == TensorProto.FLOAT for n in g.node if n.op_type == "Einsum")
    n_low = sum(types[n.output[0]] == low for n in g.node if n.op_type in ("MatMul", "Conv"))
    if name in ("dit_step", "text_kv"):  # the matmuls do run in the low precision
        assert n_low > 0


def test_strong_typing_check_finds_mixed_inputs():
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT16, [2])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT16, [2])
    graph = helper.make_graph([helper.make_node("Add", ["a", "b"], ["y"], name="mixed")], "g", [a, b], [y])
    problems = check_strongly_typed(helper.make_model(graph))
    assert len(problems) == 1 and "mixed" in problems[0] and "fp16" in problems[0] and "fp32" in problems[0]


def assert_ops_supported(model, label):
    """Every op is marked Y with a listed type for each tensor it reads or writes; static I/O shapes
    (``export.trt_view.op_problems``, the check scripts/real_scale_export.sh runs on full-size bundles)."""
    from rf_runtime.export.trt_view import op_problems, read_matrix

    assert op_problems(model, read_matrix(TRT_OPS)) == [], label


def test_every_op_and_type_is_supported_by_tensorrt(dirs):
    """Every graph of the bundle: fp32, fp16 and bf16."""
    files = sorted(p for p in os.listdir(dirs[1]) if p.endswith(".onnx"))
    assert len(files) == 15
    for file in files:
        assert_ops_supported(onnx.load(str(dirs[1] / file)), file)


# ---- rf-export verify ------------------------------------------------------------------------


def test_verify_passes_on_a_tiny_bundle(dirs, capsys):
    from rf_runtime.export.cli import main
    from rf_runtime.export.verify import verify_bundle

    rows = verify_bundle(dirs[1], dirs[0], backends=["onnxruntime-cpu"])
    assert len(rows) == 15
    by = {(r.graph, r.backend): r for r in rows}
    for name in GRAPHS:
        assert by[(name, "onnxruntime-cpu")].status == "PASS" and by[(name, "onnxruntime-cpu")].rel < 1e-4
        assert by[(f"{name}@fp16", "onnxruntime-cpu")].status == "PASS"
        assert by[(f"{name}@bf16", "onnxruntime-cpu")].status == "SKIP"  # no bf16 kernels on CPU
    # the bf16 VAE graphs (not covered above) through onnx's numpy evaluator, which runs bf16
    vae_bf16 = verify_bundle(
        dirs[1], dirs[0], backends=["onnx-reference"], graphs=["vae_decode_first@bf16", "vae_decode@bf16"]
    )
    assert [r.status for r in vae_bf16] == ["PASS", "PASS"] and all(r.rel < BF16_TOL for r in vae_bf16)
    assert main(["verify", str(dirs[1]), "--model-dir", str(dirs[0]), "--backends", "onnxruntime-cpu"]) == 0
    out = capsys.readouterr().out
    assert "dit_step@fp16" in out and "PASS" in out and "FAIL" not in out


def test_verify_detects_a_graph_from_other_weights(dirs, tmp_path, capsys):
    from rf_runtime.export.cli import main
    from rf_runtime.export.verify import verify_bundle
    from rf_runtime.bundle import write_manifest

    from rf_runtime.export.dit_graph import export_dit_step
    from rf_runtime.testing import tiny_dit

    bundle = tmp_path / "bundle"
    shutil.copytree(dirs[1], bundle)
    other = tiny_dit(seed=8)  # the same tiny config, other random weights
    export_dit_step(other, str(bundle / "dit_step.onnx"), example_inputs(other, (4, 6), 6, 3, valid_frames=6))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.pop("schema_version")
    write_manifest(str(bundle), manifest)  # a consistent bundle whose dit_step came from other weights

    rows = verify_bundle(bundle, dirs[0], backends=["onnxruntime-cpu"], graphs=["dit_step", "text_kv"])
    status = {r.graph: r.status for r in rows}
    assert status == {"dit_step": "FAIL", "text_kv": "PASS"}
    assert main(["verify", str(bundle), "--model-dir", str(dirs[0]), "--backends", "onnxruntime-cpu"]) == 1
    captured = capsys.readouterr()
    assert "FAIL" in captured.out and "FAILED" in captured.err


def test_verify_refuses_bad_input(dirs, tmp_path, capsys):
    from rf_runtime.export.cli import main
    from rf_runtime.bundle import write_manifest

    assert main(["verify", str(tmp_path), "--model-dir", str(dirs[0])]) == 2
    assert "not an engine bundle" in capsys.readouterr().err
    bundle = tmp_path / "bundle"  # a bundle of a 3-layer model checked against the 2-layer model directory
    shutil.copytree(dirs[1], bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.pop("schema_version")
    manifest["model"]["dit"]["num_layers"] = 3
    write_manifest(str(bundle), manifest)
    assert main(["verify", str(bundle), "--model-dir", str(dirs[0])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another model" in err and "--model-dir" in err
    with pytest.raises(SystemExit) as e:
        main(["verify", str(dirs[1]), "--model-dir", str(dirs[0]), "--backends", "cuda-magic"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        main(["onnx", "--model-dir", str(dirs[0]), "--out", str(tmp_path / "b"), "--precision", "fp8"])
    assert e.value.code == 2
    assert "fp32, fp16, bf16" in capsys.readouterr().err


def test_graphs_over_the_protobuf_limit_go_to_external_data(dirs, models, tmp_path, monkeypatch):
    """The 1.3B DiT is > 2 GB even in fp16: the lowering then writes one external-data file and checks
    the graph from its file. Exercised here by lowering the limit to 1 KiB."""
    import rf_runtime.export.onnx_files as onnx_files
    import rf_runtime.export.precision as precision

    monkeypatch.setattr(onnx_files, "PROTOBUF_LIMIT", 1024)
    policy = precision.graph_policies(*models)["text_kv"]
    data = precision.lower_file(
        str(dirs[1] / "text_kv.onnx"), str(tmp_path / "text_kv.fp16.onnx"), "fp16", policy
    )
    assert data == ["text_kv.fp16.onnx.data"] and (tmp_path / data[0]).stat().st_size > 1024
    size = (tmp_path / data[0]).stat().st_size
    precision.lower_file(str(dirs[1] / "text_kv.onnx"), str(tmp_path / "text_kv.fp16.onnx"), "fp16", policy)
    assert (tmp_path / data[0]).stat().st_size == size  # written again, not appended to
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text_kv.fp16.onnx", "text_kv.fp16.onnx.data"]
    assert (tmp_path / "text_kv.fp16.onnx").stat().st_size < (tmp_path / data[0]).stat().st_size
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes["text_kv.fp16.onnx.data"] == modes["text_kv.fp16.onnx"]  # onnx alone makes it 0600
    assert precision.check_strongly_typed(str(tmp_path / "text_kv.fp16.onnx")) == []
    embeds = np.random.default_rng(2).standard_normal((1, 8, 16), dtype=np.float32)
    got = run(str(tmp_path / "text_kv.fp16.onnx"), {"text_embeds": embeds}, "fp16")
    expect = run(str(dirs[1] / "text_kv.fp16.onnx"), {"text_embeds": embeds}, "fp16")
    assert all(np.array_equal(a, b) for a, b in zip(got, expect))


def test_manifest_graph_entries(dirs):
    """Schema 2: every graph variant has a ``graphs`` entry whose IO is the .onnx's own (checked by
    Bundle.load) and whose precision is its ``@`` suffix; every file is hashed."""
    import hashlib

    from rf_runtime.bundle import Bundle

    bundle = Bundle.load(dirs[1])  # validates hashes, sizes and each graph's IO against its file
    m = bundle.manifest
    bases = ("dit_step", "text_kv", "cache_update", "vae_decode_first", "vae_decode")
    assert set(m["graphs"]) == {f"{b}{s}" for b in bases for s in ("", "@fp16", "@bf16")}
    entry = m["graphs"]["dit_step@fp16"]
    assert entry["precision"] == "fp16" and m["files"][entry["file"]]["path"] == "dit_step.fp16.onnx"
    assert "external_data" not in entry  # the tiny graphs are far under 2 GB
    dtypes = {i["name"]: i["dtype"] for i in entry["inputs"] + entry["outputs"]}
    assert dtypes["ctx_k"] == dtypes["new_k"] == "float16" and dtypes["x"] == dtypes["x0"] == "float32"
    shapes = {i["name"]: i["shape"] for i in entry["inputs"]}
    assert shapes["x"] == [1, 3, 16, 4, 6] and shapes["ctx_k"] == [2, 1, 36, 2, 16]
    assert m["graphs"]["vae_decode@bf16"]["inputs"][1]["dtype"] == "bfloat16"
    assert m["graphs"]["vae_decode"]["precision"] == "fp32"
    on_disk = {p.name for p in dirs[1].iterdir()} - {"manifest.json"}
    assert {f["path"] for f in m["files"].values()} == on_disk
    for f in m["files"].values():
        data = (dirs[1] / f["path"]).read_bytes()
        assert f["bytes"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
