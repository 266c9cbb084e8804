"""Engine bundle manifest, schema_version 2: what build_bundle writes, and the refusal of bundles that
do not match (truncated or altered files, edited manifests, unknown schemas, graph IO that differs
from the .onnx, TensorRT plans for another GPU or TensorRT version), each naming the fix."""

import hashlib
import json
import logging
import os
import shutil
import sys

import pytest

ort = pytest.importorskip("onnxruntime")

from rf_runtime import Streamer  # noqa: E402
from rf_runtime.bundle import Bundle, BundleError, ModelCard, plan_problem  # noqa: E402
from rf_runtime.backends.select import choose_backend  # noqa: E402
from rf_runtime.graph_io import GRAPHS  # noqa: E402
from rf_runtime.runners import RunnerError  # noqa: E402
from rf_runtime.sampler import StreamSettings  # noqa: E402

ONNX_TYPES = {"tensor(float)": "float32"}


def copy_bundle(src, dst):
    shutil.copytree(src, dst)
    return dst


def read_manifest(b):
    return json.loads((b / "manifest.json").read_text())


def write_raw_manifest(b, manifest):
    (b / "manifest.json").write_text(json.dumps(manifest))


def test_manifest_is_schema_2(engine_dirs):
    model, bundle = engine_dirs
    m = read_manifest(bundle)
    assert m["schema_version"] == 2
    on_disk = sorted(f for f in os.listdir(bundle) if f != "manifest.json")
    assert sorted(e["path"] for e in m["files"].values()) == on_disk  # every file is listed
    for entry in m["files"].values():
        data = (bundle / entry["path"]).read_bytes()
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert sorted(m["graphs"]) == sorted(GRAPHS)
    for name, g in m["graphs"].items():  # declared IO = what onnxruntime reads from the graph
        assert g["precision"] == "fp32" and m["files"][g["file"]]["path"] == f"{name}.onnx"
        sess = ort.InferenceSession(str(bundle / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        for declared, actual in ((g["inputs"], sess.get_inputs()), (g["outputs"], sess.get_outputs())):
            assert [(d["name"], d["shape"], d["dtype"]) for d in declared] == [
                (a.name, a.shape, ONNX_TYPES[a.type]) for a in actual
            ]
    card = m["model_card"]
    assert card == {
        "name": "tiny-random",
        "source": "model",
        "checkpoint": None,
        "training_stage": "random",
        "chunk_frames": 3,
        "sink_frames": 3,
        "window_frames": 6,
        "resolution": [32, 48],
        "longest_tested_frames": None,
    }
    assert str(model.parent) not in (bundle / "manifest.json").read_text()  # no path of this machine
    assert set(m["producer"]) == {"rf_runtime", "torch", "onnx", "opset"}


def test_truncated_graph_is_refused(engine_dirs, tmp_path):
    b = copy_bundle(engine_dirs[1], tmp_path / "b")
    with open(b / "cache_update.onnx", "r+b") as f:
        f.truncate(100)
    with pytest.raises(BundleError, match=r"cache_update.onnx.*100 bytes.*truncated.*rf-export onnx"):
        Streamer.from_engine(b)


def test_altered_graph_is_refused(engine_dirs, tmp_path):
    b = copy_bundle(engine_dirs[1], tmp_path / "b")
    data = bytearray((b / "vae_decode.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte different
    (b / "vae_decode.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"vae_decode.onnx.*sha256.*rf-export onnx"):
        Streamer.from_engine(b)


def test_wrong_hash_in_manifest_is_refused(engine_dirs, tmp_path):
    b = copy_bundle(engine_dirs[1], tmp_path / "b")
    m = read_manifest(b)
    m["files"]["dit_step"]["sha256"] = "0" * 64
    write_raw_manifest(b, m)
    with pytest.raises(BundleError, match=r"dit_step.onnx.*sha256"):
        Bundle.load(b)


def test_missing_file_and_unknown_schema_are_refused(engine_dirs, tmp_path):
    b = copy_bundle(engine_dirs[1], tmp_path / "b")
    os.remove(b / "vae_decode.onnx")
    with pytest.raises(BundleError, match="vae_decode.onnx.*missing"):
        Streamer.from_engine(b)
    for version in (99, 1, None):
        b2 = copy_bundle(engine_dirs[1], tmp_path / f"v{version}")
        m = read_manifest(b2)
        m["schema_version"] = version
        write_raw_manifest(b2, m)
        with pytest.raises(
            BundleError, match=rf"schema_version {version!r} is not supported.*reads 2.*rf-export"
        ):
            Streamer.from_engine(b2)
    with pytest.raises(BundleError, match="not an engine bundle"):
        Streamer.from_engine(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.load(tmp_path)


def test_edited_graph_io_is_refused(engine_dirs, tmp_path):
    b = copy_bundle(engine_dirs[1], tmp_path / "b")
    m = read_manifest(b)
    m["graphs"]["dit_step"]["inputs"][0]["shape"][1] = 6  # x: 6 frames instead of 3
    write_raw_manifest(b, m)
    with pytest.raises(
        BundleError, match=r"dit_step.*input 'x': declared \[1, 6, 16, 4, 6\].*\[1, 3, 16, 4, 6\]"
    ):
        Bundle.load(b)


def test_graph_io_checked_by_the_runner_without_onnx(engine_dirs, tmp_path, monkeypatch):
    """Where onnx is not installed (a runtime-only install), the runner checks the declared IO
    against the onnxruntime session's metadata instead."""
    b = copy_bundle(engine_dirs[1], tmp_path / "b")
    m = read_manifest(b)
    m["graphs"]["cache_update"]["outputs"][0]["name"] = "renamed"
    write_raw_manifest(b, m)
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    assert not Bundle.load(b).io_checked_against_onnx
    with pytest.raises(RunnerError, match=r"cache_update.*'renamed' is declared.*rf-export onnx"):
        Streamer.from_engine(b)


def test_edited_stream_settings_are_refused_by_the_model_card(engine_dirs, tmp_path):
    b = copy_bundle(engine_dirs[1], tmp_path / "b")
    m = read_manifest(b)
    m["stream"]["window_frames"] = 9
    write_raw_manifest(b, m)
    with pytest.raises(
        BundleError, match=r"model card says window_frames=6 but the stream settings say window_frames=9"
    ):
        Streamer.from_engine(b)


def test_model_card_checks():
    card = ModelCard("m", "model", None, "random", 3, 3, 6, (32, 48), longest_tested_frames=93)
    card.check_settings(StreamSettings(), (32, 48))
    with pytest.raises(BundleError, match="sink_frames=3 but the stream settings say sink_frames=0"):
        card.check_settings(StreamSettings(sink_frames=0), (32, 48))
    with pytest.raises(BundleError, match=r"resolution \[32, 48\].*\[64, 48\]"):
        card.check_settings(StreamSettings(), (64, 48))
    with pytest.raises(BundleError, match="absolute path"):
        ModelCard.from_dict({**card.__dict__, "source": os.path.abspath("x")}, "manifest.json")
    with pytest.raises(BundleError, match="training_stage 'finished'"):
        ModelCard.from_dict({**card.__dict__, "training_stage": "finished"}, "manifest.json")
    for stage in ("dmd", "re-dmd"):  # plain DMD (the ablation's baseline) and reward-weighted DMD
        assert (
            ModelCard.from_dict({**card.__dict__, "training_stage": stage}, "m.json").training_stage == stage
        )


def test_longer_stream_than_tested_warns(engine_dirs, tmp_path, caplog):
    b = copy_bundle(engine_dirs[1], tmp_path / "b")
    m = read_manifest(b)
    m["model_card"]["longest_tested_frames"] = 21
    write_raw_manifest(b, m)
    streamer = Streamer.from_engine(b)
    with caplog.at_level(logging.WARNING, logger="rf_runtime"):
        list(streamer.stream("a cube", num_frames=21))
    assert not caplog.records
    with caplog.at_level(logging.WARNING, logger="rf_runtime"):
        next(iter(streamer.stream("a cube", num_frames=33)))
    assert [r.name for r in caplog.records] == ["rf_runtime"]
    assert "33 frames requested" in caplog.text and "at most 21 frames" in caplog.text


PLAN = {
    "file": "dit_plan",
    "tensorrt_version": "10.8.0",
    "compute_capability": "9.0",
    "device_name": "NVIDIA H100 80GB HBM3",
    "precision": "fp16",
}


def test_plan_compatibility():
    assert plan_problem(PLAN, "10.8.0", "9.0") is None
    assert plan_problem(PLAN, "10.8.0.43", "9.0") is None  # the build number does not matter
    assert "built with TensorRT 10.8.0, this machine has TensorRT 10.9.0" in plan_problem(
        PLAN, "10.9.0", "9.0"
    )
    assert "compute capability 9.0 (NVIDIA H100 80GB HBM3), this GPU is 8.9" in plan_problem(
        PLAN, "10.8.0", "8.9"
    )
    assert "not installed" in plan_problem(PLAN, None, None)
    assert "no CUDA GPU" in plan_problem(PLAN, "10.8.0", None)


def bundle_with_plans(src, dst):
    """A bundle whose manifest records a TensorRT plan for every graph (the plan bytes are never
    deserialized here: only the compatibility check reads the manifest)."""
    from rf_runtime.export.trt_build import record_plans  # what `rf-export trt` records after a build

    b = copy_bundle(src, dst)
    for g in GRAPHS:
        (b / f"{g}.plan").write_bytes(b"plan bytes")
    info = {k: v for k, v in PLAN.items() if k != "file"}
    record_plans(str(b), read_manifest(b), {g: f"{g}.plan" for g in GRAPHS}, **info)
    return b


def test_plan_for_another_gpu_or_tensorrt_is_refused(engine_dirs, tmp_path):
    bundle = Bundle.load(bundle_with_plans(engine_dirs[1], tmp_path / "b"))
    assert bundle.plans["text_kv"] == {**PLAN, "file": "plan:text_kv"}  # as `rf-export trt` records it
    assert bundle.file("plan:text_kv") == os.path.join(bundle.path, "text_kv.plan")
    bundle.check_plans(GRAPHS, "10.8.0", "9.0")
    with pytest.raises(
        BundleError,
        match=r"text_kv.plan \(text_kv\) cannot run here: .*compute capability 9.0.*"
        r"this GPU is 8.6; rebuild the engines with `rf-export trt BUNDLE`",
    ):
        bundle.check_plans(GRAPHS, "10.8.0", "8.6")
    with pytest.raises(
        BundleError, match=r"TensorRT 10.8.0, this machine has TensorRT 11.0.0.*rf-export trt"
    ):
        bundle.check_plans(GRAPHS, "11.0.0", "9.0")
    # the explicit choice refuses; "auto" runs the ONNX graphs instead, and says why in the log
    with pytest.raises(BundleError, match="rf-export trt"):
        choose_backend(bundle, "tensorrt", "cuda", lambda: ("10.8.0", "8.6"))
    assert choose_backend(bundle, "auto", "cuda", lambda: ("10.8.0", "8.6")) == "onnxruntime"
    assert choose_backend(bundle, "auto", "cuda", lambda: ("10.8.0", "9.0")) == "tensorrt"
    assert choose_backend(bundle, "auto", "cpu", lambda: ("10.8.0", "9.0")) == "onnxruntime"


def test_plan_entries_are_validated(engine_dirs, tmp_path):
    b = bundle_with_plans(engine_dirs[1], tmp_path / "b")
    m = read_manifest(b)
    m["plans"]["nope"] = dict(PLAN, file="plan:dit_step")
    write_raw_manifest(b, m)
    with pytest.raises(BundleError, match="plan 'nope' names no graph.*rf-export trt"):
        Bundle.load(b)


def test_rf_export_cli(engine_dirs, tmp_path, capsys):
    from rf_runtime.export.cli import main

    assert (
        main(
            [
                "onnx",
                "--model-dir",
                str(engine_dirs[0]),
                "--out",
                str(tmp_path / "b"),
                "--longest-tested-frames",
                "93",
                "--name",
                "tiny",
            ]
        )
        == 0
    )
    card = read_manifest(tmp_path / "b")["model_card"]
    assert (card["longest_tested_frames"], card["name"], card["training_stage"]) == (93, "tiny", "random")
    assert main(["onnx", "--model-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "c")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
