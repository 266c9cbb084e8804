"""Batching across streams (rf_runtime.batching, ``rf-export onnx --batch-sizes``): every stream's frames
equal what it makes alone, through one call of each batched graph per chunk boundary.

Tolerance: exact. The rows of a batched call never mix and onnxruntime's CPU kernels compute each row
as they do alone, so the uint8 frames are compared with 0 difference allowed (checked on a tiny random
model and on the shipped model). Real onnxruntime throughout.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil

import numpy as np
import pytest

pytest.importorskip("onnxruntime")

from rf_runtime.batching import next_chunks, plan_groups  # noqa: E402
from rf_runtime.bundle import Bundle, BundleError, default_engine_dir  # noqa: E402
from rf_runtime.errors import InputError, StreamError  # noqa: E402
from rf_runtime.graph_io import BATCHED_GRAPHS, DIT_STEP, batched  # noqa: E402
from rf_runtime.streamer import Streamer  # noqa: E402

EXACT = 0  # the largest |difference| allowed between a batched stream's uint8 frames and its frames alone
WORDS = ["a red circle bouncing", "a blue square moving left", "a green triangle", "a small blue circle"]


@pytest.fixture(scope="module")
def batched_bundle(tmp_path_factory):
    """A tiny random model exported with batch sizes 1, 2, 4."""
    pytest.importorskip("onnx")
    from rf_runtime.export.bundle_builder import build_bundle
    from rf_runtime.testing import write_model_dir

    root = tmp_path_factory.mktemp("batched")
    write_model_dir(root / "model", seed=3, stream={"ema_alpha": 0.9})
    build_bundle(
        root / "model", root / "bundle", batch_sizes=(1, 2, 4), model_card={"training_stage": "random"}
    )
    return root / "model", root / "bundle"


def alone(streamer, prompt, seed, chunks, switches=(), num_frames=None):
    """The frames of each chunk of one stream run by itself; switches: (chunk index, prompt, keep_sink)."""
    stream = streamer.open(prompt, seed=seed, num_frames=num_frames)
    out = []
    for _ in range(chunks):
        for at, new, keep in switches:
            if stream.chunk_index == at:
                stream.set_prompt(new, keep_sink=keep)
        chunk = next(stream, None)
        if chunk is None:
            break
        out.append(chunk.frames)
    return out


def assert_same(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.shape == b.shape
        assert int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max()) <= EXACT


def test_manifest_records_the_sizes_and_the_weights_are_stored_once(batched_bundle):
    import onnx
    from onnx import numpy_helper

    _, path = batched_bundle
    m = json.loads((path / "manifest.json").read_text())
    assert m["batch"]["sizes"] == [1, 2, 4]
    assert m["batch"]["graphs"] == {str(b): {g: batched(g, b) for g in BATCHED_GRAPHS} for b in (2, 4)}
    bundle = Bundle.load(path)
    one, four = bundle.graphs[DIT_STEP].tensors, bundle.graphs["dit_step_b4"].tensors
    assert four["x"].shape == (4, *one["x"].shape[1:])
    assert four["ctx_k"].shape == (one["ctx_k"].shape[0], 4, *one["ctx_k"].shape[2:])
    assert four["key_mask"].shape == (4, *one["key_mask"].shape)  # each row its own cache state
    assert four["t_freq"].shape == one["t_freq"].shape  # shared: the rows are at one step
    assert bundle.graphs["cache_update_b2"].tensors["mix"].shape[0] == 2
    assert bundle.graphs["vae_decode_b4"].tensors["z"].shape[0] == 4
    # the batched graphs read their weights from one file that holds each distinct tensor of the
    # batch-1 per-chunk graphs once (computed here from the batch-1 graphs, independently)
    for b in (2, 4):
        for g in BATCHED_GRAPHS:
            assert m["graphs"][batched(g, b)]["external_data"] == ["batched_weights"]
    distinct = {}
    for g in BATCHED_GRAPHS:
        model = onnx.load(str(path / f"{g}.onnx"))
        tensors = [numpy_helper.to_array(t) for t in model.graph.initializer]
        tensors += [
            numpy_helper.to_array(n.attribute[0].t)
            for n in model.graph.node
            if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
        ]
        for a in tensors:
            if a.nbytes >= 1024 and a.any():
                distinct[a.tobytes()] = a.nbytes
    data = os.path.getsize(path / "batched_weights.data")
    assert sum(distinct.values()) <= data <= sum(distinct.values()) + 64 * len(distinct)


def stepped_together(streamer, n: int, chunks: int) -> list[list]:
    """Each of ``n`` streams' frames per chunk (prompt WORDS[i], seed i) over ``chunks`` calls of next_chunks."""
    streams = [streamer.open(WORDS[i], seed=i) for i in range(n)]
    got = [[] for _ in range(n)]
    for _ in range(chunks):
        for i, c in enumerate(next_chunks(streams)):
            got[i].append(c.frames)
    return got


