"""Where sessions' streams run: ``LocalEngine`` (one loaded ``Streamer``, chunks made in a thread pool).

An engine is what a session talks to; the session never touches a ``Stream`` itself:

    handle = await engine.open(prompt, seed, num_frames)
    result = await engine.step(handle, switch)     # switch: a SetPrompt applied before the chunk, or None
    await engine.close(handle)

``step`` makes one chunk off the event loop and returns a ``ChunkResult`` with its frames encoded as
JPEG (or raw, for MP4 jobs), or None once the stream has made all its frames. ``rf_runtime.serve.ray_engine``
has the same interface over Ray actors. Everything here uses the public ``Streamer`` / ``Stream`` API.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from rf_runtime.serve.protocol import SetPrompt, encode_jpeg

logger = logging.getLogger("rf_runtime")


@dataclass(frozen=True)
class ModelSummary:
    """What a client is told about the model in ``started``."""

    fps: int
    width: int
    height: int
    chunk_frames: int  # video frames of a steady-state chunk (12)

    @classmethod
    def of(cls, streamer) -> "ModelSummary":
        h, w = streamer.info.frame_hw
        return cls(streamer.fps, w, h, streamer.info.frames_of_chunk(1))


@dataclass(frozen=True)
class ChunkResult:
    index: int
    start_frame: int
    seconds: float  # Chunk.seconds: noise + denoise + cache pass + decode
    denoise_seconds: float
    decode_seconds: float
    made: float  # unix time when it was finished
    jpegs: tuple[bytes, ...] = ()
    frames: np.ndarray | None = None  # raw uint8 [T, H, W, 3] when asked for (MP4 jobs)
    prompt_changed: str | None = None  # the prompt that took effect at this chunk
    finished: bool = False  # the stream has made its last frame
    events: tuple[dict, ...] = field(default=())  # extra events for the client (a failover: 'resumed')

    @property
    def num_frames(self) -> int:
        return len(self.jpegs) if self.frames is None else len(self.frames)


def make_chunk(stream, switch: SetPrompt | None, *, raw: bool, jpeg_quality: int) -> ChunkResult | None:
    """Apply a prompt switch, then make the stream's next chunk (blocking; runs in a worker)."""
    if switch is not None:
        stream.set_prompt(switch.prompt, keep_sink=switch.keep_sink)
    chunk = next(stream, None)
    if chunk is None:
        return None
    return chunk_result(chunk, stream, switch, raw=raw, jpeg_quality=jpeg_quality)


def chunk_result(chunk, stream, switch: SetPrompt | None, *, raw: bool, jpeg_quality: int) -> ChunkResult:
    """A made ``Chunk`` as the session receives it (JPEG-encoded frames unless ``raw``)."""
    return ChunkResult(
        chunk.index,
        chunk.start_frame,
        chunk.seconds,
        chunk.denoise_seconds,
        chunk.decode_seconds,
        made=time.time(),
        jpegs=() if raw else tuple(encode_jpeg(f, jpeg_quality) for f in chunk.frames),
        frames=chunk.frames if raw else None,
        prompt_changed=None if switch is None else switch.prompt,
        finished=stream.finished,
    )


@dataclass
class _Request:
    stream: object
    switch: SetPrompt | None
    raw: bool
    future: Future


