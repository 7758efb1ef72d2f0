"""The dashboard's web application: a JSON API over a bridge, a live event stream, one static page.

Routes (all JSON unless said otherwise; a token, when the bridge wants one, travels as
``Authorization: Bearer <token>`` from the page to here and on to the bridge):

==========================================  ==================================================
``GET /``                                   the page (``static/index.html``)
``GET /api/config``                         the bridge address and whether it asks for a token
``GET /api/whoami``                         what the given token claims (for the page's controls)
``GET /api/sessions?q=``                    sessions, filtered by a substring of their id
``GET /api/sessions/{sid}``                 one session and its variables
``GET /api/sessions/{sid}/events``          ``text/event-stream`` of its live changes
``GET /api/sessions/{sid}/calls?limit=``    recent module calls workers reported, newest first
``GET .../variables/{name}/history``        a variable's history, newest first
``POST .../variables/{name}``               ``{"value": text, "expected_version": n?}``: a write
``POST .../variables/{name}/rollback``      ``{"version": n}``: write that version's value again
``POST .../variables/{name}/lease/stop``    force-stop the optimization lease on the variable
==========================================  ==================================================

Errors answer ``{"error": {"kind", "message", "variable", "rule", "value"}}`` with the HTTP
status that matches the bridge's refusal (422 invalid value, 404 unknown, 409 version conflict,
401/403 token problems, 423 a variable locked by an optimizer, 503 bridge unreachable).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any, TypeVar

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from dspex_dspy import errors
from dspex_dspy.commands import parse_value
from dspex_dspy.dashboard._bridge import BridgeLink, jsonable, session_record, variable_record
from dspex_dspy.remote import BridgeCalls, RemoteStore

__all__ = ["create_app"]

logger = logging.getLogger("dspex_dspy.dashboard")

_T = TypeVar("_T")

# Most specific first: an error that is two of these at once (none are today) takes the first.
_HTTP_STATUS: tuple[tuple[str, int], ...] = (
    ("ValidationError", 422),
    ("BatchUpdateError", 422),
    ("VariableNotFoundError", 404),
    ("SessionNotFoundError", 404),
    ("VersionConflictError", 409),
    ("VariableExistsError", 409),
    ("AuthenticationError", 401),
    ("PermissionDeniedError", 403),
    ("VariableLockedError", 423),
    ("LimitExceededError", 429),
    ("BridgeUnavailableError", 503),
)


def _http_status(exc: errors.DSPexError) -> int:
    for name, status in _HTTP_STATUS:
        cls = getattr(errors, name, None)
        if cls is not None and isinstance(exc, cls):
            return status
    return 400


def _error_response(exc: errors.DSPexError) -> JSONResponse:
    body: dict[str, Any] = {"kind": type(exc).__name__, "message": str(exc)}
    for attribute in ("variable", "rule", "value"):
        if hasattr(exc, attribute):
            body[attribute] = jsonable(getattr(exc, attribute))
    return JSONResponse({"error": body}, status_code=_http_status(exc))


def _bad_request(message: str) -> JSONResponse:
    return JSONResponse({"error": {"kind": "BadRequest", "message": message}}, status_code=400)


def _token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, credentials = header.partition(" ")
    if scheme.lower() == "bearer" and credentials.strip():
        return credentials.strip()
    return None


def create_app(
    bridge: str,
    *,
    root_certificates: bytes | None = None,
    link: BridgeLink | None = None,
) -> Starlette:
    """Build the dashboard application for the bridge at ``bridge``.

    Args:
        bridge: ``"host:port"`` of a running bridge.
        root_certificates: PEM of the CA for a TLS bridge.
        link: an already built :class:`BridgeLink` (tests); made from the above when omitted.

    Returns:
        An ASGI app; serve it with uvicorn (see :func:`dspex_dspy.dashboard.serve_dashboard`).
    """
    bridge_link = link or BridgeLink(bridge, root_certificates=root_certificates)

    async def call(request: Request, work: Callable[[RemoteStore], _T]) -> _T:
        token = _token(request)
        return await run_in_threadpool(lambda: work(bridge_link.store(token)))

    async def guarded(request: Request, handler: Callable[[], Any]) -> Response:
        try:
            result = await handler()
        except errors.DSPexError as exc:
            logger.info("%s %s refused: %s", request.method, request.url.path, type(exc).__name__)
            return _error_response(exc)
        return result if isinstance(result, Response) else JSONResponse(result)

    async def index(request: Request) -> Response:
        return FileResponse(str(_static_dir() / "index.html"), media_type="text/html")

    async def config(request: Request) -> Response:
        async def handler() -> dict[str, Any]:
            auth = await run_in_threadpool(_bridge_wants_token, bridge_link)
            return {"bridge": bridge_link.address, "auth_required": auth}

        return await guarded(request, handler)

    async def whoami(request: Request) -> Response:
        async def handler() -> dict[str, Any]:
            return _claims(_token(request))

        return await guarded(request, handler)

    async def sessions(request: Request) -> Response:
        query = request.query_params.get("q", "").strip().lower()

        async def handler() -> dict[str, Any]:
            token = _token(request)
            infos = await run_in_threadpool(bridge_link.sessions, token)
            rows = [session_record(info) for info in infos if query in info.id.lower()]
            return {"sessions": rows}

        return await guarded(request, handler)

    async def session(request: Request) -> Response:
        sid = request.path_params["sid"]

        async def handler() -> dict[str, Any]:
            def read(store: RemoteStore) -> dict[str, Any]:
                info = store.get_session(sid)
                variables = store.list_variables(sid)
                return {"session": session_record(info), "variables": [variable_record(v) for v in variables]}

            return await call(request, read)

        return await guarded(request, handler)

    async def calls(request: Request) -> Response:
        sid = request.path_params["sid"]
        raw = request.query_params.get("limit", "50")
        if not raw.isdigit() or int(raw) < 1:
            return _bad_request("limit must be a positive integer")
        limit = int(raw)

        async def handler() -> dict[str, Any]:
            token = _token(request)
            found = await run_in_threadpool(bridge_link.recent_calls, token, sid, limit)
            return {"calls": found}

        return await guarded(request, handler)

    async def history(request: Request) -> Response:
        sid, name = request.path_params["sid"], request.path_params["name"]

        async def handler() -> dict[str, Any]:
            def read(store: RemoteStore) -> dict[str, Any]:
                var = store.get_variable(sid, name)
                record = variable_record(var)
                entries = store.get_history(sid, name)
                rows = [
                    {
                        "version": entry.version,
                        "value": None if record["secret"] else jsonable(entry.value),
                        "timestamp": entry.timestamp,
                        "changed_by": entry.changed_by,
                        "metadata": dict(entry.metadata),
                    }
                    for entry in entries
                ]
                return {"variable": record, "history": rows}

            return await call(request, read)

        return await guarded(request, handler)

    async def write(request: Request) -> Response:
        sid, name = request.path_params["sid"], request.path_params["name"]
        body = await _json_body(request)
        if not isinstance(body, dict) or not isinstance(body.get("value"), str):
            return _bad_request('send {"value": "<text>"} with the new value as text')
        expected = body.get("expected_version")
        if expected is not None and (not isinstance(expected, int) or isinstance(expected, bool)):
            return _bad_request("expected_version must be an integer")
        text: str = body["value"]

        async def handler() -> dict[str, Any]:
            def apply(store: RemoteStore) -> dict[str, Any]:
                current = store.get_variable(sid, name)
                value = parse_value(text, current.type, name)
                updated = store.set_variable(
                    sid, name, value, metadata={"via": "dashboard"}, expected_version=expected or None
                )
                return {"variable": variable_record(updated)}

            return await call(request, apply)

        return await guarded(request, handler)

    async def rollback(request: Request) -> Response:
        sid, name = request.path_params["sid"], request.path_params["name"]
        body = await _json_body(request)
        version = body.get("version") if isinstance(body, dict) else None
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            return _bad_request('send {"version": n} with the version to restore (n >= 1)')

        async def handler() -> dict[str, Any]:
            updated = await call(request, lambda store: store.rollback_variable(sid, name, version))
            return {"variable": variable_record(updated)}

        return await guarded(request, handler)

    async def stop_lease(request: Request) -> Response:
        sid, name = request.path_params["sid"], request.path_params["name"]

        async def handler() -> dict[str, Any]:
            def stop(store: RemoteStore) -> dict[str, Any]:
                var = store.get_variable(sid, name)
                lease = variable_record(var)["lease"]
                if lease is None:
                    return {"stopped": False, "variable": variable_record(var)}
                store.stop_optimization(sid, name, force=True)
                return {"stopped": True, "variable": variable_record(store.get_variable(sid, name))}

            return await call(request, stop)

        return await guarded(request, handler)

    async def events(request: Request) -> Response:
        sid = request.path_params["sid"]
        token = _token(request)

        async def stream() -> AsyncIterator[str]:
            yield "retry: 1000\n\n"
            try:
                async for update in bridge_link.updates(sid, token):
                    if update is None:
                        yield ": heartbeat\n\n"
                    else:
                        yield f"event: update\ndata: {json.dumps(update, allow_nan=False)}\n\n"
            except errors.DSPexError as exc:
                payload = {"kind": type(exc).__name__, "message": str(exc)}
                yield f"event: failure\ndata: {json.dumps(payload)}\n\n"

        headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    routes = [
        Route("/", index),
        Route("/api/config", config),
        Route("/api/whoami", whoami),
        Route("/api/sessions", sessions),
        Route("/api/sessions/{sid}", session),
        Route("/api/sessions/{sid}/events", events),
        Route("/api/sessions/{sid}/calls", calls),
        Route("/api/sessions/{sid}/variables/{name}/history", history),
        Route("/api/sessions/{sid}/variables/{name}", write, methods=["POST"]),
        Route("/api/sessions/{sid}/variables/{name}/rollback", rollback, methods=["POST"]),
        Route("/api/sessions/{sid}/variables/{name}/lease/stop", stop_lease, methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(_static_dir())), name="static"),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        bridge_link.close()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.link = bridge_link
    return app


def _static_dir() -> Any:
    return resources.files("dspex_dspy.dashboard") / "static"


async def _json_body(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        return None


def _bridge_wants_token(link: BridgeLink) -> bool:
    try:
        link.store(None).call(BridgeCalls.ping("dashboard"))
    except errors.DSPexError as exc:
        auth_error = getattr(errors, "AuthenticationError", None)
        if auth_error is not None and isinstance(exc, auth_error):
            return True
        raise
    return False


def _claims(token: str | None) -> dict[str, Any]:
    """What a token says about its holder, read without checking it: the bridge checks it on use.

    The page only uses this to grey out what the token cannot do; the bridge refuses it anyway.
    """
    if token is None:
        return {"sub": None, "perms": ["read", "write", "watch", "optimize", "admin"], "sessions": "*"}
    import jwt

    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise errors.DSPexError(f"the token is not a readable JWT: {type(exc).__name__}") from None
    perms = claims.get("perms", [])
    if isinstance(perms, str):
        perms = [p for p in perms.replace(",", " ").split() if p]
    return {
        "sub": claims.get("sub"),
        "perms": list(perms),
        "sessions": claims.get("sessions", []),
        "exp": claims.get("exp"),
    }
