"""The rf-serve ASGI app (Starlette) and the uvicorn server that runs it.

    app = ServeApp(LocalEngine(Streamer.load(bundle), workers=2, jpeg_quality=85), ServeConfig())
    make_server(app, host="127.0.0.1", port=8000).run()

Routes (docs/serving.md has the protocol):

    GET  /                      the viewer page (package data, no CDN)
    GET  /static/{name}         its script and style sheet
    GET  /healthz, /readyz      health probes (no token needed)
    GET  /metrics               Prometheus text
    GET  /v1/info               the model: fps, size, limits
    WS   /v1/stream             live sessions
    POST /v1/videos             an MP4 job; GET /v1/videos/{id} its status, GET /v1/videos/{id}/video the file
    POST /v1/webrtc/offer       a live session over WebRTC (optional: aiortc; rf_runtime.serve.webrtc)
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import shutil
import tempfile
import uuid
from contextlib import asynccontextmanager
from importlib import resources

from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from rf_runtime.serve.config import ServeConfig
from rf_runtime.serve.jobs import Jobs, parse_job_request
from rf_runtime.serve.metrics import Metrics
from rf_runtime.serve.protocol import VERSION, ProtocolError, error_event
from rf_runtime.serve.session import Session
from rf_runtime.serve.transport import WebSocketTransport

logger = logging.getLogger("rf_runtime")

TOKEN_COOKIE = "rf_serve_token"
STATIC = {"viewer.js": "text/javascript", "viewer.css": "text/css"}
MAX_STREAM_FRAMES = 16 * 3600 * 24  # num_frames cap of one stream: a day at 16 fps


def _webrtc_available() -> bool:
    from rf_runtime.serve import webrtc

    return webrtc.available()


def _static_bytes(name: str) -> bytes:
    return resources.files("rf_runtime.serve").joinpath("static", name).read_bytes()


class ServeApp:
    """One process: an engine (the loaded model), the sessions on it, the jobs, the metrics."""

    def __init__(self, engine, config: ServeConfig | None = None):
        self.engine, self.config = engine, config or ServeConfig()
        self.sessions: dict[str, Session] = {}
        self.active = 0  # live sessions + running jobs: what --max-sessions bounds
        self.shutting_down = False
        self.max_stream_frames = MAX_STREAM_FRAMES
        self.metrics = Metrics(lambda: sum(s.queue.frames for s in self.sessions.values()))
        self.jobs_dir = tempfile.mkdtemp(prefix="rf-serve-jobs-")
        self.jobs = Jobs(engine, self.jobs_dir, self.config.max_jobs_kept, self.metrics)
        self._drained: asyncio.Task | None = None
        self.media_host = "127.0.0.1"  # the address WebRTC media is offered on (make_server: its --host)
        self._rtc_tasks: set[asyncio.Task] = set()
        self.app = Starlette(
            routes=[
                Route("/", self.page),
                Route("/static/{name}", self.static),
                Route("/healthz", self.healthz),
                Route("/readyz", self.readyz),
                Route("/metrics", self.metrics_page),
                Route(f"/v{VERSION}/info", self.info),
                WebSocketRoute(f"/v{VERSION}/stream", self.stream),
                Route(f"/v{VERSION}/videos", self.create_job, methods=["POST"]),
                Route(f"/v{VERSION}/videos/{{jid}}", self.job_status),
                Route(f"/v{VERSION}/videos/{{jid}}/video", self.job_video),
                Route(f"/v{VERSION}/webrtc/offer", self.webrtc_offer, methods=["POST"]),
            ],
            lifespan=self._lifespan,
        )

    # ---- capacity and access ---------------------------------------------------------------------

    def _try_acquire(self) -> tuple[str, str] | None:
        """Take a session slot, or (code, reason) why not."""
        if self.shutting_down:
            return "shutting_down", "the server is shutting down: connect to another one or retry later"
        if self.active >= self.config.max_sessions:
            return "server_full", (
                f"server full: {self.active} of {self.config.max_sessions} sessions in use; retry later"
            )
        self.active += 1
        self.metrics.sessions_active.set(self.active)
        return None

    def _release(self) -> None:
        self.active -= 1
        self.metrics.sessions_active.set(self.active)

    def _authorized(self, conn: HTTPConnection) -> bool:
        if self.config.token is None:
            return True
        header = conn.headers.get("authorization", "")
        given = (
            (header[7:] if header.lower().startswith("bearer ") else None)
            or conn.query_params.get("token")
            or conn.cookies.get(TOKEN_COOKIE)
            or ""
        )
        return hmac.compare_digest(given.encode(), self.config.token.encode())

    def _unauthorized(self) -> JSONResponse:
        self.metrics.sessions_rejected.labels("unauthorized").inc()
        return JSONResponse(
            {
                "error": "unauthorized: pass the server's token as ?token=..., or as the header "
                "'Authorization: Bearer ...'"
            },
            status_code=401,
        )

    # ---- HTTP --------------------------------------------------------------------------------------

    async def page(self, request: Request) -> Response:
        if not self._authorized(request):
            return self._unauthorized()
        response = Response(_static_bytes("index.html"), media_type="text/html")
        if self.config.token is not None:  # the page's script, style and WebSocket then carry it as a cookie
            response.set_cookie(TOKEN_COOKIE, self.config.token, httponly=True, samesite="strict")
        return response

    async def static(self, request: Request) -> Response:
        if not self._authorized(request):
            return self._unauthorized()
        name = request.path_params["name"]
        if name not in STATIC:
            return JSONResponse({"error": f"no file {name!r}"}, status_code=404)
        return Response(_static_bytes(name), media_type=STATIC[name])

    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(self, request: Request) -> Response:
        body = {"sessions": self.active, "max_sessions": self.config.max_sessions}
        if self.shutting_down:
            return JSONResponse({"ready": False, "reason": "shutting down", **body}, status_code=503)
        if self.active >= self.config.max_sessions:
            return JSONResponse({"ready": False, "reason": "server full", **body}, status_code=503)
        return JSONResponse({"ready": True, **body})

    async def metrics_page(self, request: Request) -> Response:
        if not self._authorized(request):
            return self._unauthorized()
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    async def info(self, request: Request) -> Response:
        if not self._authorized(request):
            return self._unauthorized()
        m = self.engine.model
        return JSONResponse(
            {
                "protocol": VERSION,
                "fps": m.fps,
                "width": m.width,
                "height": m.height,
                "chunk_frames": m.chunk_frames,
                "engine": self.engine.name,
                "max_sessions": self.config.max_sessions,
                "max_prompt_chars": self.config.max_prompt_chars,
                "max_message_bytes": self.config.max_message_bytes,
                "max_job_seconds": self.config.max_job_seconds,
                "webrtc": _webrtc_available(),
            }
        )

    async def create_job(self, request: Request) -> Response:
        if not self._authorized(request):
            return self._unauthorized()
        raw = await request.body()
        try:
            if len(raw) > self.config.max_message_bytes:
                raise ProtocolError(
                    "message_too_large", f"the body has more than {self.config.max_message_bytes} bytes"
                )
            try:
                body = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
                raise ProtocolError("bad_json", f"the body is not valid JSON ({exc})") from None
            prompt, seed, frames = parse_job_request(
                body,
                max_prompt_chars=self.config.max_prompt_chars,
                max_seconds=self.config.max_job_seconds,
                fps=self.engine.model.fps,
            )
        except ProtocolError as exc:
            return JSONResponse({"error": str(exc), "code": exc.code}, status_code=400)
        refused = self._try_acquire()
        if refused:
            self.metrics.sessions_rejected.labels(refused[0]).inc()
            return JSONResponse(
                {"error": refused[1], "code": refused[0]}, status_code=503, headers={"Retry-After": "5"}
            )
        job = self.jobs.submit(prompt, seed, frames, on_done=self._release)
        return JSONResponse(job.describe(f"/v{VERSION}/videos"), status_code=202)

    def _job(self, request: Request):
        """(the job, None), or (None, the response that refuses the request: unauthorized or unknown)."""
        if not self._authorized(request):
            return None, self._unauthorized()
        job = self.jobs.jobs.get(request.path_params["jid"])
        if job is None:
            return None, JSONResponse(
                {"error": "no such job (finished jobs are kept for a while only)"}, status_code=404
            )
        return job, None

    async def job_status(self, request: Request) -> Response:
        job, refused = self._job(request)
        if refused is not None:
            return refused
        return JSONResponse(job.describe(f"/v{VERSION}/videos"))

    async def job_video(self, request: Request) -> Response:
        job, refused = self._job(request)
        if refused is not None:
            return refused
        if job.status != "done":
            return JSONResponse(
                {"error": f"the job is {job.status}, not done", **job.describe(f"/v{VERSION}/videos")},
                status_code=409,
            )
        return FileResponse(job.path, media_type="video/mp4", filename=f"{job.id}.mp4")

    # ---- WebSocket ---------------------------------------------------------------------------------

    async def stream(self, ws: WebSocket) -> None:
        await ws.accept()
        if not self._authorized(ws):
            self.metrics.sessions_rejected.labels("unauthorized").inc()
            await ws.send_text(
                error_event("unauthorized", "unauthorized: connect with ?token=... (the server's --token)")
            )
            await ws.close(1008, "unauthorized")
            return
        refused = self._try_acquire()
        if refused:
            code, reason = refused
            self.metrics.sessions_rejected.labels(code).inc()
            await ws.send_text(error_event(code, reason))
            await ws.close(1012 if code == "shutting_down" else 1013, reason[:120])
            return
        sid = uuid.uuid4().hex[:12]
        session = self.sessions[sid] = Session(WebSocketTransport(ws), self, sid)
        try:
            await session.run()
        finally:
            del self.sessions[sid]
            self._release()

    # ---- WebRTC ------------------------------------------------------------------------------------

    async def webrtc_offer(self, request: Request) -> Response:
        from rf_runtime.serve import webrtc

        if not self._authorized(request):
            return self._unauthorized()
        if not _webrtc_available():
            return JSONResponse(
                {"error": "this server has no WebRTC: install aiortc (pip install 'rf_runtime[webrtc]')"},
                status_code=501,
            )
        try:
            offer = webrtc.parse_offer(json.loads(await request.body()))
        except json.JSONDecodeError as exc:
            return JSONResponse({"error": f"the body is not JSON: {exc}"}, status_code=400)
        except ProtocolError as exc:
            return JSONResponse({"error": str(exc), "code": exc.code}, status_code=400)
        refused = self._try_acquire()
        if refused:
            code, reason = refused
            self.metrics.sessions_rejected.labels(code).inc()
            return JSONResponse({"error": reason, "code": code}, status_code=503)
        webrtc.restrict_candidates(self.media_host)
        try:
            transport, answer = await webrtc.accept(offer, self.engine.model.fps)
        except ProtocolError as exc:
            self._release()
            return JSONResponse({"error": str(exc), "code": exc.code}, status_code=400)
        sid = uuid.uuid4().hex[:12]
        session = self.sessions[sid] = Session(transport, self, sid)
        task = asyncio.ensure_future(self._run_rtc(sid, session, transport))
        self._rtc_tasks.add(task)
        task.add_done_callback(self._rtc_tasks.discard)
        return JSONResponse({**answer, "session": sid})

    async def _run_rtc(self, sid: str, session: Session, transport) -> None:
        try:
            await session.run()
        finally:
            del self.sessions[sid]
            self._release()
            await transport.close()

    # ---- shutdown ----------------------------------------------------------------------------------

    async def drain(self) -> None:
        """Refuse new work, tell every session ``ended`` and wait (up to shutdown_seconds) for them to close."""
        if self._drained is None:
            self._drained = asyncio.ensure_future(self._drain())
        await self._drained

    async def _drain(self) -> None:
        self.shutting_down = True
        await asyncio.gather(*(s.shutdown() for s in list(self.sessions.values())))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.shutdown_seconds
        while self.sessions and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for task in list(self.jobs.tasks):
            task.cancel()
        await asyncio.gather(*self.jobs.tasks, return_exceptions=True)
        if self._rtc_tasks:  # the peer connections of the WebRTC sessions close
            await asyncio.wait(list(self._rtc_tasks), timeout=self.config.shutdown_seconds)

    @asynccontextmanager
    async def _lifespan(self, app):
        try:
            yield
        finally:
            await self.drain()
            self.engine.shutdown()
            shutil.rmtree(self.jobs_dir, ignore_errors=True)


def make_server(serve_app: ServeApp, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning"):
    """A uvicorn server for ``serve_app``; on SIGTERM / Ctrl-C sessions get ``ended`` before connections close."""
    import uvicorn

    serve_app.media_host = host

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            await serve_app.drain()
            await super().shutdown(sockets=sockets)

    config = uvicorn.Config(
        serve_app.app,
        host=host,
        port=port,
        log_level=log_level,
        ws="websockets-sansio",
        ws_max_size=serve_app.config.ws_max_bytes,
        lifespan="on",
        timeout_graceful_shutdown=serve_app.config.shutdown_seconds,
    )
    return Server(config)


class ServerThread:
    """Run a ServeApp on a uvicorn server in a background thread (tests, notebooks, embedding):

    with ServerThread(serve_app) as server:        # binds 127.0.0.1 on a free port
        connect(server.ws_url)                      # ws://127.0.0.1:PORT/v1/stream
    """

    def __init__(
        self,
        serve_app: ServeApp,
        host: str = "127.0.0.1",
        port: int = 0,
        start_timeout: float = 30.0,
        send_buffer_bytes: int | None = None,
    ):
        """send_buffer_bytes: the kernel send buffer of every connection (SO_SNDBUF; default: the system's)."""
        import socket
        import threading

        self.serve_app = serve_app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if send_buffer_bytes is not None:  # accepted sockets inherit it
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer_bytes)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        self.server = make_server(serve_app, host, self.port)
        self.start_timeout = start_timeout
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True, name="rf-serve"
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/v{VERSION}/stream"

    def __enter__(self) -> "ServerThread":
        import time

        self.thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the rf-serve test server did not start")
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __exit__(self, *exc) -> None:
        self.stop()
