"""The operator subcommands of ``dspex-bridge``: look at and change a running bridge from a shell.

``sessions``, ``list``, ``get``, ``set``, ``history``, ``rollback`` and ``watch`` talk to a running
bridge (``--bridge HOST:PORT``, default ``$DSPEX_BRIDGE_ADDRESS`` or ``127.0.0.1:50051``). Output
is a readable table or line by default and JSON with ``--json`` (one JSON document; ``watch``
prints one JSON object per line). Every connection option is declared once, in
:func:`connection_parser`, the parent parser of every subcommand, and every connection is opened
by :func:`connect`.

Exit codes:

====  =====================================================================
0     success
1     any other error the bridge reported
2     bad command line (argparse)
3     the bridge cannot be reached
4     no such session or variable
5     the value (or version) was rejected; nothing changed
6     version conflict (``set --expected-version``); nothing changed
130   interrupted (Ctrl-C)
====  =====================================================================
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any, Final, TextIO

import grpc

from dspex_dspy._proto import snakepit_bridge_pb2_grpc as pb_grpc
from dspex_dspy.admin import list_sessions
from dspex_dspy.display import (
    HISTORY_HEADERS,
    SECRET,
    format_time,
    format_value,
    history_record,
    history_row,
    iso_time,
    shown,
    text_table,
    variable_record,
)
from dspex_dspy.errors import (
    BatchUpdateError,
    BridgeUnavailableError,
    DSPexError,
    SessionNotFoundError,
    ValidationError,
    VariableNotFoundError,
    VersionConflictError,
)
from dspex_dspy.ops import event_from_update
from dspex_dspy.remote import RemoteStore, open_channel
from dspex_dspy.types import is_secret

__all__ = ["COMMANDS", "EXIT_CODES", "add_commands", "connect", "connection_parser", "run"]

ADDRESS_ENV: Final = "DSPEX_BRIDGE_ADDRESS"
DEFAULT_ADDRESS: Final = "127.0.0.1:50051"
#: The writer recorded for a write made from the command line.
CLI_SOURCE: Final = "cli"

EXIT_OK: Final = 0
EXIT_ERROR: Final = 1
EXIT_USAGE: Final = 2
EXIT_UNAVAILABLE: Final = 3
EXIT_NOT_FOUND: Final = 4
EXIT_INVALID: Final = 5
EXIT_CONFLICT: Final = 6
EXIT_INTERRUPTED: Final = 130

EXIT_CODES: Final = {
    "ok": EXIT_OK,
    "error": EXIT_ERROR,
    "usage": EXIT_USAGE,
    "unavailable": EXIT_UNAVAILABLE,
    "not_found": EXIT_NOT_FOUND,
    "invalid": EXIT_INVALID,
    "conflict": EXIT_CONFLICT,
    "interrupted": EXIT_INTERRUPTED,
}

COMMANDS: Final = ("sessions", "list", "get", "set", "history", "rollback", "watch")


# ------------------------------------------------------------------ connection


def _seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def add_bridge_option(parser: Any, what: str) -> None:
    """Add ``--bridge/-b HOST:PORT`` (default ``$DSPEX_BRIDGE_ADDRESS`` or loopback:50051) to ``parser``."""
    parser.add_argument(
        "--bridge",
        "-b",
        metavar="HOST:PORT",
        default=os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS,
        help=f"{what} (default: ${ADDRESS_ENV} or {DEFAULT_ADDRESS})",
    )


def connection_parser() -> argparse.ArgumentParser:
    """The parent parser holding every option about reaching a bridge (and ``--json``).

    Options that every operator subcommand shares (address, deadline, and credentials when the
    bridge requires them) belong here, and only here.
    """
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection")
    add_bridge_option(group, "the bridge to talk to")
    group.add_argument(
        "--timeout", type=_seconds, default=5.0, metavar="SECONDS", help="connect and call deadline (default: 5)"
    )
    group.add_argument("--ca", metavar="PEM", help="root certificates to trust: use TLS (default: $DSPEX_BRIDGE_CA)")
    group.add_argument("--cert", metavar="PEM", help="client certificate, for mutual TLS")
    group.add_argument("--key", metavar="PEM", help="private key of --cert")
    group.add_argument("--token", help="bearer token (default: $DSPEX_BRIDGE_TOKEN)")
    parent.add_argument("--json", action="store_true", help="print JSON instead of text (for scripts)")
    return parent


@dataclass
class Connection:
    """An open connection to a bridge: the channel, a RemoteStore over it, and the call deadline."""

    channel: grpc.Channel
    store: RemoteStore
    timeout: float

    def close(self) -> None:
        self.store.close()


@contextmanager
def connect(args: argparse.Namespace) -> Iterator[Connection]:
    """Open the connection the options in ``args`` describe (see :func:`connection_parser`).

    Raises:
        BridgeUnavailableError: nothing answered at the address within the timeout.
    """
    channel = open_channel(
        args.bridge,
        timeout=args.timeout,
        root_certificates=args.ca,
        token=args.token,
        certificate_chain=args.cert,
        private_key=args.key,
    )
    store = RemoteStore(
        pb_grpc.BridgeServiceStub(channel), channel=channel, address=args.bridge, call_timeout=args.timeout
    )
    connection = Connection(channel, store, args.timeout)
    try:
        yield connection
    finally:
        connection.close()


# ------------------------------------------------------------------ parsing


def add_commands(commands: Any) -> None:
    """Add the operator subcommands to ``commands`` (an ``add_subparsers()`` result)."""
    parent = connection_parser()

    sessions = commands.add_parser("sessions", parents=[parent], help="list the sessions of a bridge")
    sessions.add_argument("--pattern", default="", help="only ids matching this * glob")

    listing = commands.add_parser("list", parents=[parent], help="list a session's variables")
    listing.add_argument("session", help="the session id (an orchestrator context's ctx.id)")
    listing.add_argument("--pattern", default=None, help="only names matching this * glob")

    get = commands.add_parser("get", parents=[parent], help="print a variable's value")
    get.add_argument("session")
    get.add_argument("name", help="the variable's name (or id)")

    set_ = commands.add_parser("set", parents=[parent], help="write a variable (validated like any write)")
    set_.add_argument("session")
    set_.add_argument("name")
    set_.add_argument("value", help="the new value, read as the variable's type (JSON for embeddings and tensors)")
    set_.add_argument("--expected-version", type=int, default=None, help="write only if this is the current version")
    set_.add_argument(
        "--meta", action="append", default=[], metavar="KEY=VALUE", help="metadata of this write (repeatable)"
    )

    history = commands.add_parser("history", parents=[parent], help="print a variable's remembered writes")
    history.add_argument("session")
    history.add_argument("name")
    history.add_argument("--limit", type=int, default=0, help="only the newest N writes")

    rollback = commands.add_parser("rollback", parents=[parent], help="write a remembered version's value again")
    rollback.add_argument("session")
    rollback.add_argument("name")
    rollback.add_argument("version", type=int, help="a version listed by 'history'")

    watch = commands.add_parser(
        "watch", parents=[parent], help="print changes as they happen (coalesced; 'history' is the full log)"
    )
    watch.add_argument("session")
    watch.add_argument("names", nargs="*", help="variables to watch (default: all)")
    watch.add_argument("--count", type=int, default=0, help="stop after N events (default: until Ctrl-C)")
    watch.add_argument("--no-initial", action="store_true", help="skip the current values")


def parse_value(text: str, type_: str, name: str) -> Any:
    """Read a command-line value as a variable of type ``type_`` (the server validates it after).

    Raises:
        ValidationError: the text is not a value of that type.
    """
    try:
        if type_ == "float":
            return float(text)
        if type_ == "integer":
            return int(text)
        if type_ == "boolean":
            lowered = text.strip().lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError(f"{text!r} is not a boolean (true/false)")
        if type_ in ("embedding", "tensor"):
            return json.loads(text)
    except ValueError as exc:
        raise ValidationError(name, "type", text, f"{name}: {text!r} is not a valid {type_}: {exc}") from None
    return text


def _metadata(pairs: Sequence[str]) -> dict[str, str]:
    meta = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValidationError("", "metadata", pair, f"--meta takes KEY=VALUE, got {pair!r}")
        meta[key] = value
    return meta


# ------------------------------------------------------------------ running


def _emit(out: TextIO, data: Any) -> None:
    out.write(json.dumps(data, ensure_ascii=False, sort_keys=False) + "\n")
    out.flush()


def _exit_code(exc: BaseException) -> int:
    if isinstance(exc, BridgeUnavailableError):
        return EXIT_UNAVAILABLE
    if isinstance(exc, (SessionNotFoundError, VariableNotFoundError)):
        return EXIT_NOT_FOUND
    if isinstance(exc, VersionConflictError):
        return EXIT_CONFLICT
    if isinstance(exc, (ValidationError, BatchUpdateError)):
        return EXIT_INVALID
    return EXIT_ERROR


def run(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run one operator subcommand; print its result and return the exit status."""
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        with connect(args) as conn:
            handler = _HANDLERS[args.command]
            return handler(conn, args, out)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except DSPexError as exc:
        code = _exit_code(exc)
        if args.json:
            _emit(out, {"error": {"type": type(exc).__name__, "message": str(exc), "exit_code": code}})
        print(f"dspex-bridge {args.command}: {exc}", file=err, flush=True)
        return code


