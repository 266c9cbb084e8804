"""Scale-out on Ray: N model replicas (Ray actors) behind one rf-serve ingress, with failover from snapshots.

    engine = RayEngine.start(replicas=2, snapshot_every=4)     # a local Ray cluster, or address="ray://..."
    ServeApp(engine, ServeConfig(...))                          # the same app, sessions and protocol

- Session affinity: a session lives on one replica, chosen when it opens as the one with the fewest
  sessions (least loaded); every chunk of that session runs there.
- Snapshots: every ``snapshot_every`` chunks the replica returns ``Stream.save_state()`` with the chunk,
  and the ingress keeps the latest one, plus the prompt switches made since.
- Failover: when a call to a replica fails because the replica died, the session is resumed on the least
  loaded live replica with ``Streamer.resume(snapshot)`` (or reopened from its prompt and seed if no
  snapshot was taken yet); the chunks made since the snapshot are made again there, with the same prompt
  switches at the same chunks, and not sent twice. ``resume`` continues bit-exactly, so the client's
  frames are the frames of the uninterrupted stream; it is told in a ``resumed`` event.

Each replica is an ordinary ``Streamer`` (``Streamer.load``) in a Ray actor.
"""

from __future__ import annotations

import itertools
import logging
import os
from dataclasses import dataclass, field, replace

from rf_runtime.errors import RFError, require
from rf_runtime.serve.engine import ChunkResult, ModelSummary, make_chunk
from rf_runtime.serve.protocol import SetPrompt

logger = logging.getLogger("rf_runtime")


class ReplicaError(RFError):
    """No live replica can take a session."""


class Replica:
    """One model replica: a Streamer and the streams of the sessions placed on it (runs as a Ray actor)."""

    def __init__(
        self,
        engine: str | None,
        model_dir: str | None,
        checkpoint: str | None,
        device: str,
        jpeg_quality: int,
    ):
        from rf_runtime.serve.cli import load_streamer

        self.streamer = load_streamer(engine, model_dir, checkpoint, device)
        self.jpeg_quality = jpeg_quality
        self.streams = {}

    def summary(self) -> ModelSummary:
        return ModelSummary.of(self.streamer)

    def pid(self) -> int:
        return os.getpid()

    def open(self, sid: str, prompt: str, seed: int, num_frames: int | None) -> None:
        self.streams[sid] = self.streamer.open(prompt, seed=seed, num_frames=num_frames)

    def resume(self, sid: str, snapshot) -> None:
        self.streams[sid] = self.streamer.resume(snapshot)

    def catch_up(self, sid: str, until_chunk: int, switches: list[tuple[int, SetPrompt]]) -> int:
        """Make the stream's chunks up to ``until_chunk`` again (discarded), with the same prompt switches."""
        stream = self.streams[sid]
        pending = dict(switches)
        while stream.chunk_index < until_chunk:
            switch = pending.pop(stream.chunk_index, None)
            if switch is not None:
                stream.set_prompt(switch.prompt, keep_sink=switch.keep_sink)
            if next(stream, None) is None:
                break
        return stream.chunk_index

    def step(self, sid: str, switch: SetPrompt | None, raw: bool, snapshot: bool):
        stream = self.streams[sid]
        result = make_chunk(stream, switch, raw=raw, jpeg_quality=self.jpeg_quality)
        snap = stream.save_state() if snapshot and result is not None and not stream.finished else None
        return result, snap

    def close(self, sid: str) -> None:
        stream = self.streams.pop(sid, None)
        if stream is not None:
            stream.close()


@dataclass
class RaySession:
    """The ingress's record of one session: where it lives and what a failover resumes from."""

    sid: str
    prompt: str
    seed: int
    num_frames: int | None
    replica: int
    chunks_made: int = 0  # chunks delivered so far
    snapshot: object = None  # StreamSnapshot after chunk snapshot.chunk_index - 1, or None (from the start)
    switches: list = field(default_factory=list)  # (chunk index, SetPrompt) since the snapshot


