"""``rf-serve-loadtest``: N WebSocket clients stream from an rf-serve on this machine for a bounded time.

    rf-serve-loadtest --clients 8 --seconds 60                  # starts its own rf-serve (shipped bundle)
    rf-serve-loadtest --url http://127.0.0.1:8000 --clients 8   # or an rf-serve already running here

Reports per client: frames received, fps, p50 / p99 interval between frames, frames dropped by the
server; and the server's resident memory (its /metrics process_resident_memory_bytes) before the
clients connect and after they are done. Loopback only: it refuses any other host.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlparse

import numpy as np

from rf_runtime.errors import RFError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ClientResult:
    client: int
    frames: int = 0
    seconds: float = 0.0
    fps: float = 0.0
    p50_interval_ms: float = 0.0
    p99_interval_ms: float = 0.0
    max_interval_ms: float = 0.0
    dropped_frames: int = 0
    errors: list = field(default_factory=list)


def _client(
    index: int, ws_url: str, seconds: float, paced: bool, out: list, barrier: threading.Barrier
) -> None:
    from websockets.sync.client import connect

    from rf_runtime.serve.protocol import unpack_frame

    result = ClientResult(index)
    arrivals = []
    try:
        with connect(ws_url, open_timeout=30, max_size=None) as ws:
            barrier.wait(timeout=60)
            ws.send(
                json.dumps(
                    {
                        "type": "start",
                        "prompt": f"a red circle bouncing {index}",
                        "seed": index,
                        "paced": paced,
                    }
                )
            )
            end = time.monotonic() + seconds
            stopped = False
            while True:
                timeout = max(0.05, end - time.monotonic()) if not stopped else 30
                try:
                    msg = ws.recv(timeout=timeout)
                except TimeoutError:
                    if stopped:
                        result.errors.append("no 'ended' after stop")
                        break
                    msg = None
                if not stopped and time.monotonic() >= end:
                    ws.send(json.dumps({"type": "stop"}))
                    stopped = True
                if msg is None:
                    continue
                if isinstance(msg, bytes):
                    unpack_frame(msg)
                    if not stopped:
                        arrivals.append(time.monotonic())
                    continue
                ev = json.loads(msg)
                if ev["type"] == "error":
                    result.errors.append(ev["code"])
                elif ev["type"] == "ended":
                    result.dropped_frames = ev["dropped_frames"]
                    break
    except Exception as exc:  # reported, not raised: one failing client must not hide the others' numbers
        result.errors.append(f"{type(exc).__name__}: {exc}")
    if len(arrivals) > 1:
        gaps = np.diff(arrivals) * 1000
        result.frames, result.seconds = len(arrivals), arrivals[-1] - arrivals[0]
        result.fps = (len(arrivals) - 1) / result.seconds
        result.p50_interval_ms = float(np.percentile(gaps, 50))
        result.p99_interval_ms = float(np.percentile(gaps, 99))
        result.max_interval_ms = float(gaps.max())
    out.append(result)


def server_rss(url: str) -> float:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "process_resident_memory_bytes":
                return sample.value
    raise RuntimeError("the server's /metrics has no process_resident_memory_bytes")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_server(clients: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    import httpx

    port = _free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rf_runtime.serve.cli",
            "--port",
            str(port),
            "--max-sessions",
            str(clients),
            "--log-level",
            "warning",
            *extra,
        ]
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RFError(f"rf-serve exited with status {proc.returncode} before it was ready")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RFError("rf-serve did not become ready within 120 s")


def run(url: str, clients: int, seconds: float, paced: bool) -> dict:
    rss_start = server_rss(url)
    ws_url = url.replace("http://", "ws://", 1) + "/v1/stream"
    results: list[ClientResult] = []
    barrier = threading.Barrier(clients)
    threads = [
        threading.Thread(target=_client, args=(i, ws_url, seconds, paced, results, barrier), daemon=True)
        for i in range(clients)
    ]
    for t in threads:
        t.start()
    samples, done, t0 = [], threading.Event(), time.monotonic()

    def sample_rss():  # every 10 s while the clients stream
        while not done.wait(10):
            samples.append((round(time.monotonic() - t0), server_rss(url) / 2**20))

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    for t in threads:
        t.join(seconds + 120)
    done.set()
    sampler.join(30)
    time.sleep(0.5)
    rss_end = server_rss(url)
    results.sort(key=lambda r: r.client)
    return {
        "clients": clients,
        "seconds": seconds,
        "paced": paced,
        "server_rss_start_mb": rss_start / 2**20,
        "server_rss_end_mb": rss_end / 2**20,
        "server_rss_during_mb": samples,
        "aggregate_fps": sum(r.fps for r in results),
        "per_client": [asdict(r) for r in results],
    }


def format_report(report: dict) -> str:
    pacing = "paced to the model fps" if report["paced"] else "as made"
    lines = [
        f"{report['clients']} clients x {report['seconds']:g} s, {pacing}",
        f"{'client':>6} {'frames':>7} {'fps':>6} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'dropped':>8}  errors",
    ]
    for r in report["per_client"]:
        lines.append(
            f"{r['client']:>6} {r['frames']:>7} {r['fps']:>6.2f} {r['p50_interval_ms']:>7.1f} "
            f"{r['p99_interval_ms']:>7.1f} {r['max_interval_ms']:>7.1f} {r['dropped_frames']:>8}  "
            f"{','.join(r['errors']) or '-'}"
        )
    during = ", ".join(f"{mb:.1f} MB at {t} s" for t, mb in report["server_rss_during_mb"])
    lines.append(
        f"aggregate {report['aggregate_fps']:.2f} fps; server RSS {report['server_rss_start_mb']:.1f} MB "
        f"before the clients, {report['server_rss_end_mb']:.1f} MB after them (during: {during or '-'})"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from rf_runtime.cli import add_version

    p = argparse.ArgumentParser(prog="rf-serve-loadtest", description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=60.0, help="streaming time per client (default 60)")
    p.add_argument("--url", help="an rf-serve on this machine (default: start one on a free loopback port)")
    p.add_argument(
        "--unpaced", action="store_true", help="ask for frames as they are made, not at the model fps"
    )
    p.add_argument("--json", help="also write the report here")
    p.add_argument(
        "server_args", nargs="*", help="after --: arguments for the rf-serve it starts (e.g. --engine B)"
    )
    add_version(p)
    args = p.parse_args(argv)
    if not (0 < args.clients <= 64 and 0 < args.seconds <= 600):
        p.error("--clients must be in 1..64 and --seconds in (0, 600]")
    proc = None
    if args.url:
        if urlparse(args.url).hostname not in LOOPBACK:
            p.error("the load test runs on loopback only: --url must be http://127.0.0.1:PORT")
        url = args.url.rstrip("/")
    else:
        try:
            proc, url = _start_server(args.clients, args.server_args)
        except RFError as exc:
            print(f"rf-serve-loadtest: error: {exc}", file=sys.stderr)
            return 2
    try:
        report = run(url, args.clients, args.seconds, paced=not args.unpaced)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