def test_a_bundle_without_batch_sizes_serves_batch_1(engine_dirs):
    _, path = engine_dirs  # exported without --batch-sizes
    assert "batch" not in json.loads((path / "manifest.json").read_text())
    streamer = Streamer.from_engine(path)
    assert streamer.backend.batch_sizes() == (1,)
    # next_chunks still works: one stream after another, the same frames as alone
    want = [alone(streamer, WORDS[i], i, 2) for i in range(2)]
    for g, w in zip(stepped_together(streamer, 2, 2), want):
        assert_same(g, w)


def test_plan_groups():
    assert plan_groups(0, (1, 2, 4)) == []
    assert plan_groups(3, (1, 2, 4)) == [3]  # one call of 4 rows, one of them padding
    assert plan_groups(7, (1, 2, 4)) == [4, 3]
    assert plan_groups(8, (1, 2, 4)) == [4, 4]
    assert plan_groups(3, (1,)) == [1, 1, 1]


def test_streams_stepped_together_equal_streams_alone(batched_bundle):
    """Five streams (a call of 4 and one alone, then 3 padded to 4 after one leaves), different prompts
    and seeds, two joining late (their first chunk, in another cache state and through the first VAE
    graph, in a call with streams at chunk 2), one switching its prompt mid-stream, one keeping the
    sink, one ending early (num_frames)."""
    _, path = batched_bundle
    streamer = Streamer.from_engine(path)
    assert streamer.backend.batch_sizes() == (1, 2, 4)
    plan = [  # prompt, seed, joins at round, switches, num_frames
        (WORDS[0], 0, 0, (), None),
        (WORDS[1], 11, 0, ((2, WORDS[3], False),), None),
        (WORDS[2], 5, 2, (), None),
        (WORDS[3], 7, 0, ((1, WORDS[0], True),), 9 + 12 + 5),  # ends inside its third chunk
        (WORDS[0], 3, 1, ((3, WORDS[2], False),), None),
    ]
    rounds = 6
    want = [alone(streamer, p, s, rounds - j, sw, nf) for p, s, j, sw, nf in plan]
    streams = [None] * len(plan)
    got = [[] for _ in plan]
    for r in range(rounds):
        for i, (p, s, j, sw, nf) in enumerate(plan):
            if j == r:
                streams[i] = streamer.open(p, seed=s, num_frames=nf)
        active = [i for i in range(len(plan)) if streams[i] is not None and not streams[i].finished]
        for i in active:
            for at, new, keep in plan[i][3]:
                if streams[i].chunk_index == at:
                    streams[i].set_prompt(new, keep_sink=keep)
        for i, chunk in zip(active, next_chunks([streams[i] for i in active])):
            assert chunk.index == len(got[i])
            got[i].append(chunk.frames)
    for i in range(len(plan)):
        assert_same(got[i], want[i])
    assert len(got[3]) == 3 and len(got[3][-1]) == 5  # cut at num_frames
    # and a stream's state after batched chunks is its state alone: it resumes to the same frames
    later = alone(streamer, WORDS[0], 0, rounds + 2)
    resumed = streamer.resume(streams[0].save_state())
    assert_same([next(resumed).frames for _ in range(2)], later[rounds:])