class Batcher:
    """Sessions' chunks stepped together (``rf_runtime.batching.next_chunks``) by ``workers`` threads.
    Each session belongs to one thread, the one with the fewest sessions when it first asks (so the
    sessions, and their batched calls, spread over the cores); a thread takes every request of its
    sessions waiting at that moment, up to ``max_rows``, and makes their chunks in one batched call per
    graph. A session asks for its next chunk only when it is ready for it, so a slow or vanished
    session is simply not in the next call: nobody waits for it."""

    def __init__(self, *, workers: int, max_rows: int, jpeg_quality: int):
        self.max_rows, self.jpeg_quality = max_rows, jpeg_quality
        self._pending: list[deque[_Request]] = [deque() for _ in range(workers)]
        self._home: dict[int, int] = {}  # id(stream) -> the thread its chunks run on
        self._cond = threading.Condition()
        self._stopped = False
        self._running: set[int] = set()  # the streams of the calls being made
        self._close_after: dict[int, object] = {}  # streams closed while in a call: closed after it
        self.calls = 0  # batched calls made (for tests and logs)
        self.rows = 0  # chunks made by them
        self._threads = [
            threading.Thread(target=self._loop, args=(i,), name=f"rf-serve-batch-{i}", daemon=True)
            for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    def sessions_per_worker(self) -> list[int]:
        with self._cond:
            return self._members()

    def _members(self) -> list[int]:
        counts = [0] * len(self._pending)
        for w in self._home.values():
            counts[w] += 1
        return counts

    def submit(self, stream, switch: SetPrompt | None, raw: bool) -> Future:
        request = _Request(stream, switch, raw, Future())
        with self._cond:
            if self._stopped:
                raise RuntimeError("the server is shutting down")
            home = self._home.get(id(stream))
            if home is None:
                counts = self._members()
                home = self._home[id(stream)] = counts.index(min(counts))
            self._pending[home].append(request)
            self._cond.notify_all()
        return request.future

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel the waiting requests and wait for the calls being made (a thread still inside
        onnxruntime when the interpreter exits would abort the process)."""
        with self._cond:
            self._stopped = True
            for queue in self._pending:
                for r in queue:
                    r.future.cancel()
                queue.clear()
            self._cond.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout)

    def _loop(self, worker: int) -> None:
        queue = self._pending[worker]
        while True:
            with self._cond:
                while not queue and not self._stopped:
                    self._cond.wait()
                if self._stopped:
                    return
                take = [queue.popleft() for _ in range(min(len(queue), self.max_rows))]
                self._running.update(id(r.stream) for r in take)
            try:
                self._step(take)
            except BaseException as exc:  # a bug: every request of the call learns of it, the thread lives on
                logger.exception("a batched chunk failed")
                for r in take:
                    if not r.future.done():
                        r.future.set_exception(exc)
            finally:
                with self._cond:
                    for r in take:
                        self._running.discard(id(r.stream))
                        if id(r.stream) in self._close_after:
                            self._close_after.pop(id(r.stream)).close()

    def close(self, stream) -> None:
        """Close a session's stream now, or right after the call it is a row of (its state is in use);
        its thread takes new sessions again."""
        with self._cond:
            self._home.pop(id(stream), None)
            if id(stream) in self._running:
                self._close_after[id(stream)] = stream
            else:
                stream.close()

    def _step(self, take: list[_Request]) -> None:
        from rf_runtime.batching import next_chunks

        ready = []
        for r in take:
            if not r.future.set_running_or_notify_cancel():
                continue  # the session went away while it waited
            try:
                if r.switch is not None and not r.stream.closed:
                    r.stream.set_prompt(r.switch.prompt, keep_sink=r.switch.keep_sink)
            except Exception as exc:
                r.future.set_exception(exc)
                continue
            if r.stream.closed or r.stream.finished:
                r.future.set_result(None)
            else:
                ready.append(r)
        if not ready:
            return
        chunks = next_chunks([r.stream for r in ready])
        self.calls += 1
        self.rows += len(ready)
        for r, chunk in zip(ready, chunks):
            if isinstance(chunk, BaseException):
                r.future.set_exception(chunk)
            else:
                r.future.set_result(
                    chunk_result(chunk, r.stream, r.switch, raw=r.raw, jpeg_quality=self.jpeg_quality)
                )


class LocalEngine:
    """Every session's ``Stream`` on one loaded ``Streamer``; chunks run in a pool of ``workers`` threads.

    The pool's queue is first in, first out and each session has at most one chunk in it at a time, so
    sessions take turns and a busy one cannot starve the others. With a bundle exported for batch sizes
    above 1 (``rf-export onnx --batch-sizes 1,2,4``) the sessions ready at a chunk boundary step together
    through one call of each graph instead (``Batcher``; ``batching=False`` turns it off).
    """

    name = "local"

    def __init__(self, streamer, *, workers: int, jpeg_quality: int, batching: bool | None = None):
        self.streamer = streamer
        self.model = ModelSummary.of(streamer)
        self.jpeg_quality = jpeg_quality
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rf-serve-chunk")
        sizes = streamer.backend.batch_sizes()
        self.batcher = None
        if batching is None:
            batching = max(sizes) > 1
        if batching:
            self.batcher = Batcher(workers=workers, max_rows=max(sizes), jpeg_quality=jpeg_quality)
            logger.info("sessions ready at a chunk boundary step together, up to %d per call", max(sizes))

    async def _run(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    async def open(self, prompt: str, seed: int, num_frames: int | None):
        return await self._run(self.streamer.open, prompt, seed=seed, num_frames=num_frames)

    async def step(self, handle, switch: SetPrompt | None = None, *, raw: bool = False) -> ChunkResult | None:
        if self.batcher is not None:
            return await asyncio.wrap_future(self.batcher.submit(handle, switch, raw))
        return await self._run(make_chunk, handle, switch, raw=raw, jpeg_quality=self.jpeg_quality)

    async def close(self, handle) -> None:
        if self.batcher is not None:
            self.batcher.close(handle)
            return
        handle.close()  # a chunk still in a worker finishes on its own references and is discarded

    def load(self) -> int:
        return 0

    def shutdown(self) -> None:
        if self.batcher is not None:
            self.batcher.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)
