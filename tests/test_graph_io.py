"""The export / engine contract (rf_runtime/graph_io.py): bundles hold the graphs and tensor names it
lists, and the engine backend refuses a bundle whose graphs do not."""

import json
import shutil

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from rf_runtime import graph_io  # noqa: E402
from rf_runtime.bundle import MANIFEST, BundleError, default_engine_dir, write_manifest  # noqa: E402


@pytest.mark.parametrize("which", ["exported here", "shipped"])
def test_bundles_hold_the_contracts_graphs_and_names(engine_dirs, which):
    path = engine_dirs[1] if which == "exported here" else default_engine_dir()
    with open(f"{path}/{MANIFEST}") as f:
        manifest = json.load(f)
    fp32 = {name: g for name, g in manifest["graphs"].items() if "@" not in name}
    assert set(graph_io.GRAPHS) <= set(fp32)
    slots = manifest["model"]["vae_cache_slots"]
    for name, g in fp32.items():
        ins, outs = graph_io.io_names(name, slots)
        assert [t["name"] for t in g["inputs"]] == list(ins), (
            name
        )  # export writes them in the contract's order
        assert [t["name"] for t in g["outputs"]] == list(outs), name


def test_names_and_variants():
    assert graph_io.vae_cache_names(2) == (["cache_0", "cache_1"], ["cache_0_out", "cache_1_out"])
    assert (
        graph_io.variant("dit_step", "fp16") == "dit_step@fp16"
        and graph_io.variant("dit_step", "fp32") == "dit_step"
    )
    assert graph_io.base_graph("vae_decode@bf16") == "vae_decode"
    assert (
        graph_io.mismatch(
            "cache_update", ["ctx_v", "ctx_k", "new_k", "new_v", "mix"], ["ctx_k_out", "ctx_v_out"]
        )
        is None
    )  # bound by name: order is free
    assert "mixing" in graph_io.mismatch(
        "cache_update", ["ctx_k", "ctx_v", "new_k", "new_v", "mixing"], ["ctx_k_out", "ctx_v_out"]
    )
    with pytest.raises(KeyError, match="not a graph of the bundle contract"):
        graph_io.io_names("unet")


def test_engine_refuses_a_graph_with_other_tensor_names(engine_dirs, tmp_path):
    import onnx

    from rf_runtime.backends.engine import EngineBackend

    bundle = tmp_path / "bundle"
    shutil.copytree(engine_dirs[1], bundle)
    path = bundle / "cache_update.onnx"
    model = onnx.load(str(path))
    for node in model.graph.node:  # rename the input "mix" everywhere: a consistent graph, another contract
        node.input[:] = ["mixing" if i == "mix" else i for i in node.input]
    for value in model.graph.input:
        if value.name == "mix":
            value.name = "mixing"
    onnx.save(model, str(path))
    manifest = json.loads((bundle / MANIFEST).read_text())
    for t in manifest["graphs"]["cache_update"]["inputs"]:
        if t["name"] == "mix":
            t["name"] = "mixing"
    write_manifest(str(bundle), manifest)
    with pytest.raises(
        BundleError, match="graph cache_update.*'mixing'.*the runtime expects.*'mix'.*rf-export onnx"
    ):
        EngineBackend.load(bundle)
