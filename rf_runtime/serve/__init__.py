"""rf-serve: live streams over WebSocket, a viewer page, MP4 jobs and Ray scale-out, on the public Streamer API.

from rf_runtime.serve import LocalEngine, ServeApp, ServeConfig, ServerThread, make_server
"""

from rf_runtime.serve.config import ServeConfig

__all__ = ["LocalEngine", "ServeApp", "ServeConfig", "ServerThread", "make_server"]


def __getattr__(name):  # starlette / uvicorn load only when the server is used
    if name in ("ServeApp", "ServerThread", "make_server"):
        from rf_runtime.serve import app

        return getattr(app, name)
    if name == "LocalEngine":
        from rf_runtime.serve.engine import LocalEngine

        return LocalEngine
    raise AttributeError(name)