def test_shipped_bundle_batches_exactly():
    streamer = Streamer.from_engine(default_engine_dir())
    sizes = streamer.backend.batch_sizes()
    if max(sizes) < 4:
        pytest.skip("the shipped bundle was exported without --batch-sizes 1,2,4")
    want = [alone(streamer, WORDS[i], 20 + i, 3) for i in range(4)]
    streams = [streamer.open(WORDS[i], seed=20 + i) for i in range(4)]
    got = [[] for _ in range(4)]
    for _ in range(3):
        for i, c in enumerate(next_chunks(streams)):
            got[i].append(c.frames)
    for g, w in zip(got, want):
        assert_same(g, w)


def test_one_call_of_each_graph_per_chunk_boundary(batched_bundle):
    _, path = batched_bundle
    streamer = Streamer.from_engine(path)
    be = streamer.backend
    streams = [streamer.open(WORDS[i], seed=i) for i in range(4)]
    next_chunks(streams)  # loads the batch-4 graphs
    calls = {}
    for graph, runner in be._batched[4].items():
        original = runner.run

        def counted(binding, graph=graph, original=original):
            calls[graph] = calls.get(graph, 0) + 1
            return original(binding)

        runner.run = counted
    one = be.runners[DIT_STEP]
    one_calls = []
    one_run = one.run
    one.run = lambda b: (one_calls.append(1), one_run(b))[1]
    next_chunks(streams)
    f = streamer.settings.chunk_frames
    assert calls == {
        "dit_step": streamer.settings.num_steps + 1,  # the steps and the cache pass, for all 4 rows at once
        "cache_update": 1,
        "vae_decode": f,  # one call per latent frame for all rows
    }
    assert one_calls == []  # the batch-1 graph was not used


def test_a_damaged_stream_fails_alone_and_the_others_go_on(batched_bundle):
    _, path = batched_bundle
    streamer = Streamer.from_engine(path)
    want = [alone(streamer, WORDS[i], i, 3) for i in range(3)]
    streams = [streamer.open(WORDS[i], seed=i) for i in range(3)]
    got = [[] for _ in range(3)]
    for i, c in enumerate(next_chunks(streams)):
        got[i].append(c.frames)
    s = streams[1]._state.device
    s.kv[s.kv_cur][1].host[...] = np.nan  # stream 1's KV cache (values) is damaged
    results = next_chunks(streams)
    assert isinstance(results[1], StreamError) and "non-finite" in str(results[1])
    assert streams[1].closed
    for i in (0, 2):
        got[i].append(results[i].frames)
    for i, c in zip((0, 2), next_chunks([streams[0], streams[2]])):
        got[i].append(c.frames)
    for i in (0, 2):
        assert_same(got[i], want[i])


def test_bad_calls_are_refused(batched_bundle, engine_dirs):
    _, path = batched_bundle
    streamer = Streamer.from_engine(path)
    a, b = streamer.open(WORDS[0]), streamer.open(WORDS[1])
    with pytest.raises(InputError, match="same stream twice"):
        next_chunks([a, a])
    other = Streamer.from_engine(engine_dirs[1]).open(WORDS[0])
    with pytest.raises(InputError, match="one Streamer"):
        next_chunks([a, other])
    b.close()
    with pytest.raises(InputError, match="stream 1 is closed"):
        next_chunks([a, b])
    with pytest.raises(InputError, match="Stream objects"):
        next_chunks([a, "b"])
    assert next_chunks([]) == []


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m["batch"].update(sizes=[2, 4]), r"start with 1"),
        (lambda m: m["batch"].update(sizes=[1, 4, 2]), r"ascending"),
        (lambda m: m["batch"]["graphs"].pop("4"), r"batch.graphs has sizes \['2'\]"),
        (lambda m: m["batch"]["graphs"]["2"].pop("dit_step"), r"batch.graphs.2 names"),
        (lambda m: m["batch"]["graphs"]["2"].update(dit_step="nope"), r"'nope', which is not in 'graphs'"),
        (lambda m: m["batch"].update(sizes="1,2"), r"batch.sizes"),
    ],
)
def test_bad_batch_section_is_refused(batched_bundle, tmp_path, change, message):
    _, path = batched_bundle
    copy = tmp_path / "bundle"
    shutil.copytree(path, copy)
    m = json.loads((copy / "manifest.json").read_text())
    change(m)
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match=message):
        Bundle.load(copy, verify_hashes=False)