class RayEngine:
    """Sessions on Ray actor replicas; same interface as ``LocalEngine`` (open / step / close)."""

    name = "ray"

    def __init__(self, actors: list, model: ModelSummary, snapshot_every: int, *, owns_ray: bool = False):
        self.actors = list(actors)
        self.alive = [True] * len(actors)
        self.model = model
        self.snapshot_every = snapshot_every
        self.sessions_on = [0] * len(actors)
        self.sessions: dict[str, RaySession] = {}  # open sessions by id
        self.owns_ray = owns_ray
        self._ids = itertools.count(1)
        self.failovers = 0

    @classmethod
    def start(
        cls,
        replicas: int = 2,
        *,
        engine: str | None = None,
        model_dir: str | None = None,
        checkpoint: str | None = None,
        device: str = "cpu",
        jpeg_quality: int = 85,
        snapshot_every: int = 4,
        address: str | None = None,
        cpus_per_replica: float = 1.0,
    ) -> "RayEngine":
        """Start ``replicas`` actors (on a new local Ray cluster unless ``address`` names one) and wait until loaded."""
        ray = require("ray", "ray")
        if not isinstance(replicas, int) or replicas < 1:
            raise RFError(f"--replicas must be a positive integer, got {replicas!r}")
        owns = not ray.is_initialized()
        if owns:
            kwargs = (
                {"address": address} if address else {"num_cpus": max(1, int(replicas * cpus_per_replica))}
            )
            ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kwargs)
        actor = ray.remote(num_cpus=cpus_per_replica, max_restarts=0, max_concurrency=2)(Replica)
        actors = [actor.remote(engine, model_dir, checkpoint, device, jpeg_quality) for _ in range(replicas)]
        model = ray.get(actors[0].summary.remote())
        ray.get([a.pid.remote() for a in actors])  # every replica loaded
        return cls(actors, model, snapshot_every, owns_ray=owns)

    # ---- placement ------------------------------------------------------------------------------------

    def least_loaded(self) -> int:
        live = [i for i, ok in enumerate(self.alive) if ok]
        if not live:
            raise ReplicaError("every model replica has died: restart rf-serve --ray")
        return min(live, key=lambda i: (self.sessions_on[i], i))

    def load(self) -> list[int]:
        return list(self.sessions_on)

    def _place(self, session: RaySession, replica: int) -> None:
        self.sessions_on[session.replica] -= 1
        session.replica = replica
        self.sessions_on[replica] += 1

    @staticmethod
    def _died(exc: BaseException) -> bool:
        import ray.exceptions as rex

        return isinstance(exc, (rex.RayActorError, rex.ActorUnavailableError))

    # ---- the engine interface ----------------------------------------------------------------------------

    async def open(self, prompt: str, seed: int, num_frames: int | None) -> RaySession:
        session = RaySession(f"s{next(self._ids)}", prompt, seed, num_frames, replica=self.least_loaded())
        self.sessions_on[session.replica] += 1
        while True:
            try:
                await self.actors[session.replica].open.remote(session.sid, prompt, seed, num_frames)
                self.sessions[session.sid] = session
                return session
            except Exception as exc:
                if not self._died(exc):
                    self.sessions_on[session.replica] -= 1
                    raise _unwrap(exc) from None
                self._mark_dead(session.replica)
                self._place(session, self.least_loaded())

    async def step(
        self, session: RaySession, switch: SetPrompt | None = None, *, raw: bool = False
    ) -> ChunkResult | None:
        events = []
        snapshot = (session.chunks_made + 1) % self.snapshot_every == 0
        while True:
            try:
                result, snap = await self.actors[session.replica].step.remote(
                    session.sid, switch, raw, snapshot
                )
                break
            except Exception as exc:
                if not self._died(exc):
                    raise _unwrap(exc) from None
                events.append(await self._failover(session))
        if result is None:
            return None
        session.chunks_made = result.index + 1
        if switch is not None:
            session.switches.append((result.index, switch))
        if snap is not None:
            session.snapshot, session.switches = snap, []
        return replace(result, events=tuple(events)) if events else result

    async def _failover(self, session: RaySession) -> dict:
        """Resume ``session`` on a live replica from its last snapshot; the event that tells the client so."""
        dead = session.replica
        self._mark_dead(dead)
        while True:
            self._place(session, self.least_loaded())
            actor = self.actors[session.replica]
            try:
                if session.snapshot is not None:
                    await actor.resume.remote(session.sid, session.snapshot)
                else:
                    await actor.open.remote(session.sid, session.prompt, session.seed, session.num_frames)
                await actor.catch_up.remote(session.sid, session.chunks_made, session.switches)
                break
            except Exception as exc:
                if not self._died(exc):
                    raise _unwrap(exc) from None
                self._mark_dead(session.replica)
        self.failovers += 1
        start = 0 if session.snapshot is None else session.snapshot.chunk_index
        logger.warning(
            "session %s: replica %d died; resumed on replica %d from chunk %d",
            session.sid,
            dead,
            session.replica,
            start,
        )
        return {
            "kind": "resumed",
            "reason": f"replica {dead} died",
            "replica": session.replica,
            "from_chunk": start,
            "replayed_chunks": session.chunks_made - start,
            "next_chunk": session.chunks_made,
        }

    def _mark_dead(self, replica: int) -> None:
        if self.alive[replica]:
            self.alive[replica] = False
            logger.error("model replica %d is dead; its sessions move to the others", replica)

    async def close(self, session: RaySession) -> None:
        self.sessions.pop(session.sid, None)
        self.sessions_on[session.replica] -= 1
        if self.alive[session.replica]:
            try:
                await self.actors[session.replica].close.remote(session.sid)
            except Exception:  # the replica died meanwhile: nothing left to free
                pass

    def shutdown(self) -> None:
        import ray

        for actor, ok in zip(self.actors, self.alive):
            if ok:
                ray.kill(actor)
        if self.owns_ray:
            ray.shutdown()


def _unwrap(exc: BaseException) -> BaseException:
    """A replica's RFError (a bad prompt, ...) arrives wrapped in a RayTaskError: give back the original."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc
