"""Headless MP4 jobs for the REST call: prompt + seconds in, a job with a status URL, then the MP4."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import os
from collections import OrderedDict
from dataclasses import dataclass

from rf_runtime.errors import RFError
from rf_runtime.serve.protocol import ProtocolError, check_prompt_text

logger = logging.getLogger("rf_runtime")


@dataclass
class Job:
    id: str
    prompt: str
    seed: int
    num_frames: int
    path: str
    status: str = "queued"  # queued -> running -> done | failed
    frames_done: int = 0
    error: str | None = None

    def describe(self, prefix: str) -> dict:
        out = {
            "id": self.id,
            "status": self.status,
            "prompt": self.prompt,
            "seed": self.seed,
            "frames_total": self.num_frames,
            "frames_done": self.frames_done,
            "status_url": f"{prefix}/{self.id}",
        }
        if self.status == "done":
            out["video_url"] = f"{prefix}/{self.id}/video"
        if self.error:
            out["error"] = self.error
        return out


def parse_job_request(body, *, max_prompt_chars: int, max_seconds: float, fps: int) -> tuple[str, int, int]:
    """A request body -> (prompt, seed, frames), or a ProtocolError naming the bad field."""
    if not isinstance(body, dict):
        raise ProtocolError("bad_message", 'the body must be a JSON object: {"prompt": "...", "seconds": 5}')
    extra = set(body) - {"prompt", "seconds", "seed"}
    if extra:
        raise ProtocolError(
            "bad_field", f"unknown field(s) {sorted(extra)}; a job takes prompt, seconds, seed"
        )
    if "prompt" not in body:
        raise ProtocolError("bad_prompt", "a job needs a 'prompt'")
    prompt = check_prompt_text(body["prompt"], max_prompt_chars)
    seconds = body.get("seconds", 5)
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, (int, float))
        or not math.isfinite(seconds)
        or not 0 < seconds <= max_seconds
    ):
        raise ProtocolError(
            "bad_field", f"'seconds' must be a number in (0, {max_seconds:g}], got {seconds!r}"
        )
    seed = body.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ProtocolError("bad_field", f"'seed' must be a non-negative integer, got {seed!r}")
    return prompt, seed, max(1, round(seconds * fps))


class Jobs:
    """Jobs of one server; the newest ``keep`` finished ones stay downloadable, older files are removed."""

    def __init__(self, engine, folder: str, keep: int, metrics):
        self.engine, self.folder, self.keep, self.metrics = engine, folder, keep, metrics
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.tasks: set[asyncio.Task] = set()
        self._ids = itertools.count(1)

    def submit(self, prompt: str, seed: int, num_frames: int, on_done) -> Job:
        jid = f"job{next(self._ids)}"
        job = Job(jid, prompt, seed, num_frames, os.path.join(self.folder, f"{jid}.mp4"))
        self.jobs[jid] = job
        task = asyncio.create_task(self._run(job))
        self.tasks.add(task)
        task.add_done_callback(lambda t: (self.tasks.discard(t), on_done()))
        self._forget_old()
        return job

    def _forget_old(self) -> None:
        finished = [j for j in self.jobs.values() if j.status in ("done", "failed")]
        for job in finished[: max(0, len(finished) - self.keep)]:
            del self.jobs[job.id]
            if os.path.exists(job.path):
                os.remove(job.path)

    async def _run(self, job: Job) -> None:
        from rf_runtime.video import Mp4Writer

        handle = writer = None
        try:
            job.status = "running"
            writer = Mp4Writer(job.path, fps=self.engine.model.fps)
            handle = await self.engine.open(job.prompt, job.seed, job.num_frames)
            while (result := await self.engine.step(handle, None, raw=True)) is not None:
                await asyncio.to_thread(writer.write, result.frames)
                job.frames_done += result.num_frames
                if result.finished:
                    break
            await asyncio.to_thread(writer.close)
            job.status = "done"
        except asyncio.CancelledError:
            job.status, job.error = "failed", "the server shut down before the video was finished"
            raise
        except Exception as exc:
            if not isinstance(exc, RFError):
                logger.exception("job %s failed", job.id)
            job.status, job.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            if job.status != "done" and writer is not None:
                writer.abort()
            if handle is not None:
                await self.engine.close(handle)
            self.metrics.jobs.labels(job.status).inc()
