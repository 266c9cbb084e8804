"""rf-serve against a real uvicorn server on 127.0.0.1 (ephemeral port) with a real WebSocket client.

The model is the shipped bundle (engines/procedural-world-64) through onnxruntime. Frames are checked
against the same model run through the public Streamer API in this process: a frame message's JPEG
must equal the JPEG of the reference frame byte for byte (Pillow's encoder is deterministic), which
means the frames are equal. Every loop has a deadline.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("onnxruntime")
httpx = pytest.importorskip("httpx")
from websockets.exceptions import ConnectionClosed  # noqa: E402
from websockets.sync.client import connect  # noqa: E402

from rf_runtime.serve.app import ServeApp, ServerThread  # noqa: E402
from rf_runtime.serve.config import ServeConfig  # noqa: E402
from rf_runtime.serve.engine import LocalEngine  # noqa: E402
from rf_runtime.serve.protocol import FRAME_HEADER, encode_jpeg, unpack_frame  # noqa: E402

QUALITY = ServeConfig().jpeg_quality
TIMEOUT = 60.0  # the longest any single wait may take on a loaded machine


@pytest.fixture(scope="module")
def streamer():
    from rf_runtime.streamer import Streamer

    return Streamer.load()


def serving(streamer, **config):
    engine = LocalEngine(streamer, workers=2, jpeg_quality=QUALITY)
    return ServerThread(ServeApp(engine, ServeConfig(**config)))


@pytest.fixture(scope="module")
def server(streamer):
    with serving(streamer, max_sessions=3, idle_seconds=30) as s:
        yield s


def recv(ws, timeout=TIMEOUT):
    """One message: a dict for an event, (FrameHeader, jpeg) for a frame."""
    msg = ws.recv(timeout=timeout)
    return json.loads(msg) if isinstance(msg, str) else unpack_frame(msg)


def recv_until(ws, kind: str, timeout=TIMEOUT):
    """Messages up to and including the first event of ``kind``."""
    out, deadline = [], time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(
                f"no {kind!r} event within {timeout} s; got {[m for m in out if isinstance(m, dict)]}"
            )
        m = recv(ws, left)
        out.append(m)
        if isinstance(m, dict) and m["type"] == kind:
            return out


def events(msgs, kind=None):
    return [m for m in msgs if isinstance(m, dict) and (kind is None or m["type"] == kind)]


def frames(msgs):
    return [m for m in msgs if not isinstance(m, dict)]


def start(ws, prompt="a red circle bouncing", **fields):
    ws.send(json.dumps({"type": "start", "prompt": prompt, **fields}))


def assert_streams(ws, n=3):
    """The session still serves: a short stream on it gives frames and ends."""
    start(ws, num_frames=n, paced=False)
    msgs = recv_until(ws, "ended")
    assert events(msgs, "ended")[0]["reason"] == "finished"
    assert len(frames(msgs)) == n


def reference_jpegs(streamer, prompt, seed, num_frames, switch_at=None, new_prompt=None):
    stream = streamer.open(prompt, seed=seed, num_frames=num_frames)
    out = []
    for chunk in stream:
        out += [encode_jpeg(f, QUALITY) for f in chunk.frames]
        if switch_at is not None and stream.chunk_index == switch_at:
            stream.set_prompt(new_prompt)
    return out


def readyz(server):
    return httpx.get(server.url + "/readyz", timeout=10).json()


def wait_sessions(server, n, timeout=10.0):
    deadline = time.monotonic() + timeout
    while readyz(server)["sessions"] != n:
        assert time.monotonic() < deadline, f"sessions did not become {n}: {readyz(server)}"
        time.sleep(0.05)


def rejected(server) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics", timeout=10).text
    return {
        sample.labels["reason"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "rf_serve_sessions_rejected_total"
    }


def metric(server, name, **headers):
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.url + "/metrics", headers=headers, timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"metric {name} not found")


# ---- streams ----------------------------------------------------------------------------------------


def test_stream_frames_equal_the_model_and_headers_count_up(server, streamer):
    with connect(server.ws_url) as ws:
        start(ws, "a red circle bouncing", seed=3, num_frames=10, paced=False)
        msgs = recv_until(ws, "ended")
    started = events(msgs, "started")[0]
    assert (started["fps"], started["width"], started["height"]) == (16, 64, 64)
    got = frames(msgs)
    assert [h.frame for h, _ in got] == list(range(10))
    chunks = [e["index"] for e in events(msgs, "chunk")]
    assert chunks == list(range(len(chunks)))
    assert sorted({h.chunk for h, _ in got}) == chunks
    assert all(h.made <= h.sent <= time.time() for h, _ in got)
    assert [j for _, j in got] == reference_jpegs(streamer, "a red circle bouncing", 3, 10)
    assert events(msgs, "ended")[0] == {
        "type": "ended",
        "reason": "finished",
        "frames_sent": 10,
        "dropped_frames": 0,
    }


def test_prompt_switch_takes_effect_at_the_reported_chunk(server, streamer):
    with connect(server.ws_url) as ws:
        start(ws, "a red circle bouncing", seed=1, num_frames=15, paced=False)
        msgs = recv_until(ws, "chunk")
        ws.send(json.dumps({"type": "prompt", "prompt": "a blue square sliding"}))
        msgs += recv_until(ws, "ended")
    (changed,) = events(msgs, "prompt_changed")
    assert changed["prompt"] == "a blue square sliding" and changed["chunk"] >= 1
    ref = reference_jpegs(
        streamer,
        "a red circle bouncing",
        1,
        15,
        switch_at=changed["chunk"],
        new_prompt="a blue square sliding",
    )
    plain = reference_jpegs(streamer, "a red circle bouncing", 1, 15)
    got = [j for _, j in frames(msgs)]
    assert got == ref
    assert got != plain  # the switch changed the video


def test_paced_frames_are_spaced_by_the_model_fps(server):
    with connect(server.ws_url) as ws:
        start(ws, num_frames=9, paced=True)
        msgs = recv_until(ws, "ended")
    got = frames(msgs)
    assert len(got) == 9
    # frame i of a chunk is due i/16 s after the chunk's timeline point, which is never before the chunk
    # was made: so it is sent no earlier than made + i/16 (event-loop delays only make it later)
    first = {}
    for h, _ in got:
        first.setdefault(h.chunk, h.frame)
    lags = [(h.frame - first[h.chunk], h.sent - h.made) for h, _ in got]
    assert all(lag >= i / 16 - 0.002 for i, lag in lags), lags
    assert max(i for i, _ in lags) >= 2  # chunks of several frames were checked


def test_stop_ends_and_the_session_can_start_again(server):
    with connect(server.ws_url) as ws:
        start(ws)  # unbounded
        recv_until(ws, "chunk")
        ws.send(json.dumps({"type": "stop"}))
        ended = events(recv_until(ws, "ended"), "ended")[0]
        assert ended["reason"] == "stopped"
        assert_streams(ws)


def test_idle_session_is_closed(streamer):
    with serving(streamer, idle_seconds=1.0) as s, connect(s.ws_url) as ws:
        start(ws, num_frames=24, paced=True)  # streams for 1.5 s or more, longer than the idle timeout
        assert events(recv_until(ws, "ended"), "ended")[0]["reason"] == "finished"
        ws.send(json.dumps({"type": "stop"}))  # a stream just ended: the session is not idle yet
        assert recv(ws, 10)["code"] == "not_started"
        t0 = time.monotonic()
        ended = recv(ws, 10)
        assert ended["type"] == "ended" and ended["reason"] == "idle"
        with pytest.raises(ConnectionClosed) as info:
            recv(ws, 10)
        assert info.value.rcvd.code == 1000
        assert 0.9 < time.monotonic() - t0 < 8
        wait_sessions(s, 0)


def raw_client(server, start_fields: dict, rcvbuf: int | None = None) -> socket.socket:
    """A WebSocket client on a bare socket: it handshakes, sends one 'start', and then does only what the test says."""
    import base64

    raw = socket.socket()
    if rcvbuf is not None:
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    raw.settimeout(10)
    raw.connect((server.host, server.port))
    key = base64.b64encode(os.urandom(16)).decode()
    raw.sendall(
        (
            f"GET /v1/stream HTTP/1.1\r\nHost: {server.host}:{server.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    response = b""
    while b"\r\n\r\n" not in response:
        response += raw.recv(1)
    assert b" 101 " in response.split(b"\r\n")[0]
    payload = json.dumps({"type": "start", "prompt": "a red circle", **start_fields}).encode()
    assert len(payload) < 126
    mask = os.urandom(4)
    raw.sendall(
        bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    )
    return raw


def vanish(raw: socket.socket) -> None:
    """Go away without a close frame: the kernel sends a reset."""
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    raw.close()


def test_slow_client_drops_frames_and_does_not_stall_another(streamer):
    # small kernel buffers on both ends, so that a client that reads nothing blocks the server's sends
    # within seconds (the frames are ~1 KB; loopback buffers would otherwise hold minutes of them)
    with ServerThread(
        ServeApp(
            LocalEngine(streamer, workers=2, jpeg_quality=QUALITY),
            ServeConfig(max_sessions=2, queue_frames=6),
        ),
        send_buffer_bytes=4096,
    ) as s:
        slow = raw_client(s, {"paced": False}, rcvbuf=4096)  # never reads
        deadline = time.monotonic() + 60
        while metric(s, "rf_serve_frames_dropped_total") == 0:
            assert time.monotonic() < deadline, "the slow client never dropped a frame"
            time.sleep(0.2)
        # the slow client is now losing frames; another session streams normally meanwhile
        with connect(s.ws_url) as fast:
            start(fast, num_frames=12, paced=False)
            msgs = recv_until(fast, "ended", timeout=120)
        assert len(frames(msgs)) == 12 and events(msgs, "ended")[0]["dropped_frames"] == 0
        assert [h.frame for h, _ in frames(msgs)] == list(range(12))
        dropped = metric(s, "rf_serve_frames_dropped_total")
        assert dropped > 0
        assert metric(s, "rf_serve_queue_frames") <= 6  # memory stays bounded by the queue
        time.sleep(1.0)
        assert metric(s, "rf_serve_frames_dropped_total") > dropped  # still generating for it, still dropping
        # it also sends junk without reading the error events: past 64 queued events the server drops it
        mask = b"\x00\x00\x00\x00"
        for _ in range(100):
            slow.sendall(bytes([0x81, 0x80 | 5]) + mask + b"junk!")
        wait_sessions(s, 0, timeout=10)
        slow.close()


# ---- bad input: each gets its error event, and the server (and the session) still serves ----------------


BAD_TEXT = [
    ("not json {", "bad_json"),
    ("[1, 2, 3]", "bad_message"),
    ('"just a string"', "bad_message"),
    ('{"type": "dance"}', "unknown_type"),
    ('{"prompt": "no type"}', "unknown_type"),
    ('{"type": "start"}', "bad_prompt"),
    ('{"type": "start", "prompt": "   "}', "bad_prompt"),
    ('{"type": "start", "prompt": 42}', "bad_prompt"),
    (json.dumps({"type": "start", "prompt": "x" * 1001}), "bad_prompt"),
    ('{"type": "start", "prompt": "a", "seed": -1}', "bad_field"),
    ('{"type": "start", "prompt": "a", "seed": "7"}', "bad_field"),
    ('{"type": "start", "prompt": "a", "num_frames": 0}', "bad_field"),
    ('{"type": "start", "prompt": "a", "paced": "yes"}', "bad_field"),
    ('{"type": "start", "prompt": "a", "colour": "red"}', "bad_field"),
    ('{"type": "prompt", "prompt": "before any start"}', "not_started"),
    ('{"type": "stop"}', "not_started"),
    ("[" * 100000 + "]" * 100000, "message_too_large"),
    (json.dumps({"type": "start", "prompt": "y" * (1 << 20)}), "message_too_large"),
]


@pytest.mark.parametrize("text,code", BAD_TEXT, ids=[c + str(i) for i, (_, c) in enumerate(BAD_TEXT)])
def test_bad_message_gets_an_error_event_and_the_session_lives_on(server, text, code):
    with connect(server.ws_url) as ws:
        ws.send(text)
        err = recv(ws)
        assert err["type"] == "error" and err["code"] == code, err
        assert err["message"]
        assert_streams(ws)


def test_binary_from_the_client_is_refused(server):
    with connect(server.ws_url) as ws:
        ws.send(b"\x00\x01 binary")
        err = recv(ws)
        assert (err["type"], err["code"]) == ("error", "binary_not_accepted")
        assert_streams(ws)


def test_deeply_nested_json_is_an_error_not_a_crash(server):
    with connect(server.ws_url) as ws:
        ws.send("[" * 5000 + "]" * 5000)  # under the size cap; json's recursion limit
        err = recv(ws)
        assert err["type"] == "error" and err["code"] in ("bad_json", "bad_message")
        assert_streams(ws)


def test_start_twice_is_refused_and_the_first_stream_goes_on(server):
    with connect(server.ws_url) as ws:
        start(ws, num_frames=9, paced=False)
        start(ws, "a second stream")
        msgs = recv_until(ws, "ended")
        errs = events(msgs, "error")
        assert [e["code"] for e in errs] == ["already_started"]
        assert len(frames(msgs)) == 9 and events(msgs, "ended")[0]["reason"] == "finished"


def test_message_above_the_websocket_limit_closes_only_that_connection(streamer):
    with serving(streamer, ws_max_bytes=64 * 1024) as s:
        with connect(s.ws_url) as ws:
            ws.send("z" * (200 * 1024))
            with pytest.raises(ConnectionClosed) as info:
                recv(ws, 10)
            assert info.value.rcvd.code == 1009  # message too big, from the WebSocket layer
        with connect(s.ws_url) as ws:
            assert_streams(ws)


def test_client_vanishing_mid_frame_frees_the_session_at_once(server):
    raw = raw_client(server, {"paced": False})
    got = b""
    while len(got) < 3000:  # part of the first frame messages, then vanish without a close frame
        got += raw.recv(1500)
    wait_sessions(server, 1)
    vanish(raw)
    wait_sessions(server, 0, timeout=5)
    with connect(server.ws_url) as ws:
        assert_streams(ws)


# ---- capacity, access ----------------------------------------------------------------------------------


def test_too_many_sessions_are_refused_and_a_leaving_one_frees_its_slot(streamer):
    with serving(streamer, max_sessions=1) as s:
        first = connect(s.ws_url).__enter__()
        wait_sessions(s, 1)
        assert httpx.get(s.url + "/readyz").status_code == 503
        with connect(s.ws_url) as second:
            err = recv(second, 10)
            assert (err["type"], err["code"]) == ("error", "server_full") and "1 of 1" in err["message"]
            with pytest.raises(ConnectionClosed) as info:
                recv(second, 10)
            assert info.value.rcvd.code == 1013
        job = httpx.post(s.url + "/v1/videos", json={"prompt": "a red circle", "seconds": 1})
        assert job.status_code == 503 and "server full" in job.json()["error"]
        assert rejected(s) == {"server_full": 2.0}
        first.__exit__(None, None, None)
        wait_sessions(s, 0, timeout=5)
        with connect(s.ws_url) as third:
            assert_streams(third)


def test_token_is_required_everywhere_but_health(streamer):
    with serving(streamer, token="s3cret") as s:
        assert httpx.get(s.url + "/healthz").status_code == 200
        assert httpx.get(s.url + "/readyz").status_code == 200
        for path in ("/", "/static/viewer.js", "/metrics", "/v1/info", "/v1/videos/job1"):
            r = httpx.get(s.url + path)
            assert r.status_code == 401 and "token" in r.json()["error"], path
            assert httpx.get(s.url + path, params={"token": "wrong"}).status_code == 401
        assert httpx.post(s.url + "/v1/videos", json={"prompt": "a", "seconds": 1}).status_code == 401
        assert httpx.get(s.url + "/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        page = httpx.get(s.url + "/", params={"token": "s3cret"})
        assert page.status_code == 200 and page.cookies.get("rf_serve_token") == "s3cret"
        for url in (s.ws_url, s.ws_url + "?token=wrong"):
            with connect(url) as ws:
                err = recv(ws, 10)
                assert (err["type"], err["code"]) == ("error", "unauthorized")
                with pytest.raises(ConnectionClosed) as info:
                    recv(ws, 10)
                assert info.value.rcvd.code == 1008
        with connect(s.ws_url + "?token=s3cret") as ws:
            assert_streams(ws)
        with connect(s.ws_url, additional_headers={"Authorization": "Bearer s3cret"}) as ws:
            assert_streams(ws)


# ---- HTTP: health, metrics, page, MP4 jobs ---------------------------------------------------------------


def test_metrics_count_what_the_client_received(streamer):
    with serving(streamer) as s:
        with connect(s.ws_url) as ws:
            start(ws, num_frames=7, paced=False)
            msgs = recv_until(ws, "ended")
        assert metric(s, "rf_serve_frames_sent_total") == len(frames(msgs)) == 7
        assert metric(s, "rf_serve_chunk_seconds_count") == len(events(msgs, "chunk"))
        assert metric(s, "rf_serve_frames_dropped_total") == 0
        assert metric(s, "process_resident_memory_bytes") > 10e6
        wait_sessions(s, 0)
        assert metric(s, "rf_serve_sessions_active") == 0


def test_page_is_served_from_package_data_without_external_urls(server):
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<canvas" in page.text and "static/viewer.js" in page.text
    for name, kind in (("viewer.js", "javascript"), ("viewer.css", "css")):
        r = httpx.get(server.url + "/static/" + name)
        assert r.status_code == 200 and kind in r.headers["content-type"]
        assert "http://" not in r.text and "https://" not in r.text  # no CDN
    assert "http://" not in page.text and "https://" not in page.text
    assert httpx.get(server.url + "/static/../app.py").status_code == 404


def test_mp4_job_makes_the_video(server, streamer):
    from rf_runtime.video import read_mp4

    r = httpx.post(
        server.url + "/v1/videos", json={"prompt": "a red circle bouncing", "seconds": 0.5, "seed": 2}
    )
    assert r.status_code == 202
    job = r.json()
    assert job["status"] in ("queued", "running") and job["frames_total"] == 8
    deadline = time.monotonic() + TIMEOUT
    while (status := httpx.get(server.url + job["status_url"]).json())["status"] != "done":
        assert status["status"] != "failed", status
        assert time.monotonic() < deadline
        time.sleep(0.1)
    video = httpx.get(server.url + status["video_url"])
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    path = os.path.join(server.serve_app.jobs_dir, "check.mp4")
    with open(path, "wb") as f:
        f.write(video.content)
    got = read_mp4(path)
    ref = np.concatenate(list(streamer.stream("a red circle bouncing", seed=2, num_frames=8)))
    assert got.shape == ref.shape == (8, 64, 64, 3)
    # H.264 is lossy: the decoded video is close to the frames, not equal (mean error in uint8 levels)
    assert np.abs(got.astype(float) - ref).mean() < 6


@pytest.mark.parametrize(
    "body,code",
    [
        ({"seconds": 1}, "bad_prompt"),
        ({"prompt": "a", "seconds": 0}, "bad_field"),
        ({"prompt": "a", "seconds": 10_000}, "bad_field"),
        ({"prompt": "a", "seconds": "5"}, "bad_field"),
        ({"prompt": "a", "seed": -3}, "bad_field"),
        ({"prompt": "a", "fps": 30}, "bad_field"),
        ([1, 2], "bad_message"),
    ],
)
def test_bad_job_request_is_400_with_the_reason(server, body, code):
    r = httpx.post(server.url + "/v1/videos", json=body)
    assert r.status_code == 400 and r.json()["code"] == code and r.json()["error"]


def test_job_errors_404_and_bad_json(server):
    assert httpx.get(server.url + "/v1/videos/job999").status_code == 404
    assert httpx.get(server.url + "/v1/videos/job999/video").status_code == 404
    r = httpx.post(server.url + "/v1/videos", content=b"{nope")
    assert r.status_code == 400 and r.json()["code"] == "bad_json"


# ---- the CLI: binds loopback, SIGTERM ends sessions gracefully ------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_sends_ended_to_every_session_and_exits(tmp_path):
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rf_runtime.serve.cli", "--port", str(port), "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + TIMEOUT
        while True:
            try:
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "rf-serve did not start"
            time.sleep(0.1)
        with (
            connect(f"ws://127.0.0.1:{port}/v1/stream") as a,
            connect(f"ws://127.0.0.1:{port}/v1/stream") as b,
        ):
            start(a)
            recv_until(a, "chunk")
            proc.send_signal(signal.SIGTERM)
            for ws in (a, b):
                ended = events(recv_until(ws, "ended", timeout=15), "ended")[0]
                assert ended["reason"] == "shutdown"
                with pytest.raises(ConnectionClosed) as info:
                    while True:
                        recv(ws, 15)
                assert info.value.rcvd.code == 1001
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_refuses_two_models_with_a_clear_error():
    from rf_runtime.serve.cli import main

    r = subprocess.run(
        [sys.executable, "-m", "rf_runtime.serve.cli", "--engine", "a", "--model-dir", "b"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "two models" in r.stderr and "Traceback" not in r.stderr
    assert main.__module__ == "rf_runtime.serve.cli"


def test_default_host_is_loopback():
    from rf_runtime.serve.cli import _parser

    assert _parser().parse_args([]).host == "127.0.0.1"


def test_frame_header_layout():
    from rf_runtime.serve.protocol import pack_frame

    data = pack_frame(b"JPEG", chunk=5, frame=70, made=1.5, sent=2.25)
    assert FRAME_HEADER.size == 28 and data[:4] == b"RF\x01\x1c" and data[28:] == b"JPEG"
    assert int.from_bytes(data[4:8], "little") == 5 and int.from_bytes(data[8:12], "little") == 70
    assert np.frombuffer(data[12:28], "<f8").tolist() == [1.5, 2.25]
