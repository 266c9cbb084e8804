"""``ServeConfig``: every limit of an rf-serve process, in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass

from rf_runtime.errors import ConfigError


@dataclass(frozen=True)
class ServeConfig:
    max_sessions: int = 4  # live WebSocket sessions + running MP4 jobs; beyond: close 1013 / HTTP 503
    token: str | None = (
        None  # when set, every endpoint but /healthz needs it (?token= or Authorization: Bearer)
    )
    queue_frames: int = 48  # frames a session buffers for its client; beyond, the oldest are dropped
    max_events: int = 64  # events a session buffers for a client that does not read; beyond, it is closed
    idle_seconds: float = 60.0  # a connection with no stream running and no message for this long is closed
    max_prompt_chars: int = 1000
    max_message_bytes: int = 16 * 1024  # client text messages above this get an error event
    ws_max_bytes: int = 4 * 1024 * 1024  # above this the WebSocket layer closes the connection (1009)
    max_job_seconds: float = 120.0  # longest video the REST call makes
    max_jobs_kept: int = 16  # finished MP4 jobs kept for download (oldest removed first)
    jpeg_quality: int = 85
    workers: int = min(4, os.cpu_count() or 1)  # threads that generate chunks (off the event loop)
    snapshot_every: int = 4  # chunks between session snapshots (Ray scale-out: what a failover resumes from)
    shutdown_seconds: float = 5.0  # on SIGTERM, how long sessions get to receive 'ended'

    def __post_init__(self):
        positive = (
            "max_sessions",
            "queue_frames",
            "max_events",
            "max_prompt_chars",
            "max_message_bytes",
            "ws_max_bytes",
            "max_jobs_kept",
            "workers",
            "snapshot_every",
        )
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name in ("idle_seconds", "max_job_seconds", "shutdown_seconds"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be a positive number of seconds, got {getattr(self, name)!r}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ConfigError(f"jpeg_quality must be in [1, 95], got {self.jpeg_quality}")
        if self.ws_max_bytes < self.max_message_bytes:
            raise ConfigError("ws_max_bytes must be at least max_message_bytes")
        if self.token is not None and not self.token:
            raise ConfigError("the token is empty: pass a non-empty --token, or none")
