"""TensorRT itself, on a GPU: fp32 plans within 1e-5 of the PyTorch reference (TF32 off), CUDA graphs
on and off equal, stream snapshots of fp16 and bf16 plans, two threads on one runner. They skip
cleanly where TensorRT, cuda-python or a GPU is absent (this project's control flow around
TensorRT is checked everywhere by tests/test_trt_control_flow.py, with a stand-in)."""

import importlib.util
import shutil
import threading

import numpy as np
import pytest

pytest.importorskip("onnx")

FP32_TOL = 1e-5  # relative L2 error of fp32 plans against PyTorch fp32: TF32 (10-bit mantissas) would miss it


def _gpu_here() -> bool:
    if importlib.util.find_spec("tensorrt") is None:
        return False
    from rf_runtime.runners.tensorrt_runner import current_gpu

    return current_gpu() is not None


pytestmark = pytest.mark.skipif(not _gpu_here(), reason="needs TensorRT, cuda-python and an NVIDIA GPU")
PROMPT = "a red circle bouncing"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A tiny bundle with fp32, fp16 and bf16 graphs, and three copies with the plans of one precision."""
    from rf_runtime.export.bundle_builder import build_bundle
    from rf_runtime.export.trt_build import build_plans
    from rf_runtime.testing import write_model_dir

    root = tmp_path_factory.mktemp("trtgpu")
    write_model_dir(root / "model", seed=5)
    build_bundle(root / "model", root / "src", precisions=("fp32", "fp16", "bf16"))
    out = {"model": root / "model"}
    for precision in ("fp32", "fp16", "bf16"):
        shutil.copytree(root / "src", root / precision)
        build_plans(root / precision, precision=precision, workspace_mib=1024)
        out[precision] = root / precision
    return out


def test_fp32_plans_match_pytorch_within_1e5(built):
    from rf_runtime.export.verify import verify_bundle

    rows = [
        r
        for r in verify_bundle(built["fp32"], built["model"], backends=["tensorrt"])
        if r.precision == "fp32"
    ]
    assert {r.graph for r in rows} == {
        "dit_step",
        "cache_update",
        "text_kv",
        "vae_decode_first",
        "vae_decode",
    }
    assert all(r.status == "PASS" and r.rel <= FP32_TOL for r in rows), rows


def test_low_precision_plans_pass_verify(built):
    from rf_runtime.export.verify import verify_bundle

    for precision in ("fp16", "bf16"):
        rows = [
            r
            for r in verify_bundle(built[precision], built["model"], backends=["tensorrt"])
            if r.precision == precision
        ]
        assert len(rows) == 5 and all(r.status == "PASS" for r in rows), rows


def _streamer(bundle, cuda_graph=False):
    from rf_runtime.engine_backend import EngineBackend
    from rf_runtime.streamer import Streamer

    return Streamer(EngineBackend.load(bundle, backend="tensorrt", device="cuda", cuda_graph=cuda_graph))


def _frames(streamer, chunks, seed=0):
    return [c.frames.copy() for _, c in zip(range(chunks), streamer.open(PROMPT, seed=seed))]


def test_cuda_graphs_on_and_off_give_the_same_frames(built):
    plain = _frames(_streamer(built["fp16"]), 4)
    graphs = _frames(_streamer(built["fp16"], cuda_graph=True), 4)
    assert len(plain) == len(graphs) == 4
    for a, b in zip(plain, graphs):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_snapshots_of_low_precision_plans_resume_exactly(built, precision, tmp_path):
    from rf_runtime.snapshot import StreamSnapshot

    streamer = _streamer(built[precision])
    whole = _frames(streamer, 4, seed=3)
    stream = streamer.open(PROMPT, seed=3)
    first = [next(stream).frames.copy() for _ in range(2)]
    path = tmp_path / "s.rfstate.npz"
    stream.save_state().save(path)
    stream.close()
    resumed = streamer.resume(StreamSnapshot.load(path))
    rest = [next(resumed).frames.copy() for _ in range(2)]
    for a, b in zip(whole, first + rest):
        np.testing.assert_array_equal(a, b)  # the cache in bf16 / fp16 is staged exactly (float32 holds both)


def test_two_threads_on_one_runner(built):
    streamer = _streamer(built["fp16"], cuda_graph=True)
    alone = {seed: _frames(streamer, 3, seed=seed) for seed in (1, 2)}
    together, errors = {}, []

    def work(seed):
        try:
            together[seed] = _frames(streamer, 3, seed=seed)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for seed in (1, 2):
        for a, b in zip(alone[seed], together[seed]):
            np.testing.assert_array_equal(a, b)