def test_torch_backend_runs_rows_one_by_one(batched_bundle):
    pytest.importorskip("torch")
    model, _ = batched_bundle
    streamer = Streamer.load(model)
    assert streamer.backend.batch_sizes() == (1,)
    want = [alone(streamer, WORDS[i], i, 2) for i in range(2)]
    rows_seen = []
    gather = streamer.backend.gather
    streamer.backend.gather = lambda states: (rows_seen.append(len(states)), gather(states))[1]
    for g, w in zip(stepped_together(streamer, 2, 2), want):
        assert_same(g, w)
    assert rows_seen == []  # batch size 1: each stream through its own path


def test_serve_engine_steps_ready_sessions_together(batched_bundle):
    """LocalEngine with a batched bundle: concurrent sessions share calls and get their own frames; a
    session that stops asking (slow or gone) does not hold the others; closing a queued one is clean."""
    from rf_runtime.serve.engine import LocalEngine

    _, path = batched_bundle
    streamer = Streamer.from_engine(path)
    engine = LocalEngine(streamer, workers=1, jpeg_quality=90)
    assert engine.batcher is not None and engine.batcher.max_rows == 4
    want = [alone(streamer, WORDS[i], i, 4) for i in range(4)]

    async def session(i, chunks):
        handle = await engine.open(WORDS[i], i, None)
        frames = []
        for _ in range(chunks):
            result = await engine.step(handle, raw=True)
            frames.append(result.frames)
        return handle, frames

    async def main():
        # sessions 0-2 make 4 chunks; session 3 makes one and then stops asking (a slow client)
        return await asyncio.wait_for(
            asyncio.gather(session(0, 4), session(1, 4), session(2, 4), session(3, 1)), timeout=120
        )

    try:
        results = asyncio.run(main())
        for i, (_, frames) in enumerate(results):
            assert_same(frames, want[i][: len(frames)])
        assert engine.batcher.rows > engine.batcher.calls  # some calls had several rows
        handle = results[3][0]

        async def close_then_step():
            future = engine.batcher.submit(handle, None, True)
            await engine.close(handle)
            return await asyncio.wrap_future(future)

        assert asyncio.run(close_then_step()) is None  # a closed session's queued chunk: nothing, no error
    finally:
        engine.shutdown()


def test_serve_sessions_spread_over_the_workers_and_batch_within_each(batched_bundle):
    """Two workers, four sessions: each worker owns two sessions (the least loaded takes a new one), so
    no call holds more than two rows (12 chunks need at least 6 calls; one worker taking every waiting
    request could do it in 3), every session still gets its own frames, and closed sessions free
    their worker."""
    from rf_runtime.serve.engine import LocalEngine

    _, path = batched_bundle
    streamer = Streamer.from_engine(path, threads=1)
    engine = LocalEngine(streamer, workers=2, jpeg_quality=90)
    want = [alone(streamer, WORDS[i], i, 3) for i in range(4)]
    owners = []

    async def session(i):
        handle = await engine.open(WORDS[i], i, None)
        frames = [(await engine.step(handle, raw=True)).frames]
        owners.append(engine.batcher.sessions_per_worker())
        for _ in range(2):
            frames.append((await engine.step(handle, raw=True)).frames)
        return handle, frames

    async def main():
        results = await asyncio.wait_for(asyncio.gather(*(session(i) for i in range(4))), timeout=120)
        for handle, _ in results:
            await engine.close(handle)
        return results

    try:
        results = asyncio.run(main())
        for i, (_, frames) in enumerate(results):
            assert_same(frames, want[i])
        assert engine.batcher.rows == 12 and engine.batcher.calls >= 6
        assert owners[-1] == [2, 2]  # recorded after every session's first request: two per worker
        assert engine.batcher.sessions_per_worker() == [0, 0]
    finally:
        engine.shutdown()


