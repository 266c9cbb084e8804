"""This project's control flow around TensorRT and cuda-python, checked with a stand-in for both
(tests/trt_standin.py). These tests check OUR code (export/trt_build.py, the TensorRT runner and
its CUDA-graph cache), not TensorRT: the stand-in records calls and returns what the real calls
return (None, False, (error, value) tuples), and the tests check that every return value is
handled, files are written only at the end, CUDA graphs are destroyed, host staging is keyed by
address + dtype + shape, addresses are checked for 256-byte alignment, TF32 is cleared, the CUDA
device is set, a mismatched timing cache is refused, the shared cache is saved under a lock.
The real-GPU tests (tests/test_export_trt.py, tests/test_trt_gpu.py, tests/test_runners.py) run
TensorRT itself and skip where it is absent.
"""

import gc
import hashlib
import json
import sys
import threading
import types

import ml_dtypes
import numpy as np
import pytest

import trt_standin as S
from rf_runtime.runners import GraphSpec, RunnerError, TensorRTRunner, TensorSpec

pytest.importorskip("polygraphy")


def _reset_polygraphy():
    """Polygraphy imports tensorrt lazily and caches the module (and its TensorRT logger): forget both,
    so that neither the stand-in nor a real TensorRT leaks between tests."""
    for name, module in list(sys.modules.items()):
        if not name.startswith("polygraphy"):
            continue
        for value in list(vars(module).values()):
            if (
                type(value).__name__ == "LazyModule"
                and getattr(vars(value).get("module"), "__name__", "") == "tensorrt"
            ):
                vars(value)["module"] = None
        if hasattr(module, "TRT_LOGGER"):
            module.TRT_LOGGER = None


@pytest.fixture
def fake(monkeypatch):
    S.TRT.reset()
    S.CUDART.reset()
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    cuda.bindings, bindings.runtime = bindings, S.CUDART
    for name, module in (
        ("tensorrt", S.TRT),
        ("cuda", cuda),
        ("cuda.bindings", bindings),
        ("cuda.bindings.runtime", S.CUDART),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    _reset_polygraphy()
    yield S
    _reset_polygraphy()


# ---- the runner ------------------------------------------------------------------------------


def plan(tmp_path, dtype="float32", out_dtype=None, shape=(4,), name="p.plan"):
    path = tmp_path / name
    path.write_bytes(S.make_plan([["x", list(shape), dtype]], [["y", list(shape), out_dtype or dtype]]))
    return path


SPEC = GraphSpec("g", (TensorSpec("x", (4,), "float32"),), (TensorSpec("y", (4,), "float32"),))


def test_runs_and_every_return_value_is_handled(fake, tmp_path):
    x = np.array([1, -2, 3.5, 0], np.float32)
    with TensorRTRunner(plan(tmp_path), SPEC) as r:
        np.testing.assert_array_equal(r.infer({"x": x})["y"], 2 * x + 1)
        assert fake.CUDART.pageable_copies == 0  # staging is page-locked: copies are asynchronous
        fake.TRT.fail_execute = 1
        with pytest.raises(RunnerError, match="execute_async_v3 failed"):
            r.infer({"x": x})
        fake.TRT.no_context = True
        with pytest.raises(RunnerError, match="could not create an execution context"):
            r.bind()
        fake.TRT.no_context = False
        fake.CUDART.fail_next["cudaMalloc"] = S.cudaError_t.cudaErrorMemoryAllocation
        with pytest.raises(RunnerError, match="cudaMalloc failed"):
            r.allocate((4,))
        fake.CUDART.fail_next["cudaStreamSynchronize"] = S.cudaError_t.cudaErrorInvalidValue
        with pytest.raises(RunnerError, match="cudaStreamSynchronize failed"):
            r.run(r.bind())
    bad = tmp_path / "bad.plan"
    bad.write_bytes(b"\x00 not a plan")
    with pytest.raises(RunnerError, match="could not deserialize"):
        TensorRTRunner(bad, SPEC).activate()


def test_a_plan_that_is_not_the_declared_graph_is_refused_once_by_activate(fake, tmp_path):
    """The IO check is Runner.activate's (one place for every runner): a plan whose output has another
    dtype than the manifest declares is refused with the TensorRT fix, and its stream is released."""
    with pytest.raises(RunnerError, match=r"does not match its declared IO.*y.*rf-export trt") as err:
        TensorRTRunner(plan(tmp_path, out_dtype="float16"), SPEC).activate()
    assert "float16" in str(err.value)
    names = fake.CUDART.names()
    assert names.count("cudaStreamCreate") == names.count("cudaStreamDestroy") == 1


def test_contexts_share_one_user_managed_scratch(fake, tmp_path):
    with TensorRTRunner(plan(tmp_path), SPEC) as r:
        allocations = fake.CUDART.live_device_allocations()  # the scratch
        bindings = [r.bind() for _ in range(6)]
        contexts = [b.impl["context"] for b in bindings]
        assert {c.strategy for c in contexts} == {S.ExecutionContextAllocationStrategy.USER_MANAGED}
        assert len({c.scratch for c in contexts}) == 1 and contexts[0].scratch is not None
        # six bindings: their own I/O buffers (2 each), no activation memory each
        assert fake.CUDART.live_device_allocations() == allocations + 6 * 2


def test_device_is_set_in_every_thread(fake, tmp_path):
    x = np.arange(4, dtype=np.float32)
    r = TensorRTRunner(plan(tmp_path), SPEC, device_id=1).activate()
    assert ("cudaSetDevice", (1,)) in fake.CUDART.calls
    out = {}
    t = threading.Thread(target=lambda: out.update(r.infer({"x": x})))  # a new thread starts on device 0
    t.start()
    t.join()
    np.testing.assert_array_equal(out["y"], 2 * x + 1)  # the stand-in engine fails on another device
    r.deactivate()


def test_staging_is_keyed_by_address_dtype_and_shape(fake, tmp_path):
    with TensorRTRunner(plan(tmp_path), SPEC) as r:
        a = r.allocate((4,), "float32")
        r.write(a, np.ones(4, np.float32))
        address = a.ptr
        del a
        gc.collect()
        b = r.allocate((4,), "float16")  # 8 bytes at the address the 16-byte buffer had
        assert b.ptr == address
        values = np.array([0.5, 1, 2, 3], np.float16)
        r.write(
            b, values
        )  # a float32 staging array here would copy 16 bytes into 8: refused by the bounds check
        np.testing.assert_array_equal(r.read(b), values)
        assert r.read(b).dtype == np.float16


def test_bfloat16_is_staged_as_bits(fake, tmp_path):
    spec = GraphSpec("g", (TensorSpec("x", (4,), "bfloat16"),), (TensorSpec("y", (4,), "bfloat16"),))
    x = np.array([1.00390625, -3.3, 1e-3, 65504.0], np.float32)  # 1 + 2^-8 lies between two bf16 values
    with TensorRTRunner(plan(tmp_path, "bfloat16"), spec) as r:
        b = r.bind()
        r.write(b["x"], x)
        r.run(b)
        expect_x = x.astype(ml_dtypes.bfloat16)  # rounding to nearest even, by ml_dtypes
        np.testing.assert_array_equal(r.read(b["x"]), expect_x.astype(np.float32))
        expect_y = (2 * expect_x.astype(np.float32) + 1).astype(ml_dtypes.bfloat16).astype(np.float32)
        got = r.read(b["y"])
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, expect_y)
        r.write(b["x"], expect_x)  # ml_dtypes arrays are written as they are
        np.testing.assert_array_equal(r.read(b["x"]), expect_x.astype(np.float32))


