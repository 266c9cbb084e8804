"""One client session: a receiver (client messages), a producer (chunks, off the event loop) and a sender.

The client is reached through a transport (``rf_runtime.serve.transport``: a WebSocket, or a WebRTC
peer connection). The producer never waits for the client: it puts frames into the session's ``OutQueue``,
which holds at most ``queue_frames`` frames and drops the oldest beyond that (counted). The sender alone
writes to the transport, so a slow client slows only its own sender, and memory stays bounded. Paced streams
are kept on a timeline at the model's fps: the next chunk is made when the frames already made
would run out within one chunk's duration, and each frame is sent at its time on that timeline.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import dataclass

from rf_runtime.errors import RFError
from rf_runtime.serve.protocol import (
    ProtocolError,
    SetPrompt,
    Start,
    Stop,
    error_event,
    event,
    parse_client_message,
)

logger = logging.getLogger("rf_runtime")


@dataclass
class Frame:
    chunk: int
    index: int
    made: float
    jpeg: bytes | None  # the JPEG image, for a transport that sends JPEG (the WebSocket)
    due: float  # time.monotonic() at which to send it; 0: at once
    pixels: object = None  # the uint8 [H, W, 3] image, for a transport that encodes video (WebRTC)


@dataclass
class Event:
    text: str
    droppable: bool = False  # 'chunk' events of a client that does not read may be dropped


@dataclass
class Ended:
    """The ``ended`` event; its totals are filled in when it is sent, after every frame before it."""

    reason: str


@dataclass
class Close:
    code: int
    reason: str = ""


class QueueOverflow(Exception):
    """A client stopped reading: its session holds more undroppable events than allowed."""


class OutQueue:
    """Everything a session sends, in order; at most ``max_frames`` frames (oldest dropped first)."""

    def __init__(self, max_frames: int, max_events: int, on_drop):
        self.items: deque = deque()
        self.max_frames, self.max_events, self.on_drop = max_frames, max_events, on_drop
        self.frames = self.events = self.dropped_frames = self.dropped_events = 0
        self._ready = asyncio.Event()

    def _drop_first(self, kind) -> bool:
        for i, item in enumerate(self.items):
            if isinstance(item, Frame) if kind is Frame else (isinstance(item, Event) and item.droppable):
                del self.items[i]
                return True
        return False

    def put(self, item) -> None:
        self.items.append(item)
        if isinstance(item, Frame):
            self.frames += 1
            while self.frames > self.max_frames and self._drop_first(Frame):
                self.frames -= 1
                self.dropped_frames += 1
                self.on_drop()
        elif isinstance(item, (Event, Ended)):
            self.events += 1
            while self.events > self.max_events:
                if not self._drop_first(Event):
                    raise QueueOverflow
                self.events -= 1
                self.dropped_events += 1
        self._ready.set()

    def clear(self) -> None:
        self.items.clear()
        self.frames = self.events = 0

    def clear_frames(self) -> None:
        kept = [item for item in self.items if not isinstance(item, Frame)]
        self.items = deque(kept)
        self.frames = 0

    async def get(self):
        while not self.items:
            self._ready.clear()
            await self._ready.wait()
        item = self.items.popleft()
        if isinstance(item, Frame):
            self.frames -= 1
        elif isinstance(item, (Event, Ended)):
            self.events -= 1
        return item


class Session:
    """One client connection; ``run()`` returns when the connection is over and everything is freed."""

    def __init__(self, transport, server, sid: str):
        self.transport, self.server, self.sid = transport, server, sid
        self.config, self.engine, self.metrics = server.config, server.engine, server.metrics
        self.queue = OutQueue(
            self.config.queue_frames, self.config.max_events, self.metrics.frames_dropped.inc
        )
        self.producer: asyncio.Task | None = None
        self.pending: SetPrompt | None = None  # the prompt switch to apply before the next chunk
        self.last_activity = time.monotonic()  # the last client message, or the end of a stream
        self.frames_sent = 0
        self.closing = False
        self._abort = asyncio.Event()  # set when the client must be dropped without further ado

    # ---- the connection ----------------------------------------------------------------------------

    async def run(self) -> None:
        sender = asyncio.create_task(self._send_loop())
        watchdog = asyncio.create_task(self._idle_loop())
        try:
            await self._receive_loop()
        finally:
            await self._stop_producer()
            for task in (sender, watchdog):
                task.cancel()
            await asyncio.gather(sender, watchdog, return_exceptions=True)

    async def _receive_loop(self) -> None:
        abort = asyncio.ensure_future(self._abort.wait())
        try:
            while True:
                receive = asyncio.ensure_future(self.transport.receive())
                await asyncio.wait({receive, abort}, return_when=asyncio.FIRST_COMPLETED)
                if not receive.done():  # aborted: returning without a close frame drops the connection
                    receive.cancel()
                    return
                try:
                    message = receive.result()
                except Exception:  # the transport is gone
                    return
                if message["type"] == "websocket.disconnect":
                    return
                self.last_activity = time.monotonic()
                try:
                    await self._handle(message)
                except ProtocolError as exc:
                    self._send_event(error_event(exc.code, str(exc)))
        finally:
            abort.cancel()

    async def _handle(self, message: dict) -> None:
        if message.get("bytes") is not None:
            raise ProtocolError(
                "binary_not_accepted", "binary messages are not accepted: send JSON text messages"
            )
        text = message.get("text") or ""
        if (
            len(text) > self.config.max_message_bytes
            or len(text.encode("utf-8")) > self.config.max_message_bytes
        ):
            raise ProtocolError(
                "message_too_large",
                f"the message has more than {self.config.max_message_bytes} "
                "bytes: client messages are small JSON objects",
            )
        msg = parse_client_message(
            text, max_prompt_chars=self.config.max_prompt_chars, max_frames=self.server.max_stream_frames
        )
        if self.closing:
            return
        running = self.producer is not None and not self.producer.done()
        if isinstance(msg, Start):
            if running:
                raise ProtocolError(
                    "already_started",
                    "a stream is already running in this session: "
                    'send {"type": "stop"} first, or switch its prompt',
                )
            self.pending = None
            self.producer = asyncio.create_task(self._produce(msg))
        elif isinstance(msg, SetPrompt):
            if not running:
                raise ProtocolError("not_started", "no stream is running: send a 'start' message first")
            self.pending = msg
        elif isinstance(msg, Stop):
            if not running:
                raise ProtocolError("not_started", "no stream is running: there is nothing to stop")
            await self._stop_producer()
            self.queue.clear_frames()
            self._put(Ended("stopped"))

    def _send_event(self, text: str, droppable: bool = False) -> None:
        self._put(Event(text, droppable))

    def _put(self, item) -> None:
        try:
            self.queue.put(item)
        except QueueOverflow:  # its socket is full too (or the events would have gone out): drop it
            logger.warning("session %s: the client reads nothing; dropping the connection", self.sid)
            self.closing = True
            self.queue.clear()
            self._abort.set()

    async def _send_loop(self) -> None:
        try:
            while True:
                item = await self.queue.get()
                if isinstance(item, Close):
                    await self.transport.close(item.code, item.reason)
                    return
                if isinstance(item, Event):
                    await self.transport.send_text(item.text)
                    continue
                if isinstance(item, Ended):
                    await self.transport.send_text(
                        event(
                            "ended",
                            reason=item.reason,
                            frames_sent=self.frames_sent,
                            dropped_frames=self.queue.dropped_frames,
                        )
                    )
                    continue
                delay = item.due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                await self.transport.send_frame(item)
                self.frames_sent += 1
                self.metrics.frames_sent.inc()
        except asyncio.CancelledError:
            raise
        except Exception:  # the client went away while we sent: the receiver sees the disconnect
            logger.debug("session %s: send failed", self.sid, exc_info=True)

    async def _idle_loop(self) -> None:
        period = min(1.0, self.config.idle_seconds / 4)
        while True:
            await asyncio.sleep(period)
            running = self.producer is not None and not self.producer.done()
            if (
                not running
                and not self.closing
                and time.monotonic() - self.last_activity > self.config.idle_seconds
            ):
                self.closing = True
                self._put(Ended("idle"))
                self.queue.put(Close(1000, f"idle for {self.config.idle_seconds:g} s"))
                return

    async def shutdown(self) -> None:
        """Server shutdown: stop the stream, tell the client ``ended`` and close (the receiver then returns)."""
        if self.closing:
            return
        self.closing = True
        await self._stop_producer()
        self.queue.clear_frames()
        self._put(Ended("shutdown"))
        self.queue.put(Close(1001, "server shutting down"))

    # ---- the stream ----------------------------------------------------------------------------------

    async def _stop_producer(self) -> None:
        task, self.producer = self.producer, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _produce(self, start: Start) -> None:
        engine, model = self.engine, self.engine.model
        handle = None
        try:
            handle = await engine.open(start.prompt, start.seed, start.num_frames)
            self._send_event(
                event(
                    "started",
                    session=self.sid,
                    prompt=start.prompt,
                    seed=start.seed,
                    paced=start.paced,
                    num_frames=start.num_frames,
                    fps=model.fps,
                    width=model.width,
                    height=model.height,
                    engine=engine.name,
                )
            )
            raw = self.transport.raw_frames  # the transport encodes the frames itself
            chunk_span = model.chunk_frames / model.fps  # one chunk's duration on screen
            anchor_t, anchor_f = None, 0  # the timeline: frame f is due at anchor_t + (f - anchor_f) / fps
            made = 0
            while True:
                if start.paced and anchor_t is not None:
                    wait = anchor_t + (made - anchor_f) / model.fps - chunk_span - time.monotonic()
                    if wait > 0:
                        await asyncio.sleep(wait)
                switch, self.pending = self.pending, None
                result = await engine.step(handle, switch, raw=raw)
                if result is None:
                    break
                now = time.monotonic()
                if start.paced and (anchor_t is None or now > anchor_t + (made - anchor_f) / model.fps):
                    anchor_t, anchor_f = now, made  # late (or first): the timeline restarts here
                self.metrics.chunk_seconds.observe(result.seconds)
                for extra in result.events:  # from the engine: a failover ('resumed')
                    if extra["kind"] == "resumed":
                        self.metrics.failovers.inc()
                    self._send_event(event(**extra))
                if result.prompt_changed is not None:
                    self._send_event(
                        event("prompt_changed", prompt=result.prompt_changed, chunk=result.index)
                    )
                self._send_event(
                    event(
                        "chunk",
                        index=result.index,
                        start_frame=result.start_frame,
                        frames=result.num_frames,
                        seconds=result.seconds,
                        denoise_seconds=result.denoise_seconds,
                        decode_seconds=result.decode_seconds,
                        dropped_frames=self.queue.dropped_frames,
                    ),
                    droppable=True,
                )
                for i in range(result.num_frames):
                    f = result.start_frame + i
                    due = anchor_t + (f - anchor_f) / model.fps if start.paced else 0.0
                    jpeg, pixels = (None, result.frames[i]) if raw else (result.jpegs[i], None)
                    self.queue.put(Frame(result.index, f, result.made, jpeg, due, pixels))
                made = result.start_frame + result.num_frames
                if result.finished:
                    break
            self._put(Ended("finished"))
        except asyncio.CancelledError:
            raise
        except RFError as exc:
            self._send_event(error_event("stream_failed", str(exc)))
            self._put(Ended("error"))
        except Exception as exc:  # a bug or a dead worker: the session says so and lives on
            logger.exception("session %s: the stream failed", self.sid)
            self._send_event(error_event("internal", f"the stream failed: {type(exc).__name__}: {exc}"))
            self._put(Ended("error"))
        finally:
            self.last_activity = time.monotonic()  # idle time counts from the end of the stream
            if handle is not None:
                await engine.close(handle)