def _sessions(conn: Connection, args: argparse.Namespace, out: TextIO) -> int:
    sessions = list_sessions(conn.channel, pattern=args.pattern, timeout=conn.timeout)
    if args.json:
        _emit(
            out,
            [
                {
                    "id": s.id,
                    "variables": s.variables,
                    "created_at": iso_time(s.created_at),
                    "ttl": s.ttl,
                    "expires_in": round(s.expires_in, 3),
                    "metadata": s.metadata,
                }
                for s in sessions
            ],
        )
        return EXIT_OK
    if not sessions:
        print("no sessions", file=out)
        return EXIT_OK
    rows = [[s.id, str(s.variables), format_time(s.created_at), f"{s.expires_in:.0f}s"] for s in sessions]
    print(text_table(rows, ("session", "variables", "created", "expires in")), file=out)
    return EXIT_OK


def _list(conn: Connection, args: argparse.Namespace, out: TextIO) -> int:
    variables = conn.store.list_variables(args.session, args.pattern)
    if args.json:
        _emit(out, [variable_record(v) for v in variables])
        return EXIT_OK
    if not variables:
        print(f"session {args.session} has no variables", file=out)
        return EXIT_OK
    rows = [[v.name, v.type, shown(v), str(v.version), format_time(v.updated_at), v.source] for v in variables]
    print(text_table(rows, ("name", "type", "value", "version", "updated", "by")), file=out)
    return EXIT_OK


