"""Fault suite, bundles: a bundle is a closed world, every manifest key is typed, the exporter never destroys.

Each case asserts the error type (or exit status 2 and one line), that the message names the problem,
and (``sandbox``) that nothing outside the test's folder was read or written.
"""

import json
import os
import shutil

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from fault_tools import assert_one_line_error, run_cli, tmpfs  # noqa: E402
from onnx import external_data_helper  # noqa: E402

from rf_runtime import Streamer  # noqa: E402
from rf_runtime.bundle import Bundle, BundleError, write_manifest  # noqa: E402
from rf_runtime.onnx_external import external_refs  # noqa: E402


@pytest.fixture
def bundle(engine_dirs, sandbox):
    """A private copy of the session's tiny bundle inside the test's folder."""
    return shutil.copytree(engine_dirs[1], sandbox.work / "bundle")


def manifest(b):
    return json.loads((b / "manifest.json").read_text())


def rewrite(b, m):
    (b / "manifest.json").write_text(json.dumps(m))


def externalize(b, graph="dit_step", data="dit_step.onnx.data", location=None, list_it=True):
    """Move a graph's weights to an external-data file (as a > 2 GB export does), then point every
    tensor at ``location`` (default: the data file) and rehash the manifest, as an attacker would."""
    path = b / f"{graph}.onnx"
    model = onnx.load(str(path))
    external_data_helper.convert_model_to_external_data(
        model, all_tensors_to_one_file=True, location=data, size_threshold=0
    )
    onnx.save(model, str(path))
    if location is not None:
        model = onnx.load(str(path), load_external_data=False)
        for t in external_data_helper._get_all_tensors(model):
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = location
        onnx.save(model, str(path))
    m = manifest(b)
    if list_it:
        m["files"][f"{graph}_data"] = {"path": data}
        m["graphs"][graph]["external_data"] = [f"{graph}_data"]
    write_manifest(str(b), m)
    return path


# ---- 1. a closed world -------------------------------------------------------------------------


def test_external_data_outside_the_bundle_is_refused_before_onnxruntime(bundle, sandbox):
    rel = os.path.relpath(sandbox.fifo, bundle)
    externalize(bundle, location=rel)
    with pytest.raises(
        BundleError, match=r"graph 'dit_step'.*reads its data from .*weights.fifo.*outside the bundle"
    ):
        Streamer.from_engine(bundle)  # the sandbox checks that onnxruntime never opened the FIFO


def test_an_absolute_external_data_location_is_refused(bundle, sandbox):
    externalize(bundle, location=str(sandbox.secret))
    with pytest.raises(BundleError, match=r"secret.bin'?, a file outside the bundle"):
        Streamer.from_engine(bundle)


def test_external_data_inside_but_not_listed_is_refused(bundle):
    externalize(
        bundle, list_it=False
    )  # the data file sits in the bundle, unhashed: it could be altered unnoticed
    with pytest.raises(
        BundleError, match=r"dit_step.onnx.data'?, a file the manifest does not list as external data"
    ):
        Bundle.load(bundle)


def test_external_data_listed_for_another_graph_is_refused(bundle):
    externalize(bundle)
    m = manifest(bundle)
    m["graphs"]["dit_step"]["external_data"] = []
    m["graphs"]["text_kv"]["external_data"] = ["dit_step_data"]
    rewrite(bundle, m)
    with pytest.raises(BundleError, match="graph 'dit_step'.*does not list as external data of 'dit_step'"):
        Bundle.load(bundle)


def test_listed_external_data_loads_and_gives_the_same_frames(bundle, engine_dirs):
    """The positive control: weights moved to a listed, hashed data file stream exactly as before."""
    want = list(Streamer.from_engine(engine_dirs[1]).stream("a red circle", seed=3, num_frames=21))
    externalize(bundle)
    assert [r.locations for r in external_refs(bundle / "dit_step.onnx")][0] == ["dit_step.onnx.data"]
    got = list(Streamer.from_engine(bundle).stream("a red circle", seed=3, num_frames=21))
    assert all(np.array_equal(a, b) for a, b in zip(want, got)) and len(got) == len(want)


