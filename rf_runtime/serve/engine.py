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
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from rf_runtime.serve.protocol import SetPrompt, encode_jpeg


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


class LocalEngine:
    """Every session's ``Stream`` on one loaded ``Streamer``; chunks run in a pool of ``workers`` threads.

    The pool's queue is first in, first out and each session has at most one chunk in it at a time, so
    sessions take turns and a busy one cannot starve the others.
    """

    name = "local"

    def __init__(self, streamer, *, workers: int, jpeg_quality: int):
        self.streamer = streamer
        self.model = ModelSummary.of(streamer)
        self.jpeg_quality = jpeg_quality
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rf-serve-chunk")

    async def _run(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: fn(*args, **kwargs))

    async def open(self, prompt: str, seed: int, num_frames: int | None):
        return await self._run(self.streamer.open, prompt, seed=seed, num_frames=num_frames)

    async def step(self, handle, switch: SetPrompt | None = None, *, raw: bool = False) -> ChunkResult | None:
        return await self._run(make_chunk, handle, switch, raw=raw, jpeg_quality=self.jpeg_quality)

    async def close(self, handle) -> None:
        handle.close()  # a chunk still in a worker finishes on its own references and is discarded

    def load(self) -> int:
        return 0

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
