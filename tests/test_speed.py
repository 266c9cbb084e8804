"""The CPU speed work: onnxruntime threading settings, concurrent streams on shared sessions, and
``rf-bench --profile`` / ``--sessions`` (FLOPs counted by hand, the report's arithmetic)."""

import json

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from onnx import TensorProto, helper  # noqa: E402

from rf_runtime.bench import BenchRun, run_sessions, run_together  # noqa: E402
from rf_runtime.cli import bench_main  # noqa: E402
from rf_runtime.backends.engine import EngineBackend, cpu_threads  # noqa: E402
from rf_runtime.profile import graph_flops, profile_report  # noqa: E402
from rf_runtime.runners.onnxruntime_runner import CpuThreads, RunnerError  # noqa: E402
from rf_runtime.streamer import Streamer  # noqa: E402


def test_default_threads_split_by_graph_and_overrides():
    assert (
        cpu_threads("vae_decode", None, cores=2)
        == CpuThreads(2)
        == cpu_threads("vae_decode_first", None, cores=2)
    )
    for graph in ("dit_step", "cache_update", "text_kv", "text_encoder"):
        assert cpu_threads(graph, None, cores=8) == CpuThreads(1)
    assert cpu_threads("vae_decode", None, cores=4, overlap=True) == CpuThreads(3)
    assert cpu_threads("vae_decode", None, cores=1, overlap=True) == CpuThreads(1)
    assert cpu_threads("dit_step", None, cores=4, overlap=True) == CpuThreads(1)
    assert cpu_threads("vae_decode", 1) == CpuThreads(1, spinning=False)
    assert cpu_threads("vae_decode", 2, cores=4, overlap=True) == CpuThreads(2)  # given: as given
    assert cpu_threads("dit_step", CpuThreads(3, True)) == CpuThreads(3, True)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(RunnerError, match="positive integer"):
            CpuThreads(bad)


def test_sessions_get_the_threads_asked_for(engine_dirs):
    _, bundle = engine_dirs
    from rf_runtime.runners import onnxruntime_runner

    cores = onnxruntime_runner.usable_cores()
    for overlap, vae in ((False, cores), (True, max(1, cores - 1))):  # overlap: one core for the DiT
        auto = EngineBackend.load(bundle, overlap=overlap)
        opts = {g: r.session.get_session_options() for g, r in auto.runners.items()}
        assert opts["vae_decode"].intra_op_num_threads == vae and opts["dit_step"].intra_op_num_threads == 1
        assert opts["dit_step"].get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert auto.describe()["cpu_threads"]["vae_decode"] == {"intra_op": vae, "spinning": False}
        assert auto.describe()["overlap"] is overlap
    one = EngineBackend.load(bundle, threads=CpuThreads(1, spinning=True))
    for r in one.runners.values():
        o = r.session.get_session_options()
        assert (
            o.intra_op_num_threads == 1
            and o.get_session_config_entry("session.intra_op.allow_spinning") == "1"
        )


def test_concurrent_streams_on_shared_sessions_give_their_own_frames(engine_dirs):
    """Two streams driven at once from two threads through the same one-thread sessions (what
    --sessions and a server do) give exactly the frames each gives alone."""
    _, bundle = engine_dirs
    streamer = Streamer.from_engine(bundle, threads=1)
    alone = {
        seed: np.concatenate(list(streamer.stream("a red circle", seed=seed, num_frames=9 + 12 * 5)))
        for seed in (3, 4)
    }
    import threading

    got = {}

    def run(seed):
        got[seed] = np.concatenate(list(streamer.stream("a red circle", seed=seed, num_frames=9 + 12 * 5)))

    workers = [threading.Thread(target=run, args=(s,)) for s in (3, 4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not np.array_equal(alone[3], alone[4])
    for seed in (3, 4):
        np.testing.assert_array_equal(got[seed], alone[seed])


def _model(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _f(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def test_flops_of_each_counted_op(tmp_path):
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3, 3, 3], np.zeros(108, np.float32))
    g = helper.make_tensor("g", TensorProto.FLOAT, [5, 6], np.zeros(30, np.float32))
    nodes = [
        helper.make_node("MatMul", ["a", "b"], ["ab"]),  # [2, 7, 3] x [3, 5]
        helper.make_node("Gemm", ["ab2", "g"], ["gm"]),  # [14, 5] x [5, 6]
        helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1]),  # [1, 3, 8, 8] -> [1, 4, 8, 8]
        helper.make_node("Einsum", ["m", "n"], ["e"], equation="ij,jk->ik"),  # [2, 3] x [3, 4]
        helper.make_node("Einsum", ["m"], ["mt"], equation="ij->ji"),  # a transpose: 0
        helper.make_node("Relu", ["y"], ["r"]),
    ]  # not counted
    model = _model(
        nodes,
        [
            _f("a", [2, 7, 3]),
            _f("b", [3, 5]),
            _f("ab2", [14, 5]),
            _f("x", [1, 3, 8, 8]),
            _f("m", [2, 3]),
            _f("n", [3, 4]),
        ],
        [_f("ab", [2, 7, 5]), _f("gm", [14, 6]), _f("r", [1, 4, 8, 8]), _f("e", [2, 4]), _f("mt", [3, 2])],
        [w, g],
    )
    path = tmp_path / "g.onnx"
    onnx.save(model, path)
    f = graph_flops(path)
    assert f["by_op"] == {
        "MatMul": 2 * 2 * 7 * 5 * 3,
        "Gemm": 2 * 14 * 6 * 5,
        "Conv": 2 * (4 * 8 * 8) * (3 * 3 * 3),
        "Einsum": 2 * 2 * 4 * 3,
    }
    assert f["flops"] == sum(f["by_op"].values()) and f["uncounted"] == 0


def dit_step_flops(dit: dict, grid_hw, chunk_frames: int, context_frames: int, latent_channels: int) -> int:
    """2 x multiply-adds of one DiT step call, by hand from the model config."""
    d, L = dit["dim"], chunk_frames * grid_hw[0] * grid_hw[1]
    keys = (context_frames + chunk_frames) * grid_hw[0] * grid_hw[1]
    patch = dit["patch_size"][1] * dit["patch_size"][2]
    per_layer = (
        4 * 2 * L * d * d  # self-attention q, k, v, o
        + 2 * 2 * L * d * d  # cross-attention q, o (text K/V come precomputed)
        + 2 * 2 * L * keys * d  # self-attention scores and values
        + 2 * 2 * L * dit["text_len"] * d
        + 2 * 2 * L * d * dit["ffn_dim"]
    )
    embed = 2 * L * d * latent_channels * patch + 2 * L * d * patch * dit["out_dim"]  # patch embedding, head
    time = 2 * chunk_frames * (dit["freq_dim"] * d + d * d + d * 6 * d)
    return dit["num_layers"] * per_layer + embed + time


def test_rf_bench_profile(engine_dirs, tmp_path, capsys):
    _, bundle = engine_dirs
    out = tmp_path / "p.json"
    n = 5
    assert bench_main(["--bundle", str(bundle), "--chunks", str(n), "--profile", "--json", str(out)]) == 0
    assert "% peak" in capsys.readouterr().out
    report = json.loads(out.read_text())
    manifest = json.loads((bundle / "manifest.json").read_text())
    p = report["runs"][0]["profile"]
    rows = p["graphs"]
    stream, model = manifest["stream"], manifest["model"]
    # chunks 1..n-1: 4 steps + the cache pass, one cache update, one VAE step per latent frame
    assert rows["dit_step"]["calls_per_chunk"] == len(stream["timesteps"]) + 1
    assert rows["cache_update"]["calls_per_chunk"] == 1
    assert rows["vae_decode"]["calls_per_chunk"] == stream["chunk_frames"]
    assert rows["vae_decode_first"]["calls_per_chunk"] == 0 and rows["text_kv"]["calls_per_chunk"] == 0
    context = stream["sink_frames"] + stream["window_frames"] - stream["chunk_frames"]
    want = dit_step_flops(
        model["dit"], model["grid_hw"], stream["chunk_frames"], context, model["latent_channels"]
    )
    assert rows["dit_step"]["mflop_per_call"] * 1e6 == pytest.approx(want, rel=1e-9)
    assert all(r["uncounted_nodes"] == 0 for r in rows.values())
    chunk_ms = np.mean(report["runs"][0]["per_chunk"]["seconds"][1:]) * 1e3
    assert p["chunk_ms"] == pytest.approx(chunk_ms)
    assert p["graphs_ms"] == pytest.approx(sum(r["ms_per_chunk"] for r in rows.values()))
    assert 0 < p["graphs_ms"] <= p["chunk_ms"] and p["host_ms"] == pytest.approx(
        p["chunk_ms"] - p["graphs_ms"]
    )
    assert p["peak_gflops_per_core"] > 0.5 and p["peak_gflops_per_core_cpu"] > 0.5
    dit = rows["dit_step"]  # a one-thread session: its CPU time is the calling thread's
    assert 0 < dit["cpu_ms_per_chunk"] <= dit["ms_per_chunk"] * 1.05
    assert dit["cpu_gflops"] == pytest.approx(want * 5 / (dit["cpu_ms_per_chunk"] / 1e3) / 1e9)


def test_profile_report_arithmetic():
    graphs = {
        "a": {"flops": 2_000_000, "nodes": 10, "uncounted": 0},
        "b": {"flops": 0, "nodes": 3, "uncounted": 0},
    }
    r = profile_report(
        graphs,
        chunks=4,
        chunk_seconds=0.4,
        seconds={"a": 0.2, "b": 0.04},
        calls={"a": 20, "b": 4},
        threads={"a": 2},
        peak_per_core=10.0,
        cpu={"a": 0.3, "b": 0.02},
        peak_per_core_cpu=20.0,
    )
    a = r["graphs"]["a"]
    assert (
        a["calls_per_chunk"] == 5
        and a["ms_per_chunk"] == pytest.approx(50)
        and a["ms_per_call"] == pytest.approx(10)
    )
    assert a["gflops"] == pytest.approx(2e6 * 5 / 0.05 / 1e9) and a["share_of_peak"] == pytest.approx(
        0.2 / 20
    )
    assert (
        r["chunk_ms"] == pytest.approx(100)
        and r["host_ms"] == pytest.approx(40)
        and r["host_share"] == pytest.approx(0.4)
    )
    assert r["gflop_per_chunk"] == pytest.approx(0.01)
    assert (
        a["cpu_gflops"] is None and a["share_of_peak_cpu"] is None
    )  # two threads: the caller's CPU is not all
    assert r["graphs"]["b"]["cpu_ms_per_chunk"] == pytest.approx(5) and r["graphs"]["b"]["cpu_gflops"] == 0.0


def test_run_together_starts_every_thread_at_once_and_raises_a_thread_error():
    events = []

    def work(i, ready):
        events.append(("set up", i))
        ready()
        events.append(("ran", i))

    wall, cpu = run_together(4, work)
    assert sorted(events[:4]) == [("set up", i) for i in range(4)]  # nobody ran before all were set up
    assert sorted(events[4:]) == [("ran", i) for i in range(4)] and wall >= 0 and cpu >= 0

    def broken(i, ready):
        if i == 2:
            raise ValueError("stream 2 failed")
        ready()  # the others wait here, and are released by the failure instead of hanging

    with pytest.raises(ValueError, match="stream 2 failed"):
        run_together(3, broken)


def test_sessions_count_every_stream(engine_dirs):
    _, bundle = engine_dirs
    n = 4
    r = run_sessions(BenchRun("engine", str(bundle)), sessions=3, chunks=n, prompt="a red circle", seed=0)
    assert r["sessions"] == 3
    assert r["frames"] == 3 * (9 + 12 * (n - 1)), r
    assert r["aggregate_fps"] == pytest.approx(r["frames"] / r["wall_s"])
    assert len(r["per_session_fps"]) == 3 and sum(r["per_session_fps"]) >= r["aggregate_fps"] * 0.999
    assert 0 < r["latency_p50_s"] <= r["latency_p99_s"] and r["cpu_ms_per_frame"] > 0
    assert r["cpu_threads"]["vae_decode"]["intra_op"] == 1  # one thread per session when streams run at once