def test_altered_external_data_is_refused(bundle):
    externalize(bundle)
    data = bundle / "dit_step.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[100:104] = b"\x00\x00\xc0\x7f"  # a NaN where a weight was: same size, other bytes
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=r"dit_step.onnx.data \(dit_step_data\) does not match its sha256"):
        Bundle.load(bundle)


def test_a_listed_file_that_links_outside_is_refused(bundle, sandbox):
    externalize(bundle)
    data = bundle / "dit_step.onnx.data"
    shutil.copy(data, sandbox.work / "copy.data")
    os.remove(data)
    os.symlink(sandbox.work / "copy.data", data)  # same bytes, same hash: but not inside the bundle
    with pytest.raises(BundleError, match="dit_step_data.*not inside the bundle"):
        Bundle.load(bundle)


def test_two_locations_for_one_tensor_are_refused(bundle):
    path = externalize(bundle)
    model = onnx.load(str(path), load_external_data=False)
    t = next(iter(external_data_helper._get_all_tensors(model)))
    extra = t.external_data.add()
    extra.key, extra.value = "location", "../../outside/secret.bin"
    onnx.save(model, str(path))
    write_manifest(str(bundle), manifest(bundle))
    with pytest.raises(BundleError, match="2 external-data locations"):
        Bundle.load(bundle)


def test_a_graph_onnxruntime_cannot_load_is_a_bundle_error_naming_it(bundle):
    model = onnx.load(str(bundle / "cache_update.onnx"))
    model.graph.node[0].op_type = "NoSuchOperator"  # well-formed protobuf, same IO, not a runnable graph
    onnx.save(model, str(bundle / "cache_update.onnx"))
    write_manifest(str(bundle), manifest(bundle))
    with pytest.raises(
        BundleError, match=r"graph 'cache_update' of bundle .* cannot be loaded .*rf-export onnx"
    ):
        Streamer.from_engine(bundle)


def test_a_graph_that_is_not_protobuf_is_refused(bundle):
    (bundle / "cache_update.onnx").write_bytes(b"\xff" * 64)
    write_manifest(str(bundle), manifest(bundle))
    with pytest.raises(BundleError, match="cache_update"):
        Bundle.load(bundle)


def test_the_walker_reads_what_onnx_reads(tmp_path):
    """Field numbers against onnx's own descriptors, and the references found against onnx's own walk,
    on a model with external data in an initializer, a Constant node's attribute and an If subgraph."""
    from onnx import TensorProto, helper, numpy_helper
    from onnx import onnx_ml_pb2 as pb

    from rf_runtime import onnx_external as ox

    fields = [
        ("model", pb.ModelProto, {"graph": 7, "training_info": 20, "functions": 25}),
        ("graph", pb.GraphProto, {"node": 1, "initializer": 5, "sparse_initializer": 15}),
        ("node", pb.NodeProto, {"attribute": 5}),
        ("function", pb.FunctionProto, {"node": 7}),
        (
            "attribute",
            pb.AttributeProto,
            {"t": 5, "g": 6, "tensors": 10, "graphs": 11, "sparse_tensor": 22, "sparse_tensors": 23},
        ),
        ("sparse", pb.SparseTensorProto, {"values": 1, "indices": 2}),
        ("training", pb.TrainingInfoProto, {"initialization": 1, "algorithm": 2}),
    ]
    for kind, proto, names in fields:
        for name, number in names.items():
            assert proto.DESCRIPTOR.fields_by_name[name].number == number
            assert number in ox._CHILDREN[kind]
    assert pb.TensorProto.DESCRIPTOR.fields_by_name["external_data"].number == 13
    w = numpy_helper.from_array(np.arange(600, dtype=np.float32).reshape(20, 30), "w")
    const = helper.make_node(
        "Constant", [], ["c"], value=numpy_helper.from_array(np.ones((20, 30), np.float32), "cv")
    )
    then = helper.make_graph(
        [
            helper.make_node(
                "Constant", [], ["t"], value=numpy_helper.from_array(np.full((20, 30), 2.0, np.float32), "tv")
            )
        ],
        "then",
        [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [20, 30])],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["c"], ["e"])],
        "else",
        [],
        [helper.make_tensor_value_info("e", TensorProto.FLOAT, [20, 30])],
    )
    nodes = [
        const,
        helper.make_node("Add", ["x", "w"], ["s"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other),
        helper.make_node("Add", ["s", "y"], ["out"]),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [20, 30]),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [20, 30])],
        [w],
    )
    model = helper.make_model(g)
    external_data_helper.convert_model_to_external_data(
        model, all_tensors_to_one_file=True, location="m.data", size_threshold=0, convert_attribute=True
    )
    onnx.save(model, str(tmp_path / "m.onnx"))
    theirs = sorted(
        (t.name, tuple((e.key, e.value) for e in t.external_data))
        for t in external_data_helper._get_all_tensors(
            onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
        )
        if t.external_data
    )
    mine = sorted((r.tensor, r.entries) for r in external_refs(tmp_path / "m.onnx"))
    assert mine == theirs and {n for n, _ in mine} == {"w", "cv", "tv"}