def test_addresses_are_checked_for_alignment(fake, tmp_path):
    spec8 = GraphSpec("g", (TensorSpec("x", (4,), "float32"),), (TensorSpec("y", (4,), "float32"),))
    with TensorRTRunner(plan(tmp_path), spec8) as r:
        big = r.allocate((128,), "float32")
        with pytest.raises(RunnerError, match="byte offset 4.*256-byte aligned"):
            r.bind({"x": big.view(1, (4,))})
        b = r.bind({"x": big.view(64, (4,))})  # 256 bytes in: aligned
        before = dict(b.buffers), dict(b.impl["context"].addresses)
        with pytest.raises(RunnerError, match="256-byte aligned"):
            b.set("x", big.view(2, (4,)))
        assert (dict(b.buffers), dict(b.impl["context"].addresses)) == before  # nothing changed


def test_cuda_graphs_replay_the_right_addresses_and_are_destroyed(fake, tmp_path):
    cu = fake.CUDART
    x0, x1 = np.arange(4, dtype=np.float32), np.arange(4, dtype=np.float32) * -3
    with TensorRTRunner(plan(tmp_path), SPEC, cuda_graph=True, max_graphs=2) as r:
        b = r.bind()
        others = [r.allocate((4,)) for _ in range(3)]
        r.write(b["x"], x0)
        for o in others:
            r.write(o, x1)
        r.run(b)
        r.run(b)  # replayed
        np.testing.assert_array_equal(r.read(b["y"]), 2 * x0 + 1)
        assert cu.names().count("cudaGraphLaunch") == 2 and len(cu.live_execs) == 1
        b.set("x", others[0])  # another address: another graph, never the stale one
        r.run(b)
        np.testing.assert_array_equal(r.read(b["y"]), 2 * x1 + 1)
        assert len(cu.live_execs) == 2
        b.set("x", others[1])
        r.run(b)  # a third configuration: the least recently used graph is destroyed
        np.testing.assert_array_equal(r.read(b["y"]), 2 * x1 + 1)
        assert len(cu.live_execs) == 2 and cu.destroyed_execs == 1
        assert not cu.live_graphs  # the captured (not instantiated) graphs are destroyed at once
        assert not cu.capturing
        del b
        gc.collect()  # a binding's graphs die with it
        assert not cu.live_execs and cu.destroyed_execs == 3
        b2 = r.bind()
        r.write(b2["x"], x0)
        r.run(b2)
        assert len(cu.live_execs) == 1
    assert not cu.live_execs  # and at deactivate