def test_rf_bench_sessions_and_thread_errors(engine_dirs, tmp_path, capsys):
    model, bundle = engine_dirs
    out = tmp_path / "s.json"
    assert (
        bench_main(
            [
                "--bundle",
                str(bundle),
                "--chunks",
                "3",
                "--sessions",
                "1,2",
                "--threads",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert [c["sessions"] for c in report["sessions"]] == [1, 2]
    assert report["sessions"][0]["aggregate_over_one_session"] == 1.0
    assert report["runs"][0]["cpu_threads"]["vae_decode"]["intra_op"] == 1
    assert "aggregate fps" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:  # argparse refuses it
        bench_main(["--bundle", str(bundle), "--sessions", "0,2"])
    assert exit_.value.code == 2 and "positive integers" in capsys.readouterr().err
    for argv, message in (
        (["--model-dir", str(model), "--threads", "2"], "apply to the engine run"),
        (["--model-dir", str(model), "--profile"], "graphs of an engine bundle"),
        (["--bundle", str(bundle), "--threads", "0"], "must be >= 1"),
    ):
        assert bench_main([*argv, "--chunks", "2", "--json", str(tmp_path / "x.json")]) == 2
        assert message in capsys.readouterr().err


def test_load_passes_threads_to_a_bundle_and_refuses_them_for_a_model_folder(engine_dirs):
    model, bundle = engine_dirs
    streamer = Streamer.load(bundle, threads=CpuThreads(1, spinning=True))
    assert {t["intra_op"] for t in streamer.backend.describe()["cpu_threads"].values()} == {1}
    from rf_runtime.errors import InputError

    with pytest.raises(InputError, match="threads= sets onnxruntime's threads"):
        Streamer.load(model, threads=1)


def test_rf_bench_overlap(engine_dirs, tmp_path, capsys):
    """--overlap on|off|auto reaches the engine run and its report; --profile and --sessions run
    serially (their figures need one call at a time / the streams use the cores)."""
    model, bundle = engine_dirs
    cores = len(__import__("os").sched_getaffinity(0))
    for flag, want in (("on", True), ("off", False), ("auto", cores >= 2)):
        out = tmp_path / f"{flag}.json"
        argv = ["--bundle", str(bundle), "--chunks", "3", "--overlap", flag, "--sessions", "1"]
        assert bench_main([*argv, "--json", str(out)]) == 0
        table = capsys.readouterr().out
        assert [line.split() for line in table.splitlines() if line.startswith("decode overlap")] == [
            ["decode", "overlap", "on" if want else "off"]
        ]
        report = json.loads(out.read_text())
        run = report["runs"][0]
        assert (
            run["overlap"] is want and run["run"]["overlap"] == {"auto": None, "on": True, "off": False}[flag]
        )
        assert run["cpu_threads"]["vae_decode"]["intra_op"] == (max(1, cores - 1) if want else cores)
        assert all(s > 0 for s in run["per_chunk"]["decode_s"]) and "overlap" in report["definitions"]
        assert report["sessions"][0]["overlap"] is False
    out = tmp_path / "p.json"
    assert bench_main(["--bundle", str(bundle), "--chunks", "2", "--profile", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["runs"][0]["overlap"] is False
    capsys.readouterr()
    for argv, message in (
        (["--bundle", str(bundle), "--overlap", "on", "--profile"], "runs without the decode overlap"),
        (["--model-dir", str(model), "--overlap", "on"], "apply to the engine run"),
    ):
        assert bench_main([*argv, "--chunks", "2", "--json", str(tmp_path / "x.json")]) == 2
        assert message in capsys.readouterr().err


def test_the_overlap_pairs_script_runs(engine_dirs, tmp_path):
    """scripts/overlap_pairs.sh (the coordinator's side-by-side measurement) on the tiny bundle, 1 pair."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "pairs"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", os.path.join(root, "scripts", "overlap_pairs.sh"), str(out), "1", str(engine_dirs[1]), "3"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    (pair,) = summary["pairs"]
    for mode in ("off", "on"):
        report = json.loads((out / f"pair1-{mode}.json").read_text())
        assert report["runs"][0]["overlap"] is (mode == "on") and report["chunks"] == 3
        assert pair[mode]["end_to_end_fps"] == pytest.approx(report["runs"][0]["end_to_end_fps"])
    ratio = summary["median_ratio_on_over_off"]["end_to_end_fps"]
    assert ratio == pytest.approx(pair["on"]["end_to_end_fps"] / pair["off"]["end_to_end_fps"])
    assert "paired on/off" in done.stdout
