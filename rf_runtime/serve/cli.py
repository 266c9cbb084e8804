"""``rf-serve``: serve live streams, the viewer page and MP4 jobs of one model over HTTP / WebSocket."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from rf_runtime.errors import RFError

logger = logging.getLogger("rf_runtime")


def _parser() -> argparse.ArgumentParser:
    from rf_runtime.cli import add_version
    from rf_runtime.serve.config import ServeConfig

    d = ServeConfig()
    p = argparse.ArgumentParser(
        prog="rf-serve",
        description="Serve a Reward Forcing model: live streams over WebSocket (/v1/stream), a viewer page (/), "
        "MP4 jobs (/v1/videos), health and Prometheus metrics. docs/serving.md has the protocol.",
    )
    src = p.add_argument_group("model (default: the engine bundle that ships with rf_runtime)")
    src.add_argument(
        "--engine", "--bundle", dest="engine", help="engine bundle directory, run by onnxruntime"
    )
    src.add_argument("--model-dir", help="Wan2.1-style model directory, run by PyTorch")
    src.add_argument("--checkpoint", help="generator checkpoint on top of --model-dir")
    src.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)"
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--max-sessions",
        type=int,
        default=d.max_sessions,
        help=f"live sessions + running MP4 jobs at once (default {d.max_sessions})",
    )
    p.add_argument("--token", help="require this token on every endpoint but /healthz and /readyz")
    p.add_argument(
        "--queue-frames",
        type=int,
        default=d.queue_frames,
        help=f"frames buffered per session before the oldest are dropped (default {d.queue_frames})",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=d.idle_seconds,
        help=f"seconds before a session with no stream and no message is closed (default {d.idle_seconds:g})",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=d.workers,
        help=f"threads making chunks (default {d.workers}; --ray: ignored)",
    )
    p.add_argument(
        "--no-batching",
        action="store_true",
        help="make each session's chunks alone even when the bundle has batch sizes > 1 (by default the "
        "sessions ready at a chunk boundary step together through one call of each graph)",
    )
    p.add_argument(
        "--ray", action="store_true", help="run the model in Ray actors (pip install 'rf_runtime[ray]')"
    )
    p.add_argument("--replicas", type=int, default=2, help="--ray: model replicas (default 2)")
    p.add_argument(
        "--snapshot-every",
        type=int,
        default=d.snapshot_every,
        help=f"--ray: chunks between session snapshots a failover resumes from (default {d.snapshot_every})",
    )
    p.add_argument("--ray-address", help="--ray: an existing Ray cluster (default: start a local one)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_version(p)
    return p


def load_streamer(engine: str | None, model_dir: str | None, checkpoint: str | None, device: str):
    """The Streamer of --engine or --model-dir (+ --checkpoint); neither: the shipped bundle."""
    from rf_runtime.streamer import Streamer

    if engine and model_dir:
        raise RFError("--engine and --model-dir name two models: pass one of them")
    if checkpoint and not model_dir:
        raise RFError("--checkpoint needs --model-dir DIR")
    if model_dir:
        return Streamer.from_checkpoint(model_dir, checkpoint, device=device)
    # several sessions share the cores: no decode thread per stream (docs/notes/speed.md, "Overlap")
    return Streamer.load(engine, device=device, overlap=False)  # None: the bundle that ships with rf_runtime


def _serve(args) -> int:
    from rf_runtime.serve.app import ServeApp, make_server
    from rf_runtime.serve.config import ServeConfig

    config = ServeConfig(
        max_sessions=args.max_sessions,
        token=args.token,
        queue_frames=args.queue_frames,
        idle_seconds=args.idle_timeout,
        workers=args.workers,
        snapshot_every=args.snapshot_every,
    )
    if not 0 < args.port < 65536:
        raise RFError(f"--port must be in 1..65535, got {args.port}")
    if args.ray:
        from rf_runtime.serve.ray_engine import RayEngine

        engine = RayEngine.start(
            replicas=args.replicas,
            engine=args.engine,
            model_dir=args.model_dir,
            checkpoint=args.checkpoint,
            device=args.device,
            jpeg_quality=config.jpeg_quality,
            snapshot_every=config.snapshot_every,
            address=args.ray_address,
        )
    else:
        from rf_runtime.serve.engine import LocalEngine

        streamer = load_streamer(args.engine, args.model_dir, args.checkpoint, args.device)
        engine = LocalEngine(
            streamer,
            workers=config.workers,
            jpeg_quality=config.jpeg_quality,
            batching=False if args.no_batching else None,
        )
    server = make_server(ServeApp(engine, config), host=args.host, port=args.port, log_level=args.log_level)
    print(
        f"rf-serve: http://{args.host}:{args.port}/ (viewer), ws://{args.host}:{args.port}/v1/stream",
        file=sys.stderr,
        flush=True,
    )
    # uvicorn takes SIGTERM / SIGINT while it runs and raises them again once it has shut down gracefully
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.run()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return _serve(args)
    except RFError as exc:
        print(f"rf-serve: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
