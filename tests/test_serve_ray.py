"""rf-serve --ray: two model replicas (Ray actors) on a local CPU Ray cluster behind one real uvicorn ingress.

One replica is killed mid-stream; the session must go on from its last snapshot on the other and the
client's frames must equal those of the same stream run uninterrupted through the public Streamer API
(JPEG bytes equal), prompt switch included. Marked `ray` (`pytest -m ray` runs only these).
"""

from __future__ import annotations

import json
import time

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("starlette")
pytest.importorskip("onnxruntime")
from websockets.sync.client import connect  # noqa: E402

from rf_runtime.serve.app import ServeApp, ServerThread  # noqa: E402
from rf_runtime.serve.config import ServeConfig  # noqa: E402
from rf_runtime.serve.protocol import encode_jpeg, unpack_frame  # noqa: E402
from rf_runtime.serve.ray_engine import RayEngine  # noqa: E402

pytestmark = pytest.mark.ray
QUALITY = ServeConfig().jpeg_quality
SNAPSHOT_EVERY = 3


@pytest.fixture(scope="module")
def cluster():
    engine = RayEngine.start(
        replicas=2, snapshot_every=SNAPSHOT_EVERY, jpeg_quality=QUALITY, cpus_per_replica=0.25
    )  # a 1-CPU cluster that fits 4 replicas
    app = ServeApp(engine, ServeConfig(max_sessions=4, snapshot_every=SNAPSHOT_EVERY))
    with ServerThread(app) as server:
        yield server, engine
    assert not ray.is_initialized()  # the app's shutdown stopped the cluster it started


def recv(ws, timeout=60):
    msg = ws.recv(timeout=timeout)
    return json.loads(msg) if isinstance(msg, str) else unpack_frame(msg)


def test_sessions_are_placed_on_the_least_loaded_replica(cluster):
    server, engine = cluster
    with connect(server.ws_url) as a, connect(server.ws_url) as b:
        for ws in (a, b):
            ws.send(json.dumps({"type": "start", "prompt": "a red circle", "paced": False}))
            assert recv(ws)["type"] == "started"
        assert engine.load() == [1, 1]  # one each, not both on the first
        pids = ray.get([actor.pid.remote() for actor in engine.actors])
        assert len(set(pids)) == 2  # two processes
    deadline = time.monotonic() + 10
    while engine.load() != [0, 0]:
        assert time.monotonic() < deadline, engine.load()
        time.sleep(0.05)


def test_a_dead_replica_s_session_resumes_bit_exactly_on_the_other(cluster):
    from rf_runtime.streamer import Streamer

    server, engine = cluster
    total, switch_prompt = 30, "a blue square sliding"
    msgs = []
    with connect(server.ws_url) as ws:
        ws.send(
            json.dumps(
                {
                    "type": "start",
                    "prompt": "a red circle bouncing",
                    "seed": 4,
                    "num_frames": total,
                    "paced": False,
                }
            )
        )
        killed = False
        deadline = time.monotonic() + 90
        while not (msgs and isinstance(msgs[-1], dict) and msgs[-1]["type"] == "ended"):
            assert time.monotonic() < deadline, [m for m in msgs if isinstance(m, dict)]
            m = recv(ws)
            msgs.append(m)
            if isinstance(m, dict) and m["type"] == "chunk" and m["index"] == 1:
                ws.send(json.dumps({"type": "prompt", "prompt": switch_prompt}))
            if isinstance(m, dict) and m["type"] == "chunk" and m["index"] == 4 and not killed:
                (session,) = engine.sessions.values()
                victim = engine.actors[session.replica]
                ray.kill(victim, no_restart=True)  # the replica process dies mid-stream
                killed = True
    evs = [m for m in msgs if isinstance(m, dict)]
    (resumed,) = [e for e in evs if e["type"] == "resumed"]
    assert resumed["reason"].endswith("died") and resumed["from_chunk"] % SNAPSHOT_EVERY == 0
    assert resumed["from_chunk"] <= resumed["next_chunk"] <= resumed["from_chunk"] + SNAPSHOT_EVERY
    (changed,) = [e for e in evs if e["type"] == "prompt_changed"]
    assert evs[-1]["type"] == "ended" and evs[-1]["reason"] == "finished"
    frames = [m for m in msgs if not isinstance(m, dict)]
    assert [h.frame for h, _ in frames] == list(range(total))  # none lost, none twice

    # the same stream, uninterrupted, through the public API in this process
    stream = Streamer.load().open("a red circle bouncing", seed=4, num_frames=total)
    expected = []
    for chunk in stream:
        expected += [encode_jpeg(f, QUALITY) for f in chunk.frames]
        if stream.chunk_index == changed["chunk"]:
            stream.set_prompt(switch_prompt)
    assert [j for _, j in frames] == expected
    assert sum(engine.alive) == 1 and engine.failovers == 1

    # the ingress still serves, on the replica that is left
    with connect(server.ws_url) as ws:
        ws.send(json.dumps({"type": "start", "prompt": "a red circle", "num_frames": 3, "paced": False}))
        got = []
        while not got or not (isinstance(got[-1], dict) and got[-1]["type"] == "ended"):
            got.append(recv(ws))
        assert len([m for m in got if not isinstance(m, dict)]) == 3


def test_failover_replays_the_prompt_switches_made_since_the_snapshot(cluster):
    """Deterministic: snapshot after chunk 2, a prompt switch at chunk 4, the replica killed after chunk 4."""
    import asyncio

    from rf_runtime.serve.protocol import SetPrompt
    from rf_runtime.streamer import Streamer

    engine = RayEngine.start(replicas=2, snapshot_every=3, jpeg_quality=QUALITY, cpus_per_replica=0.25)
    assert not engine.owns_ray  # two more replicas on the cluster that is running

    async def run():
        session = await engine.open("a red circle bouncing", 7, None)
        out = []
        for _ in range(4):
            out += (await engine.step(session)).jpegs
        assert session.snapshot.chunk_index == 3 and session.switches == []
        out += (await engine.step(session, SetPrompt("a blue square sliding"))).jpegs  # chunk 4
        assert session.switches == [(4, SetPrompt("a blue square sliding"))]
        first = session.replica
        ray.kill(engine.actors[first], no_restart=True)
        result = await engine.step(session)  # chunk 5: fails over, replays 3 and 4 (with the switch) first
        (resumed,) = result.events
        assert resumed["from_chunk"] == 3 and resumed["replayed_chunks"] == 2 and resumed["replica"] != first
        out += result.jpegs
        for _ in range(2):
            out += (await engine.step(session)).jpegs
        await engine.close(session)
        return out

    try:
        got = asyncio.run(run())
    finally:
        engine.shutdown()
    stream = Streamer.load().open("a red circle bouncing", seed=7)
    expected = []
    for _ in range(8):
        if stream.chunk_index == 4:
            stream.set_prompt("a blue square sliding")
        expected += [encode_jpeg(f, QUALITY) for f in next(stream).frames]
    assert got == expected
    plain = Streamer.load().open("a red circle bouncing", seed=7)
    assert got[-3:] != [encode_jpeg(f, QUALITY) for f in [next(plain) for _ in range(8)][-1].frames]
