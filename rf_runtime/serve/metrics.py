"""Prometheus metrics of one rf-serve process (its own registry, so several apps can live in one process)."""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

CHUNK_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self, queue_depth):
        """queue_depth: a callable giving the frames waiting in all sessions' queues now."""
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu seconds, open fds
        PlatformCollector(registry=r)
        self.sessions_active = Gauge(
            "rf_serve_sessions_active", "Live WebSocket sessions and running MP4 jobs", registry=r
        )
        self.sessions_rejected = Counter(
            "rf_serve_sessions_rejected", "Connections and jobs refused", ["reason"], registry=r
        )
        self.frames_sent = Counter("rf_serve_frames_sent", "Frames sent to WebSocket clients", registry=r)
        self.frames_dropped = Counter(
            "rf_serve_frames_dropped",
            "Frames dropped because a client read slower than they were made",
            registry=r,
        )
        self.chunk_seconds = Histogram(
            "rf_serve_chunk_seconds",
            "Time to make one chunk (Chunk.seconds)",
            buckets=CHUNK_BUCKETS,
            registry=r,
        )
        self.queue_frames = Gauge(
            "rf_serve_queue_frames", "Frames waiting in all sessions' send queues", registry=r
        )
        self.queue_frames.set_function(queue_depth)
        self.jobs = Counter("rf_serve_jobs", "MP4 jobs by outcome", ["status"], registry=r)
        self.failovers = Counter(
            "rf_serve_failovers", "Sessions resumed on another replica from a snapshot", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
