"""How a session's messages and frames travel: the one interface ``Session`` talks to.

A transport gives the session the client's messages and carries the session's events and frames:

    message = await transport.receive()   # {"type": "websocket.receive", "text": ...} (or "bytes"),
                                          # or {"type": "websocket.disconnect"} once the client is gone
    await transport.send_text(event)      # a JSON event
    await transport.send_frame(frame)     # a ``session.Frame``, at its due time
    await transport.close(code, reason)

``raw_frames`` says which images the transport sends: False, JPEG bytes (``Frame.jpeg``); True, the
uint8 [H, W, 3] array (``Frame.pixels``) for a transport that encodes video itself (WebRTC,
``rf_runtime.serve.webrtc``). The message dicts are ASGI's WebSocket messages, so the WebSocket
transport passes them through as they come.
"""

from __future__ import annotations

import time

from rf_runtime.serve.protocol import pack_frame


class WebSocketTransport:
    """A Starlette ``WebSocket``: events as text messages, frames as binary messages (``pack_frame``)."""

    raw_frames = False

    def __init__(self, ws):
        self.ws = ws

    async def receive(self) -> dict:
        return await self.ws.receive()

    async def send_text(self, text: str) -> None:
        await self.ws.send_text(text)

    async def send_frame(self, frame) -> None:
        await self.ws.send_bytes(pack_frame(frame.jpeg, frame.chunk, frame.index, frame.made, time.time()))

    async def close(self, code: int, reason: str = "") -> None:
        await self.ws.close(code, reason)
