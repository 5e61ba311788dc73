"""Running the app under uvicorn: start-up log, TLS, and a SIGTERM that drains instead of dropping work.

On SIGTERM (or Ctrl-C) uvicorn stops accepting connections and lets open requests finish; the app's shutdown then
finishes every queued row and stops the inference thread; `serve` closes the Embedder and returns, so the command
exits 0. (uvicorn's own handler re-raises the signal after a graceful shutdown, which would end the process with
status 143; this server keeps the drain and returns normally instead.)
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import uvicorn

from pue.errors import PueError
from pue.runtime import Embedder
from pue.serve.app import create_app
from pue.serve.config import ServeSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Listen:
    host: str = "127.0.0.1"
    port: int = 8000
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None

    def __post_init__(self) -> None:
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise PueError("TLS needs both --ssl-certfile and --ssl-keyfile")


class _DrainingServer(uvicorn.Server):
    """uvicorn's server with signal handling that drains and returns (no re-raised signal)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def stop(sig: int, _: FrameType | None) -> None:
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True
            log.info("%s: no new connections; finishing open requests and the queue", signal.Signals(sig).name)

        original = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)


def serve(embedder: Embedder, settings: ServeSettings, listen: Listen) -> None:
    """Serve `embedder` until SIGTERM/SIGINT, drain, close it. Blocks."""
    app = create_app(embedder, settings)
    config = uvicorn.Config(
        app,
        host=listen.host,
        port=listen.port,
        ssl_certfile=str(listen.ssl_certfile) if listen.ssl_certfile else None,
        ssl_keyfile=str(listen.ssl_keyfile) if listen.ssl_keyfile else None,
        log_config=None,  # the caller configures logging; the library configures none
        access_log=False,  # the app writes its own structured access log (no bodies, no query strings)
        server_header=False,
        lifespan="on",
    )
    server = _DrainingServer(config)
    scheme = "https" if listen.ssl_certfile else "http"
    log.info(
        "serving %s as %r on %s://%s:%d (max batch %d, max wait %g ms, max queue %d rows, API key %s)",
        embedder.bundle_dir.name,
        settings.model_name,
        scheme,
        listen.host,
        listen.port,
        settings.max_batch,
        settings.max_wait_ms,
        settings.max_queue,
        "required" if settings.api_key else "not set (loopback only)",
    )
    try:
        server.run()
    finally:
        embedder.close()
    if not server.started:
        raise PueError(f"the server did not start on {listen.host}:{listen.port} (see the log above)")
    log.info("stopped")
