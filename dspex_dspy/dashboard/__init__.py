"""A live dashboard for a bridge: see and steer a running fleet's variables in the browser.

Install the extra (``pip install "dspex-dspy[dashboard]"``) and run::

    dspex-bridge dashboard --bridge 127.0.0.1:50051          # http://127.0.0.1:8765
    dspex-bridge serve --dashboard-port 8765                 # beside a bridge

The page lists sessions, shows every variable of one with its constraints, value, version, who
changed it and any optimization lease, updates values live from a watch stream, draws each
variable's history, and lets a person edit a value, roll back to a version or stop a lease: each
through the bridge's own API, with the token the person gives when the bridge requires one. Every
asset ships in the package; the page works offline.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

__all__ = ["DashboardServer", "create_app", "serve_dashboard"]

if TYPE_CHECKING:
    from starlette.applications import Starlette

logger = logging.getLogger("dspex_dspy.dashboard")

_MISSING_EXTRA = (
    'the dashboard needs its extra: pip install "dspex-dspy[dashboard]" (it adds starlette, uvicorn and PyJWT)'
)


def create_app(bridge: str, *, root_certificates: bytes | None = None) -> Starlette:
    """Build the dashboard's ASGI app for the bridge at ``bridge`` (see :mod:`.app`)."""
    try:
        from dspex_dspy.dashboard.app import create_app as build
    except ModuleNotFoundError as exc:
        raise ImportError(_MISSING_EXTRA) from exc
    return build(bridge, root_certificates=root_certificates)


class DashboardServer:
    """The dashboard served by uvicorn on a background thread.

    Args:
        bridge: ``"host:port"`` of the bridge to show.
        host: interface to bind; loopback by default.
        port: port to bind; 0 picks a free one (read it back from :attr:`port`).
        root_certificates: PEM of the bridge's CA, for a TLS bridge.

    Example:
        >>> with DashboardServer("127.0.0.1:50051") as dash:  # doctest: +SKIP
        ...     print(dash.url)
        http://127.0.0.1:8765/
    """

    def __init__(
        self, bridge: str, *, host: str = "127.0.0.1", port: int = 8765, root_certificates: bytes | None = None
    ) -> None:
        try:
            import uvicorn
        except ModuleNotFoundError as exc:
            raise ImportError(_MISSING_EXTRA) from exc
        app = create_app(bridge, root_certificates=root_certificates)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        """Where the page is served."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    def start(self, timeout: float = 10.0) -> DashboardServer:
        """Start serving; return once the socket listens.

        Raises:
            RuntimeError: the server did not start within ``timeout`` seconds (port taken, ...).
        """
        self._thread = threading.Thread(target=self._server.run, name="dspex-dashboard", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the dashboard did not start on {self.host}:{self.port}")
            time.sleep(0.02)
        servers = getattr(self._server, "servers", [])
        for server in servers:
            for sock in server.sockets:
                self.port = sock.getsockname()[1]
                break
        logger.info("dashboard on %s", self.url)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving. Idempotent."""
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> DashboardServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_dashboard(
    bridge: str, *, host: str = "127.0.0.1", port: int = 8765, root_certificates: bytes | None = None
) -> None:
    """Serve the dashboard in the foreground until interrupted (what ``dspex-bridge dashboard`` runs)."""
    try:
        import uvicorn
    except ModuleNotFoundError as exc:
        raise ImportError(_MISSING_EXTRA) from exc
    app = create_app(bridge, root_certificates=root_certificates)
    uvicorn.run(app, host=host, port=port, log_level="warning")