# ---- 4. every manifest key typed ------------------------------------------------------------------


def _drop(path):
    def edit(m):
        node = m
        for k in path[:-1]:
            node = node[k]
        del node[path[-1]]

    return edit


def _set(path, value):
    def edit(m):
        node = m
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value

    return edit


MANIFEST_FAULTS = [
    ("missing model.latent_hw", _drop(["model", "latent_hw"]), r"'model.latent_hw' is required"),
    (
        "unknown key under stream",
        _set(["stream", "bogus"], 1),
        r"unknown key 'stream.bogus'.*valid keys under stream",
    ),
    ("files as a list", _set(["files"], ["a.onnx"]), r"key 'files' must be a mapping"),
    (
        "bytes as a string",
        _set(["files", "dit_step", "bytes"], "2626017"),
        r"'files.dit_step.bytes' must be an integer",
    ),
    (
        "a shape of strings",
        _set(["graphs", "dit_step", "inputs", 0, "shape"], ["a"]),
        r"'graphs.dit_step.inputs\[0\].shape\[0\]' must be an integer",
    ),
    ("fps as a bool", _set(["model", "fps"], True), r"'model.fps' must be an integer, got True"),
    ("a DiT size missing", _drop(["model", "dit", "num_heads"]), r"'model.dit.num_heads' is required"),
    (
        "resolution of one number",
        _set(["model_card", "resolution"], [64]),
        r"'model_card.resolution' must be a list of 2",
    ),
    (
        "chunk_frames as text",
        _set(["model_card", "chunk_frames"], "3"),
        r"'model_card.chunk_frames' must be an integer",
    ),
    ("ema_alpha as text", _set(["stream", "ema_alpha"], "high"), r"'stream.ema_alpha' must be a number"),
    (
        "timesteps not a list",
        _set(["stream", "timesteps"], 1000),
        r"'stream.timesteps' must be a list of numbers",
    ),
    (
        "a plan without a file",
        _set(["plans"], {"dit_step": {"tensorrt_version": "10", "compute_capability": "9.0"}}),
        r"'plans.dit_step.file' is required",
    ),
    ("an unknown top-level key", _set(["extra"], {}), r"unknown key 'extra'"),
    ("text_encoder as a list", _set(["text_encoder"], []), r"'text_encoder' must be a mapping"),
    (
        "external_data as a string",
        _set(["graphs", "dit_step", "external_data"], "x.data"),
        r"'graphs.dit_step.external_data' must be a list of strings",
    ),
    (
        "vae_cache_shapes flat",
        _set(["model", "vae_cache_shapes"], [1, 2]),
        r"'model.vae_cache_shapes\[0\]' must be a list",
    ),
    (
        "a card path of the build machine",
        _set(["model_card", "source"], os.path.abspath("model")),
        r"absolute path",
    ),
    ("schema_version as text", _set(["schema_version"], "2"), r"schema_version '2' is not supported"),
]