def test_cuda_graphs_on_and_off_give_the_same_outputs(fake, tmp_path):
    x = np.linspace(-1, 1, 4, dtype=np.float32)
    outs = []
    for cuda_graph in (False, True):
        with TensorRTRunner(plan(tmp_path), SPEC, cuda_graph=cuda_graph) as r:
            outs.append([r.infer({"x": x * k})["y"].copy() for k in (1, 2, 3)])
    np.testing.assert_array_equal(np.array(outs[0]), np.array(outs[1]))


def test_a_failed_capture_leaves_the_stream_usable(fake, tmp_path):
    with TensorRTRunner(plan(tmp_path), SPEC, cuda_graph=True) as r:
        b = r.bind()
        fake.CUDART.fail_next["cudaGraphInstantiate"] = S.cudaError_t.cudaErrorInvalidValue
        with pytest.raises(RunnerError, match="cudaGraphInstantiate failed"):
            r.run(b)
        assert not fake.CUDART.capturing and not fake.CUDART.live_graphs  # capture ended, graph destroyed
        fake.TRT.fail_execute = 1  # the plain run before the capture fails: nothing is captured
        with pytest.raises(RunnerError, match="execute_async_v3 failed"):
            r.run(b)
        assert not fake.CUDART.capturing and not fake.CUDART.live_execs
        r.write(b["x"], np.ones(4, np.float32))
        r.run(b)
        np.testing.assert_array_equal(r.read(b["y"]), np.full(4, 3, np.float32))


def test_two_threads_on_one_runner(fake, tmp_path):
    errors = []
    with TensorRTRunner(plan(tmp_path), SPEC) as r:

        def work(seed):
            try:
                b = r.bind()
                for i in range(40):
                    x = np.full(4, seed * 100 + i, np.float32)
                    r.write(b["x"], x)
                    r.run(b)
                    got = r.read(b["y"]).copy()
                    if not np.array_equal(got, 2 * x + 1):
                        errors.append((seed, i, got))
            except Exception as exc:  # reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(s,)) for s in (1, 2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == [] and fake.TRT.overlaps == 0  # never two kernels on the shared scratch at once


# ---- the build -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle_src(tmp_path_factory):
    pytest.importorskip("onnx")
    from rf_runtime.export.bundle_builder import build_bundle
    from rf_runtime.testing import write_model_dir

    root = tmp_path_factory.mktemp("trtflow")
    write_model_dir(root / "model", seed=3)
    build_bundle(root / "model", root / "bundle")
    return root / "bundle"


@pytest.fixture
def bundle(bundle_src, tmp_path):
    import shutil

    dst = tmp_path / "work" / "bundle"
    shutil.copytree(bundle_src, dst)
    return dst