def test_rf_bench_sessions_reports_the_batched_path_beside_the_threads(batched_bundle, tmp_path, capsys):
    from rf_runtime.cli import bench_main

    _, path = batched_bundle
    out = tmp_path / "s.json"
    n = 3
    assert (
        bench_main(["--bundle", str(path), "--chunks", str(n), "--sessions", "1,2,3", "--json", str(out)])
        == 0
    )
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    modes = [(c["sessions"], c["mode"]) for c in report["sessions"]]
    assert modes == [(1, "threads"), (2, "threads"), (2, "batched"), (3, "threads"), (3, "batched")]
    one = report["sessions"][0]
    for c in report["sessions"]:
        assert c["frames"] == c["sessions"] * (9 + 12 * (n - 1))  # every stream's every frame
        assert c["aggregate_fps"] == pytest.approx(c["frames"] / c["wall_s"])
        assert c["aggregate_over_one_session"] == pytest.approx(c["aggregate_fps"] / one["aggregate_fps"])
        assert 0 < c["latency_p50_s"] <= c["latency_p99_s"]
        if c["mode"] == "batched":
            assert c["batch_sizes"] == [1, 2, 4]
            assert c["workers"] == min(len(os.sched_getaffinity(0)), c["sessions"])  # one per core
            assert c["per_session_fps"] == pytest.approx([c["aggregate_fps"] / c["sessions"]] * c["sessions"])
    assert "batched" in table and "threads" in table


def test_verify_checks_batched_graphs_row_by_row(batched_bundle, monkeypatch):
    """rf-export verify on a bundle with batch sizes: each batch-B graph against the reference run
    row by row on B independent draws (rows joined on each tensor's own batch axis: axis 1 of the
    K/V, a new axis 0 of the cache-state mix; inputs of one shape in both graphs shared); rows put
    back in the wrong order fail."""
    from rf_runtime.export import verify

    model, bundle = batched_bundle
    graphs = ["cache_update_b2", "dit_step_b2", "vae_decode_b4", "vae_decode_first_b2"]
    rows = verify.verify_bundle(bundle, model, graphs=graphs, backends=["onnxruntime-cpu"])
    assert [r.graph for r in rows] == sorted(graphs)
    assert all(r.status == "PASS" and r.rel < 1e-4 for r in rows), rows

    assert verify._batch_axis((4, 1, 96, 4, 24), (4, 2, 96, 4, 24)) == (1, False)
    assert verify._batch_axis((6, 9), (2, 6, 9)) == (0, True)
    rng = np.random.default_rng(0)
    row_io = [("k", (3, 1, 5), np.float32), ("mix", (2, 3), np.float32), ("sigma", (1,), np.float32)]
    io = [("k", (3, 2, 5), np.float32), ("mix", (2, 2, 3), np.float32), ("sigma", (1,), np.float32)]
    draws = [{n: rng.standard_normal(s) for n, s, _ in row_io} for _ in range(2)]
    joined = verify._batch_rows([dict(d) for d in draws], io, row_io)
    assert joined["k"].shape == (3, 2, 5) and np.array_equal(joined["k"][:, 1:2], draws[1]["k"])
    back = verify._unbatch_rows(joined, io, row_io)
    assert np.array_equal(back[1]["mix"], draws[1]["mix"])
    assert np.array_equal(back[1]["sigma"], draws[0]["sigma"])  # shared: row 0's draw for every row

    join = verify._join_outputs
    monkeypatch.setattr(verify, "_join_outputs", lambda per_row, *a: join(per_row[::-1], *a))
    rows = verify.verify_bundle(bundle, model, graphs=["vae_decode_b2"], backends=["onnxruntime-cpu"])
    assert rows[0].status == "FAIL"


def test_a_stream_with_a_chunk_made_ahead_joins_a_batch(batched_bundle):
    """A stream that decoded beside its next chunk's steps (overlap) and then steps in a batch: the
    chunk made ahead is dropped and its noise drawn again, so the frames are still the stream's own."""
    _, path = batched_bundle
    on = Streamer.from_engine(path, overlap=True)
    off = Streamer.from_engine(path, overlap=False)
    want = [alone(off, WORDS[i], i, 5) for i in range(2)]
    streams = [on.open(WORDS[i], seed=i) for i in range(2)]
    got = [[next(streams[0]).frames, next(streams[0]).frames], []]
    assert streams[0]._ahead is not None  # chunk 2 was made ahead
    for _ in range(2):
        for i, c in enumerate(next_chunks(streams)):
            got[i].append(c.frames)
    got[0].append(next(streams[0]).frames)  # alone again, with overlap
    for _ in range(3):
        got[1].append(next(streams[1]).frames)
    for i in range(2):
        assert_same(got[i], want[i])