@pytest.mark.parametrize("what, edit, match", MANIFEST_FAULTS, ids=[f[0] for f in MANIFEST_FAULTS])
def test_every_manifest_key_is_typed(bundle, what, edit, match):
    m = manifest(bundle)
    edit(m)
    rewrite(bundle, m)
    with pytest.raises(BundleError, match=match) as info:
        Bundle.load(bundle)
    assert "rf-export" in str(info.value)  # and it says how to rebuild it


def test_a_bad_manifest_is_one_line_from_the_cli(bundle, capsys):
    from rf_runtime.cli import generate_main

    m = manifest(bundle)
    del m["model"]["latent_hw"]
    rewrite(bundle, m)
    code, _, err = run_cli(
        generate_main, ["--bundle", bundle, "--prompt", "a cat", "--out", "v.mp4", "--quiet"], capsys
    )
    assert_one_line_error(code, err, "rf-generate", "model.latent_hw", "required")
    assert not os.path.exists("v.mp4")


# ---- 2. the exporter never destroys ------------------------------------------------------------------


@pytest.fixture
def no_export_work(monkeypatch):
    """Fail the test if the export starts working (loading the model) before refusing."""
    from rf_runtime import model_dir

    def work(*a, **k):
        raise AssertionError("the export started before checking --out")

    monkeypatch.setattr(model_dir, "load", work)


def _export(capsys, model, out, *extra):
    from rf_runtime.export.cli import main

    return run_cli(
        main, ["onnx", "--model-dir", model, "--out", out, "--training-stage", "random", *extra], capsys
    )


def test_export_over_a_folder_of_user_files_is_refused(engine_dirs, sandbox, capsys, no_export_work):
    user = sandbox.work / "photos"
    user.mkdir()
    (user / "holiday.jpg").write_bytes(b"precious")
    code, _, err = _export(capsys, engine_dirs[0], user, "--force")  # not even --force deletes them
    assert_one_line_error(code, err, "rf-export", "photos", "is not an engine bundle", "never deleted")
    assert (user / "holiday.jpg").read_bytes() == b"precious" and os.listdir(user) == ["holiday.jpg"]


def test_export_over_a_file_is_refused(engine_dirs, sandbox, capsys, no_export_work):
    (sandbox.work / "notes.txt").write_text("mine")
    code, _, err = _export(capsys, engine_dirs[0], sandbox.work / "notes.txt")
    assert_one_line_error(code, err, "rf-export", "notes.txt", "a file")
    assert (sandbox.work / "notes.txt").read_text() == "mine"


def test_export_over_a_bundle_needs_force(bundle, engine_dirs, capsys, no_export_work):
    before = manifest(bundle)
    code, _, err = _export(capsys, engine_dirs[0], bundle)
    assert_one_line_error(code, err, "rf-export", "already holds an engine bundle", "--force")
    assert manifest(bundle) == before


def test_export_into_a_missing_folder_is_refused(engine_dirs, sandbox, capsys, no_export_work):
    code, _, err = _export(capsys, engine_dirs[0], sandbox.work / "no" / "such" / "bundle")
    assert_one_line_error(code, err, "rf-export", "does not exist")
    assert not (sandbox.work / "no").exists()


def test_export_onto_a_read_only_disk_is_refused_before_work(engine_dirs, sandbox, capsys, no_export_work):
    with tmpfs(sandbox.work / "ro", ro=True) as ro:
        code, _, err = _export(capsys, engine_dirs[0], ro / "bundle")
        assert_one_line_error(code, err, "rf-export", "read-only file system")
        assert os.listdir(ro) == []


def test_export_with_force_replaces_a_bundle_and_leaves_no_temporary(bundle, engine_dirs, capsys, sandbox):
    m = manifest(bundle)
    m["model_card"]["name"] = "old"
    rewrite(bundle, m)
    (bundle / "stale.txt").write_text("from the old bundle")
    code, out, err = _export(capsys, engine_dirs[0], bundle, "--force", "--name", "new")
    assert code == 0, err
    assert manifest(bundle)["model_card"]["name"] == "new" and not (bundle / "stale.txt").exists()
    assert Bundle.load(bundle).model_card.name == "new"
    assert sorted(os.listdir(sandbox.work)) == ["bundle"]  # no .bundle.tmp-* / .bundle.old-* left