def snapshot(folder):
    """Every file a user sees under ``folder`` (the bundle's parent: bundle + timing cache) with its
    hash; not the hidden temporary files a plan is written to before the rename, nor the lock file."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".") and not p.name.endswith(".lock")
    }


def temporaries(folder):
    return [p for p in folder.rglob(".*.tmp")]


def test_build_clears_tf32_sets_the_device_and_writes_everything_at_the_end(fake, bundle):
    from rf_runtime.export.trt_build import build_plans

    seen = []
    fake.TRT.on_build = lambda n: seen.append(snapshot(bundle.parent))  # what exists while building
    plans = build_plans(bundle, precision="fp32", workspace_mib=64, device=1)
    builds = fake.TRT.builds
    assert len(builds) == 5
    assert all(
        b["strongly_typed"] and not b["tf32"] and b["workspace"] == 64 << 20 and b["device"] == 1
        for b in builds
    )
    assert len({id(b["cache"]) for b in builds}) == 1  # one timing cache shared by every graph
    assert all(s == seen[0] for s in seen)  # nothing written during the builds
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert (
        set(plans)
        == set(manifest["plans"])
        == {"dit_step", "cache_update", "text_kv", "vae_decode_first", "vae_decode"}
    )
    for graph, entry in manifest["plans"].items():
        assert entry["compute_capability"] == "9.0" and entry["device_name"] == "Stand-in GPU one"
        data = (bundle / manifest["files"][entry["file"]]["path"]).read_bytes()
        assert data == b"FAKEPLAN " + str(bundle / f"{graph}.onnx").encode()
    caches = list(bundle.parent.glob("tensorrt-timing-*.cache"))
    assert [c.name for c in caches] == ["tensorrt-timing-10.13.0.35-sm90-stand-in-gpu-one.cache"]
    assert json.loads(caches[0].read_bytes().split(b" ", 2)[2]) == sorted(f"{g}.onnx" for g in plans)
    assert not temporaries(bundle.parent)  # no temporary files left
    from rf_runtime.bundle import Bundle

    assert set(Bundle.load(bundle).plans) == set(plans)  # hashes recorded for the files as written


def test_rf_export_trt_builds_on_the_device_asked_for(fake, bundle, capsys):
    from rf_runtime.export.cli import main

    assert main(["trt", str(bundle), "--precision", "fp32", "--device", "1", "--graphs", "cache_update"]) == 0
    out = capsys.readouterr().out
    assert (
        "built cache_update: plan:cache_update (TensorRT 10.13.0.35, compute capability 9.0, Stand-in GPU one)"
        in out
    )
    assert [b["device"] for b in fake.TRT.builds] == [1]
    assert main(["trt", str(bundle), "--precision", "fp32", "--device", "7"]) == 2  # no such device
    assert "no usable CUDA device 7" in capsys.readouterr().err


def test_a_failed_build_changes_nothing(fake, bundle):
    from rf_runtime.export.trt_build import build_plans
    from rf_runtime.errors import ConfigError

    before = snapshot(bundle.parent)
    fake.TRT.unbuildable.add(str(bundle / "text_kv.onnx"))  # the third graph (sorted) fails, two were built
    with pytest.raises(ConfigError, match=r"could not build a plan from .*text_kv\.onnx"):
        build_plans(bundle, precision="fp32")
    assert len(fake.TRT.builds) == 3
    assert snapshot(bundle.parent) == before and not temporaries(bundle.parent)  # no plan, manifest, cache
    fake.TRT.unbuildable.clear()
    fake.TRT.unparsable.add(str(bundle / "cache_update.onnx"))
    with pytest.raises(ConfigError, match="Could not parse ONNX"):
        build_plans(bundle, precision="fp32")
    assert snapshot(bundle.parent) == before


def test_timing_cache_mismatch_and_damage_are_refused_before_building(fake, bundle, tmp_path):
    from rf_runtime.export.trt_build import build_plans
    from rf_runtime.errors import ConfigError

    other = tmp_path / "other-gpu.cache"
    other.write_bytes(S.TimingCache(0, ["from device 0"]).serialize())  # built on device 0, used on 1
    before = snapshot(bundle.parent)
    with pytest.raises(ConfigError, match="another TensorRT version or for another GPU.*delete it"):
        build_plans(bundle, precision="fp32", timing_cache=other, device=1)
    damaged = tmp_path / "damaged.cache"
    damaged.write_bytes(b"\x00garbage")
    with pytest.raises(ConfigError, match="not a TensorRT timing cache or is damaged"):
        build_plans(bundle, precision="fp32", timing_cache=damaged)
    assert fake.TRT.builds == [] and snapshot(bundle.parent) == before
    assert other.read_bytes() == S.TimingCache(0, ["from device 0"]).serialize()


def test_timing_cache_is_merged_under_the_lock(fake, bundle, tmp_path, monkeypatch):
    import polygraphy.util

    from rf_runtime.export.trt_build import build_plans

    path = tmp_path / "shared.cache"
    path.write_bytes(S.TimingCache(0, ["old entry"]).serialize())
    locked = []
    real = polygraphy.util.LockFile

    class Recording(real):
        def __enter__(self):
            locked.append(self.lock_path)
            return super().__enter__()

    monkeypatch.setattr(polygraphy.util, "LockFile", Recording)

    def another_build_saves(n):  # another process saves the shared cache while we build
        if n == 2:
            path.write_bytes(S.TimingCache(0, ["old entry", "theirs"]).serialize())

    fake.TRT.on_build = another_build_saves
    build_plans(bundle, precision="fp32", timing_cache=path)
    entries = json.loads(path.read_bytes().split(b" ", 2)[2])
    assert "old entry" in entries and "theirs" in entries and "dit_step.onnx" in entries
    assert ("combine", False) in fake.TRT.calls  # merged without ignoring a mismatch
    assert locked == [str(path) + ".lock"] * 2  # loaded and saved under Polygraphy's lock
