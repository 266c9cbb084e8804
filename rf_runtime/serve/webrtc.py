"""WebRTC sessions (optional; ``pip install 'rf_runtime[webrtc]'``, which brings aiortc): the session of
``/v1/stream`` with its frames as a video track and its messages on a data channel.

    POST /v1/webrtc/offer   {"type": "offer", "sdp": "..."}
                         -> {"type": "answer", "sdp": "...", "session": "..."}

The client's offer has a video transceiver that receives (``recvonly``) and one data channel (any
label). On the data channel go the client messages of ``/v1/stream`` (``start``, ``prompt``,
``stop``) and come its JSON events (``started``, ``chunk``, ``prompt_changed``, ``error``,
``ended``); the frames come on the video track (VP8 or H.264, whichever the offer prefers), frame
``i`` of the stream with the presentation time ``i / fps`` s after the stream's first frame (90 kHz
clock). Pacing, the bounded frame queue, dropped-frame counting, prompt switches, idle time-outs,
``--max-sessions`` and ``--token`` are the WebSocket session's (``rf_runtime.serve.session``): only
the transport differs.

A server bound to one address (``--host 127.0.0.1``, the default) offers media candidates on that
address only, so the media goes where the HTTP endpoint does; ``--host 0.0.0.0`` offers every
interface. (aiortc gathers every interface but loopback and has no setting for it: the one function
of aioice that lists the addresses is replaced, process-wide, by ``restrict_candidates``.)
"""

from __future__ import annotations

import asyncio
import fractions
import ipaddress
import logging

from rf_runtime.serve.protocol import ProtocolError

logger = logging.getLogger("rf_runtime")

CLOCK = 90_000  # RTP video clock, Hz
MAX_SDP_BYTES = 64 * 1024
DISCONNECT = {"type": "websocket.disconnect"}


def available() -> bool:
    """Whether aiortc (and PyAV, which it brings) can be imported."""
    try:
        import aiortc  # noqa: F401
        import av  # noqa: F401
    except ImportError:
        return False
    return True


def parse_offer(body) -> dict:
    """The JSON body of ``POST /v1/webrtc/offer``, checked: ``{"type": "offer", "sdp": str}``."""
    if not isinstance(body, dict):
        raise ProtocolError("bad_offer", 'the body must be a JSON object {"type": "offer", "sdp": "..."}')
    extra = set(body) - {"type", "sdp"}
    if extra:
        raise ProtocolError("bad_offer", f"unknown field(s) {sorted(extra)}: an offer has 'type' and 'sdp'")
    if body.get("type") != "offer":
        raise ProtocolError("bad_offer", f"'type' must be 'offer', got {body.get('type')!r}")
    sdp = body.get("sdp")
    if not isinstance(sdp, str) or not sdp.startswith("v=0"):
        raise ProtocolError(
            "bad_offer", "'sdp' must be the offer's session description (text starting 'v=0')"
        )
    if len(sdp.encode("utf-8")) > MAX_SDP_BYTES:
        raise ProtocolError("bad_offer", f"the offer's sdp has more than {MAX_SDP_BYTES} bytes")
    if "m=application" not in sdp:
        raise ProtocolError(
            "no_data_channel",
            "the offer has no data channel: create one (pc.createDataChannel) before createOffer; "
            "the session's messages travel on it",
        )
    if "m=video" not in sdp:
        raise ProtocolError(
            "no_video",
            "the offer receives no video: add a transceiver (pc.addTransceiver('video', "
            "{direction: 'recvonly'})) before createOffer",
        )
    return {"type": "offer", "sdp": sdp}


def restrict_candidates(host: str) -> None:
    """Offer media candidates on ``host`` only when it is one address (not 0.0.0.0 / ::); see the module."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # a name: leave aiortc's choice
        return
    if address.is_unspecified:
        return
    import aioice.ice

    aioice.ice.get_host_addresses = lambda use_ipv4, use_ipv6: [str(address)]


def _video_track_class():
    from aiortc import MediaStreamTrack
    from aiortc.mediastreams import MediaStreamError

    class FrameTrack(MediaStreamTrack):
        """The session's frames as a video track: ``put`` waits while the encoder has not taken the last
        one, so a slow peer slows the session's sender, whose bounded queue drops (and counts) frames."""

        kind = "video"

        def __init__(self, fps: int):
            super().__init__()
            self.fps = fps
            self._frames: asyncio.Queue = asyncio.Queue(maxsize=1)
            self._first: int | None = None

        async def put(self, frame) -> None:
            await self._frames.put(frame)

        async def recv(self):
            import av

            if self.readyState != "live":
                raise MediaStreamError
            frame = await self._frames.get()
            if frame is None:
                raise MediaStreamError
            if self._first is None:
                self._first = frame.index
            video = av.VideoFrame.from_ndarray(frame.pixels, format="rgb24")
            video.pts = round((frame.index - self._first) * CLOCK / self.fps)
            video.time_base = fractions.Fraction(1, CLOCK)
            return video

        def stop(self) -> None:
            if self._frames.empty():
                self._frames.put_nowait(None)  # a recv() that waits returns
            super().stop()

    return FrameTrack


class RTCTransport:
    """A peer connection as a session transport (``rf_runtime.serve.transport``): messages on its data
    channel, frames (raw, ``raw_frames``) on its video track."""

    raw_frames = True

    def __init__(self, pc, track):
        self.pc, self.track = pc, track
        self.channel = None
        self._inbox: asyncio.Queue = asyncio.Queue()
        self._closed = False

        @pc.on("datachannel")
        def _on_channel(channel):
            if self.channel is not None:  # one channel carries the session; another is refused
                channel.close()
                return
            self.channel = channel

            @channel.on("message")
            def _on_message(message):
                key = "text" if isinstance(message, str) else "bytes"
                self._inbox.put_nowait({"type": "websocket.receive", key: message})

            @channel.on("close")
            def _on_close():
                self._inbox.put_nowait(DISCONNECT)

        @pc.on("connectionstatechange")
        def _on_state():
            if pc.connectionState in ("failed", "closed"):
                self._inbox.put_nowait(DISCONNECT)

    async def receive(self) -> dict:
        return await self._inbox.get()

    async def send_text(self, text: str) -> None:
        if self.channel is not None and self.channel.readyState == "open":
            self.channel.send(text)

    async def send_frame(self, frame) -> None:
        if self.pc.connectionState != "closed":
            await self.track.put(frame)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self._closed:
            return
        self._closed = True
        self.track.stop()
        await self.pc.close()
        self._inbox.put_nowait(DISCONNECT)


async def accept(offer: dict, fps: int) -> tuple[RTCTransport, dict]:
    """A peer connection that answers ``offer`` (``parse_offer``) with a video track at ``fps``: its
    transport and the answer (``{"type": "answer", "sdp": ...}``, all candidates gathered)."""
    from aiortc import RTCPeerConnection, RTCSessionDescription

    pc = RTCPeerConnection()
    track = _video_track_class()(fps)
    transport = RTCTransport(pc, track)
    try:
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer["sdp"], type="offer"))
        pc.addTrack(track)  # on the offer's video transceiver
        answer = await pc.createAnswer()
        await pc.setLocalDescription(answer)
    except ProtocolError:
        await transport.close()
        raise
    except Exception as exc:  # an offer aiortc cannot answer (codecs, malformed lines)
        await transport.close()
        raise ProtocolError(
            "bad_offer", f"the offer cannot be answered: {type(exc).__name__}: {exc}"
        ) from exc
    return transport, {"type": pc.localDescription.type, "sdp": pc.localDescription.sdp}