def _get(conn: Connection, args: argparse.Namespace, out: TextIO) -> int:
    var = conn.store.get_variable(args.session, args.name)
    if args.json:
        _emit(out, variable_record(var))
    elif is_secret(var.metadata):
        print(SECRET, file=out)
    elif isinstance(var.value, str):
        print(var.value, file=out)
    else:
        print(json.dumps(variable_record(var)["value"]), file=out)
    return EXIT_OK


def _set(conn: Connection, args: argparse.Namespace, out: TextIO) -> int:
    meta = _metadata(args.meta)
    current = conn.store.get_variable(args.session, args.name)
    value = parse_value(args.value, current.type, current.name)
    written = conn.store.set_variable(
        args.session,
        args.name,
        value,
        metadata=meta or None,
        expected_version=args.expected_version,
        source=CLI_SOURCE,
    )
    if args.json:
        _emit(out, variable_record(written))
    else:
        print(f"{written.name} = {shown(written)} (version {written.version})", file=out)
    return EXIT_OK


def _history(conn: Connection, args: argparse.Namespace, out: TextIO) -> int:
    if args.limit < 0:
        raise ValidationError(args.name, "limit", args.limit, f"--limit must be >= 0, got {args.limit}")
    secret = is_secret(conn.store.get_variable(args.session, args.name).metadata)
    entries = conn.store.get_history(args.session, args.name, args.limit)
    if args.json:
        _emit(out, [history_record(e, args.name, secret=secret) for e in entries])
        return EXIT_OK
    print(text_table([history_row(e, secret) for e in entries], HISTORY_HEADERS), file=out)
    return EXIT_OK


def _rollback(conn: Connection, args: argparse.Namespace, out: TextIO) -> int:
    var = conn.store.rollback_variable(args.session, args.name, args.version, source=CLI_SOURCE)
    if args.json:
        _emit(out, variable_record(var))
    else:
        print(f"{var.name} = {shown(var)} (version {var.version}, rolled back to {args.version})", file=out)
    return EXIT_OK


def _watch(conn: Connection, args: argparse.Namespace, out: TextIO) -> int:
    conn.store.get_session(args.session)
    watch = conn.store.watch(args.session, args.names, include_initial=not args.no_initial)
    stop = threading.Event()

    def on_term(signum: int, frame: FrameType | None) -> None:
        stop.set()
        watch.close()

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, on_term)
    seen = 0
    try:
        while not stop.is_set():
            update = watch.next_update(timeout=0.5)
            if update is None:
                if watch.closed:
                    error = getattr(watch, "error", None)
                    if error is not None and not stop.is_set():
                        raise error
                    break
                continue
            event = event_from_update(update)
            if event is None:
                continue
            secret = event.secret
            if args.json:
                _emit(out, event.to_record())
            else:
                meta = (
                    f" [{', '.join(f'{k}={v}' for k, v in sorted(event.metadata.items()))}]" if event.metadata else ""
                )
                print(
                    f"{format_time(event.timestamp)}  {event.name} v{event.version} = "
                    f"{SECRET if secret else format_value(event.value)}"
                    f"  ({event.update_type} by {event.source}){meta}",
                    file=out,
                    flush=True,
                )
            seen += 1
            if args.count and seen >= args.count:
                break
    finally:
        watch.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return EXIT_OK


_HANDLERS: Final = {
    "sessions": _sessions,
    "list": _list,
    "get": _get,
    "set": _set,
    "history": _history,
    "rollback": _rollback,
    "watch": _watch,
}
