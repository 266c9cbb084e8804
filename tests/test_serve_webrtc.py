"""rf-serve's WebRTC sessions against a real uvicorn server on 127.0.0.1 with a real aiortc peer.

The client is an aiortc ``RTCPeerConnection`` in this process (a data channel for the messages, a
recvonly video transceiver), the model is the shipped bundle through onnxruntime. The frames are VP8
encoded, so they are compared with the same model run through the public Streamer API by PSNR: every
received frame, placed by its presentation time, must be within MIN_PSNR_DB of its own reference
frame and further from the frame after it (frames of a moving object differ, so a frame placed at the
wrong index fails). Media candidates are on 127.0.0.1 only (the server's ``--host``; the client the
same), and every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
pytest.importorskip("onnxruntime")
httpx = pytest.importorskip("httpx")
aiortc = pytest.importorskip("aiortc")

from rf_runtime.serve import webrtc  # noqa: E402
from rf_runtime.serve.app import ServeApp, ServerThread  # noqa: E402
from rf_runtime.serve.config import ServeConfig  # noqa: E402
from rf_runtime.serve.engine import LocalEngine  # noqa: E402

TIMEOUT = 60.0  # the longest any single wait may take on a loaded machine
# VP8 at aiortc's bitrate on the 64x64 frames: 35.6 dB at the worst (measured), neighbours <= 31.9
MIN_PSNR_DB = 33.0
PROMPT = "a red circle moving right on a black background"


@pytest.fixture(scope="module")
def streamer():
    from rf_runtime.streamer import Streamer

    return Streamer.load()


def serving(streamer, **config):
    return ServerThread(ServeApp(LocalEngine(streamer, workers=2, jpeg_quality=85), ServeConfig(**config)))


@pytest.fixture(scope="module")
def server(streamer):
    with serving(streamer, max_sessions=2, idle_seconds=30) as s:
        yield s


def reference(streamer, prompt, seed, n, switch=None):
    """The first ``n`` frames of the stream alone; ``switch`` = (chunk, prompt): set before that chunk."""
    stream, frames = streamer.open(prompt, seed=seed), []
    while len(frames) < n:
        if switch is not None and stream.chunk_index == switch[0]:
            stream.set_prompt(switch[1])
        frames.extend(next(stream).frames)
    stream.close()
    return np.stack(frames[:n])


def psnr(a, b) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 99.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


class Peer:
    """A WebRTC client of rf-serve: ``await Peer.connect(url)``, then ``send`` / ``event`` / ``frame``."""

    def __init__(self):
        from aiortc import RTCPeerConnection

        self.pc = RTCPeerConnection()
        self.channel = self.pc.createDataChannel("rf-serve")
        self.pc.addTransceiver("video", direction="recvonly")
        self.events: asyncio.Queue = asyncio.Queue()
        self.opened = asyncio.Event()
        self.track = asyncio.get_running_loop().create_future()
        self.channel.on("open", self.opened.set)
        self.channel.on("message", lambda m: self.events.put_nowait(json.loads(m)))
        self.pc.on("track", lambda t: self.track.done() or self.track.set_result(t))

    async def offer(self) -> dict:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        return {"type": "offer", "sdp": self.pc.localDescription.sdp}

    @classmethod
    async def connect(cls, url: str, headers=None) -> "Peer":
        from aiortc import RTCSessionDescription

        webrtc.restrict_candidates("127.0.0.1")  # the client's media on loopback, as the server's
        peer = cls()
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            r = await http.post(f"{url}/v1/webrtc/offer", json=await peer.offer(), headers=headers)
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["type"] == "answer" and answer["session"]
        await peer.pc.setRemoteDescription(RTCSessionDescription(answer["sdp"], answer["type"]))
        await asyncio.wait_for(peer.opened.wait(), TIMEOUT)
        return peer

    def send(self, **message) -> None:
        self.channel.send(json.dumps(message))

    async def event(self, kind: str) -> list[dict]:
        """Events up to and including the first of ``kind``."""
        out = []
        while not out or out[-1]["type"] != kind:
            out.append(await asyncio.wait_for(self.events.get(), TIMEOUT))
        return out

    async def frames(self, n: int, fps: int) -> np.ndarray:
        """``n`` frames, each at the stream index its presentation time gives (missing ones: None)."""
        track = await asyncio.wait_for(self.track, TIMEOUT)
        placed: dict[int, np.ndarray] = {}
        while len(placed) < n:
            f = await asyncio.wait_for(track.recv(), TIMEOUT)
            index = round(float(f.pts * f.time_base) * fps)
            placed[index] = f.to_ndarray(format="rgb24")
        return placed

    async def close(self) -> None:
        await self.pc.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 4 * TIMEOUT))


def check_frames(placed: dict, want: np.ndarray) -> None:
    assert set(placed) <= set(range(len(want))), sorted(placed)
    assert len(placed) >= len(want) - 2  # the encoder may skip a frame; none here in practice
    for i, got in placed.items():
        assert got.shape == want[i].shape
        own = psnr(got, want[i])
        assert own >= MIN_PSNR_DB, (i, own)
        if i + 1 < len(want):  # it is this frame, not a neighbour
            assert own > psnr(got, want[i + 1]), i


def test_webrtc_stream_frames_are_the_model_frames_and_events_match_the_websocket_protocol(server, streamer):
    n = 24
    want = reference(streamer, PROMPT, 3, n)

    async def main():
        peer = await Peer.connect(server.url)
        try:
            peer.send(type="start", prompt=PROMPT, seed=3, paced=False, num_frames=n)
            started = (await peer.event("started"))[-1]
            assert (started["width"], started["height"]) == (want.shape[2], want.shape[1])
            # aiortc's receiver hands a frame over when the next one starts arriving, so the last frame
            # of a finished stream stays in its jitter buffer: n - 1 frames come out
            placed = await peer.frames(n - 1, started["fps"])
            events = await peer.event("ended")
            return started, placed, events
        finally:
            await peer.close()

    started, placed, events = run(main())
    assert started["prompt"] == PROMPT and started["seed"] == 3
    check_frames(placed, want)
    chunks = [e for e in events if e["type"] == "chunk"]
    assert sum(c["frames"] for c in chunks) == n  # the chunks that made them
    assert events[-1]["reason"] == "finished" and events[-1]["frames_sent"] == n


def test_webrtc_prompt_switch_on_the_data_channel(server, streamer):
    other = "a green square moving up on a white background"

    async def main():
        peer = await Peer.connect(server.url)
        try:
            peer.send(type="start", prompt=PROMPT, seed=1, paced=True)
            started = (await peer.event("started"))[-1]
            await peer.event("chunk")
            peer.send(type="prompt", prompt=other)
            changed = (await peer.event("prompt_changed"))[-1]
            peer.send(type="stop")
            ended = (await peer.event("ended"))[-1]
            return started, changed, ended
        finally:
            await peer.close()

    started, changed, ended = run(main())
    assert changed["prompt"] == other and changed["chunk"] >= 1
    assert ended["reason"] == "stopped"


def test_bad_offers_are_400_with_the_reason(server):
    async def main():
        from aiortc import RTCPeerConnection

        webrtc.restrict_candidates("127.0.0.1")
        no_channel = RTCPeerConnection()
        no_channel.addTransceiver("video", direction="recvonly")
        await no_channel.setLocalDescription(await no_channel.createOffer())
        sdp = no_channel.localDescription.sdp
        await no_channel.close()
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            post = lambda **kw: http.post(f"{server.url}/v1/webrtc/offer", **kw)  # noqa: E731
            return [
                await post(json={"type": "offer", "sdp": sdp}),
                await post(json={"type": "answer", "sdp": sdp}),
                await post(json={"type": "offer", "sdp": "hello"}),
                await post(json=["offer"]),
                await post(content=b"{not json"),
            ]

    replies = run(main())
    assert [r.status_code for r in replies] == [400] * 5
    assert (
        replies[0].json()["code"] == "no_data_channel" and "createDataChannel" in replies[0].json()["error"]
    )
    assert "'type' must be 'offer'" in replies[1].json()["error"]
    assert "session description" in replies[2].json()["error"]
    assert "JSON object" in replies[3].json()["error"]
    assert "not JSON" in replies[4].json()["error"]
    assert server.serve_app.active == 0  # nothing was held by a refused offer


def test_webrtc_sessions_count_against_max_sessions_and_a_closed_peer_frees_its_slot(streamer):
    async def main():
        first = await Peer.connect(server.url)
        try:
            async with httpx.AsyncClient(timeout=TIMEOUT) as http:
                probe = Peer()
                full = await http.post(f"{server.url}/v1/webrtc/offer", json=await probe.offer())
                await probe.close()
        finally:
            await first.close()
        for _ in range(int(TIMEOUT / 0.05)):  # the server sees the peer go and frees the slot
            if server.serve_app.active == 0:
                break
            await asyncio.sleep(0.05)
        freed = server.serve_app.active
        again = await Peer.connect(server.url)
        await again.close()
        return full, freed

    with serving(streamer, max_sessions=1) as server:
        full, freed = run(main())
    assert full.status_code == 503 and full.json()["code"] == "server_full"
    assert freed == 0


def test_webrtc_offer_needs_the_token(streamer):
    async def main():
        webrtc.restrict_candidates("127.0.0.1")
        probe = Peer()
        offer = await probe.offer()
        await probe.close()
        async with httpx.AsyncClient(timeout=TIMEOUT) as http:
            return await http.post(f"{server.url}/v1/webrtc/offer", json=offer)

    with serving(streamer, token="letmein") as server:
        refused = run(main())
        peer_ok = run(_connect_and_close(server.url, {"Authorization": "Bearer letmein"}))
    assert refused.status_code == 401
    assert peer_ok


async def _connect_and_close(url, headers) -> bool:
    peer = await Peer.connect(url, headers=headers)
    await peer.close()
    return True


def test_offer_parsing_names_the_fix():
    ok = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\n"
    assert webrtc.parse_offer({"type": "offer", "sdp": ok})["sdp"] == ok
    with pytest.raises(webrtc.ProtocolError, match="addTransceiver"):
        webrtc.parse_offer({"type": "offer", "sdp": ok.replace("m=video", "m=audio")})
    with pytest.raises(webrtc.ProtocolError, match="unknown field"):
        webrtc.parse_offer({"type": "offer", "sdp": ok, "x": 1})
    with pytest.raises(webrtc.ProtocolError, match="more than"):
        webrtc.parse_offer({"type": "offer", "sdp": ok + "a=x\r\n" * 20000})
