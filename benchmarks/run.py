"""Benchmarks: every figure is a ratio against a baseline measured in the same run.

Run with ``make bench`` (or ``python -m benchmarks.run [--quick] [--only NAME ...]``). Prints a
table of medians, p99 and ratios, and writes ``benchmarks/results/latest.json``. Machines here are
noisy, so absolute times are reported for reading only; the targets (DESIGN.md) are on ratios.
Each comparison interleaves rounds of the measured operation and its baseline; ``ratio`` is the
ratio of medians (the target is judged on it) and ``best-of`` the ratio of the fastest rounds,
which shows the cost when neither side was disturbed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


@dataclass
class Row:
    """One measured figure and, when it has one, its baseline and target ratio."""

    name: str
    median_us: float
    p99_us: float
    baseline: str = ""
    baseline_us: float = 0.0
    ratio: float = 0.0
    best_ratio: float = 0.0
    target: str = ""
    met: bool | None = None


def measure(fn: Callable[[], Any], *, batch: int, rounds: int) -> list[float]:
    """Per-call times in microseconds: ``rounds`` samples, each the mean over ``batch`` calls."""
    for _ in range(min(batch, 1000)):
        fn()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(batch):
            fn()
        samples.append((time.perf_counter() - start) / batch * 1e6)
    return samples


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


def compare(
    rows: list[Row],
    name: str,
    fn: Callable[[], Any],
    baseline_name: str,
    baseline: Callable[[], Any],
    *,
    target: float | None,
    batch: int,
    rounds: int,
) -> None:
    """Measure ``fn`` and ``baseline`` interleaved (so drift hits both) and append a row."""
    ours: list[float] = []
    base: list[float] = []
    for _ in range(rounds):
        base.extend(measure(baseline, batch=batch, rounds=1))
        ours.extend(measure(fn, batch=batch, rounds=1))
    med, bmed = statistics.median(ours), statistics.median(base)
    ratio = med / bmed if bmed else 0.0
    best = min(ours) / min(base) if min(base) else 0.0
    rows.append(
        Row(
            name,
            med,
            p99(ours),
            baseline_name,
            bmed,
            ratio,
            best,
            f"<= {target}x" if target is not None else "",
            (ratio <= target) if target is not None else None,
        )
    )
    print(f"  {name}: {med:.3f} us vs {baseline_name} {bmed:.3f} us -> {ratio:.2f}x (best-of {best:.2f}x)", flush=True)


# ----------------------------------------------------------------------------- sections


def bench_local(rows: list[Row], quick: bool) -> None:
    from dspex_dspy import Context, Variables

    lock = threading.Lock()
    table = {"temperature": 0.7}

    def dict_get() -> Any:
        with lock:
            return table["temperature"]

    def dict_set() -> None:
        with lock:
            table["temperature"] = 0.9

    ctx = Context()
    Variables.defvariable(ctx, "temperature", "float", 0.7, constraints={"min": 0.0, "max": 2.0})
    get, set_ = Variables.get, Variables.set
    rounds, batch = (15, 5000) if quick else (40, 20000)
    compare(
        rows,
        "LocalState get",
        lambda: get(ctx, "temperature"),
        "dict get under a lock",
        dict_get,
        target=3.0,
        batch=batch,
        rounds=rounds,
    )
    compare(
        rows,
        "LocalState set (validated)",
        lambda: set_(ctx, "temperature", 0.9),
        "dict set under a lock",
        dict_set,
        target=10.0,
        batch=batch,
        rounds=rounds,
    )
    ctx.stop()


def _ping_baseline(address: str) -> tuple[Any, Callable[[], Any]]:
    import grpc

    from dspex_dspy._proto import snakepit_bridge_pb2 as pb
    from dspex_dspy._proto import snakepit_bridge_pb2_grpc as pb_grpc

    channel = grpc.insecure_channel(address)
    stub = pb_grpc.BridgeServiceStub(channel)
    request = pb.PingRequest(message="ping")
    return channel, lambda: stub.Ping(request, timeout=10)


def _start_remote_server(*extra: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "dspex_dspy.cli", "serve", "--port", "0", "--log-level", "WARNING", *extra],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "listening on" in line:
            return proc, line.rsplit(" ", 1)[-1].strip()
    raise RuntimeError("the bridge server did not start")


def bench_bridged(rows: list[Row], quick: bool) -> None:
    from dspex_dspy import Context, Variables

    rounds, batch = (8, 200) if quick else (20, 500)
    proc, address = _start_remote_server()
    try:
        channel, ping = _ping_baseline(address)
        for label, ctx in (
            ("embedded", Context(backend="bridged")),
            ("remote", Context(bridge=address, backend="bridged")),
        ):
            for i in range(20):
                Variables.defvariable(ctx, f"perf_{i}", "float", i * 0.1)
            if label == "remote":
                compare(
                    rows,
                    "bridged get (remote, uncached)",
                    lambda c=ctx: Variables.get(c, "perf_10"),
                    "raw gRPC Ping",
                    ping,
                    target=1.2,
                    batch=batch,
                    rounds=rounds,
                )
                compare(
                    rows,
                    "bridged set (remote)",
                    lambda c=ctx: Variables.set(c, "perf_10", 0.5),
                    "raw gRPC Ping",
                    ping,
                    target=None,
                    batch=batch,
                    rounds=rounds,
                )
                names = [f"perf_{i}" for i in range(10)]
                compare(
                    rows,
                    "batch get of 10 (remote)",
                    lambda c=ctx, n=names: Variables.get_many(c, n),
                    "10 single remote gets",
                    lambda c=ctx, n=names: [Variables.get(c, x) for x in n],
                    target=0.25,
                    batch=max(20, batch // 10),
                    rounds=rounds,
                )
            else:
                # The embedded bridge reads the store in process, as the Elixir node reads its table.
                compare(
                    rows,
                    "bridged get (embedded)",
                    lambda c=ctx: Variables.get(c, "perf_10"),
                    "raw gRPC Ping",
                    ping,
                    target=None,
                    batch=batch,
                    rounds=rounds,
                )
                compare(
                    rows,
                    "bridged set (embedded)",
                    lambda c=ctx: Variables.set(c, "perf_10", 0.5),
                    "raw gRPC Ping",
                    ping,
                    target=None,
                    batch=batch,
                    rounds=rounds,
                )
            ctx.stop()
        channel.close()
    finally:
        proc.terminate()
        proc.wait(10)


def bench_switch(rows: list[Row], quick: bool) -> None:
    from dspex_dspy import Context, Variables

    for count, target_ms in ((100, 20.0), (10_000, 1000.0)):
        times = []
        for _ in range(3 if quick or count > 1000 else 10):
            ctx = Context()
            for i in range(count):
                Variables.defvariable(
                    ctx, f"var_{i}", "integer", i, constraints={"min": 0, "max": 100_000}, metadata={"index": str(i)}
                )
            start = time.perf_counter()
            ctx.ensure_bridged()
            times.append((time.perf_counter() - start) * 1e6)
            ctx.stop()
        med = statistics.median(times)
        rows.append(
            Row(
                f"switch with {count} variables",
                med,
                max(times),
                target=f"<= {target_ms:g} ms",
                met=med / 1000 <= target_ms,
            )
        )
        print(f"  switch with {count} variables: {med / 1000:.2f} ms", flush=True)


_WATCHER = """
import sys
from dspex_dspy.client import SessionContext
session = SessionContext.connect(sys.argv[1], session_id=sys.argv[2], cache=False)
with session.watch_variables(["signal"]) as watch:
    for event in watch:
        print(event.version, flush=True)
"""


def bench_workers(rows: list[Row], quick: bool) -> None:
    from dspex_dspy import Context, Variables
    from dspex_dspy.client import SessionContext

    lock = threading.Lock()
    table = {"temperature": 0.7}

    def dict_get() -> Any:
        with lock:
            return table["temperature"]

    proc, address = _start_remote_server()
    try:
        channel, ping = _ping_baseline(address)
        ctx = Context(bridge=address, backend="bridged")
        Variables.defvariable(ctx, "temperature", "float", 0.7)
        Variables.defvariable(ctx, "signal", "integer", 0)
        cached = SessionContext.connect(address, session_id=ctx.id)
        cached.wait_synced(30)
        uncached = SessionContext.connect(address, session_id=ctx.id, cache=False)
        rounds = 8 if quick else 20
        compare(
            rows,
            "worker read (watch-fed cache)",
            lambda: cached.get_variable("temperature"),
            "dict get under a lock",
            dict_get,
            target=20.0,
            batch=5000,
            rounds=rounds,
        )
        compare(
            rows,
            "worker get (uncached, gRPC)",
            lambda: uncached.get_variable("temperature"),
            "raw gRPC Ping",
            ping,
            target=1.2,
            batch=200 if quick else 500,
            rounds=rounds,
        )

        watcher = subprocess.Popen([sys.executable, "-c", _WATCHER, address, ctx.id], stdout=subprocess.PIPE, text=True)
        assert watcher.stdout is not None
        watcher.stdout.readline()  # the initial value: the watch is registered
        latencies, pings = [], []
        for i in range(50 if quick else 200):
            start = time.perf_counter()
            version = Variables.set(ctx, "signal", i + 1)
            while int(watcher.stdout.readline()) < version:
                pass
            latencies.append((time.perf_counter() - start) * 1e6)
            start = time.perf_counter()
            ping()
            pings.append((time.perf_counter() - start) * 1e6)
        watcher.terminate()
        watcher.wait(10)
        med, bmed = statistics.median(latencies), statistics.median(pings)
        rows.append(
            Row(
                "set -> seen by a watcher in another process",
                med,
                p99(latencies),
                baseline="raw gRPC Ping",
                baseline_us=bmed,
                ratio=med / bmed,
                best_ratio=min(latencies) / min(pings),
                target="<= 2.0x",
                met=med / bmed <= 2.0,
            )
        )
        print(f"  set -> watcher in another process: {med:.1f} us vs Ping {bmed:.1f} us -> {med / bmed:.2f}x")
        cached.close()
        uncached.close()
        ctx.stop()
        channel.close()
    finally:
        proc.terminate()
        proc.wait(10)


_WRITER = """
import sys, time
from dspex_dspy.client import SessionContext
address, session, name, seconds = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
ctx = SessionContext.connect(address, session_id=session, cache=False)
ctx.set_variable(name, 0)
print("ready", flush=True)
sys.stdin.readline()
n, end = 0, time.perf_counter() + seconds
while time.perf_counter() < end:
    n += 1
    ctx.set_variable(name, n)
print(n, flush=True)
ctx.close()
"""

_PINGER = """
import sys, time, grpc
from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy._proto import snakepit_bridge_pb2_grpc as pb_grpc
address, seconds = sys.argv[1], float(sys.argv[2])
stub = pb_grpc.BridgeServiceStub(grpc.insecure_channel(address))
request = pb.PingRequest(message="ping")
stub.Ping(request, timeout=10)
print("ready", flush=True)
sys.stdin.readline()
n, end = 0, time.perf_counter() + seconds
while time.perf_counter() < end:
    stub.Ping(request, timeout=10)
    n += 1
print(n, flush=True)
"""

_PLAIN_SERVER = """
import sys, time
from concurrent import futures
import grpc
from dspex_dspy._proto import snakepit_bridge_pb2 as pb
def ping(request, context):
    return pb.PingResponse(message="pong")
handler = grpc.method_handlers_generic_handler("snakepit.bridge.BridgeService", {
    "Ping": grpc.unary_unary_rpc_method_handler(
        ping, request_deserializer=pb.PingRequest.FromString, response_serializer=pb.PingResponse.SerializeToString)})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
server.add_generic_rpc_handlers((handler,))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(f"127.0.0.1:{port}", flush=True)
sys.stdin.readline()
server.stop(0)
"""


def _burst(commands: list[list[str]]) -> float:
    """Start the processes, release them together once all are ready; their summed counts per second."""
    procs = [
        subprocess.Popen([sys.executable, "-c", *c], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for c in commands
    ]
    try:
        for proc in procs:
            assert proc.stdin is not None and proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        total = 0
        for proc in procs:
            assert proc.stdout is not None
            total += int(proc.stdout.readline())
        return float(total)
    finally:
        for proc in procs:
            proc.wait(30)


@contextlib.contextmanager
def _plain_servers(count: int) -> Iterator[list[str]]:
    """``count`` plain gRPC servers (Ping only) in processes of their own; their addresses."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _PLAIN_SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(count)
    ]
    try:
        yield [p.stdout.readline().strip() for p in procs if p.stdout is not None]
    finally:
        for p in procs:
            if p.stdin is not None:
                p.stdin.close()
            p.wait(10)


def bench_throughput(rows: list[Row], quick: bool) -> None:
    from dspex_dspy import Context, Variables

    writers = 4
    seconds = 2.0 if quick else 4.0
    rounds = 1 if quick else 5
    proc, address = _start_remote_server()
    try:
        # The baseline: the same processes calling Ping on as many plain gRPC servers as nodes (one).
        with _plain_servers(1) as plain_addresses:
            ctx = Context(bridge=address, backend="bridged")
            for i in range(writers):
                Variables.defvariable(ctx, f"w{i}", "integer", 0)
            pings, (writes,) = _alternating(
                plain_addresses,
                [lambda: _burst([[_WRITER, address, ctx.id, f"w{i}", str(seconds)] for i in range(writers)]) / seconds],
                seconds,
                rounds,
            )
            _sustained_row(
                rows,
                f"writes from {writers} worker processes, 1 node",
                writes,
                pings,
                f"raw Ping, {writers} processes, 1 plain server",
                "<= 1.43x",
                0.7,
            )
            ctx.stop()
    finally:
        proc.terminate()
        proc.wait(10)


def bench_modules(rows: list[Row], quick: bool) -> None:
    import dspy

    from dspex_dspy import Context, Variables
    from dspex_dspy.modules import VariableAwarePredict
    from dspex_dspy.offline import offline_lm

    ctx = Context()
    Variables.defvariable(ctx, "temperature", "float", 0.7)
    Variables.defvariable(ctx, "max_tokens", "integer", 256)
    lm = offline_lm("offline/bench")
    plain = dspy.Predict("question -> answer")
    bound = VariableAwarePredict("question -> answer", session_context=ctx)
    config = {"temperature": 0.7, "max_tokens": 256}
    with dspy.context(lm=lm):
        compare(
            rows,
            "VariableAwarePredict call (2 bound vars)",
            lambda: bound(question="q"),
            "plain dspy.Predict, same engine",
            lambda: plain(question="q", config=config),
            target=1.05,
            batch=50 if quick else 200,
            rounds=8 if quick else 20,
        )
    ctx.stop()


def _start_redis(directory: str) -> tuple[subprocess.Popen[bytes], str]:
    """A throw-away redis-server on a free loopback port (no persistence)."""
    import socket

    import redis

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", directory, "--save", ""],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if client.ping():
                break
        except redis.ConnectionError:
            time.sleep(0.05)
    client.close()
    return proc, f"redis://127.0.0.1:{port}/0"


# The call a load process makes, by kind: a raw ``Ping``, a bare stub sending ready-made
# ``SetVariable`` requests (``raw-set``: no client library in the way) or a worker's
# ``set_variable`` (``set``). Shared by the sustained loads and ``benchmarks.instructions``.
CALL_MAKER = """
import grpc
from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy._proto import snakepit_bridge_pb2_grpc as pb_grpc
def make_call(kind, address, session, name, timeout):
    if kind == "ping":
        stub = pb_grpc.BridgeServiceStub(grpc.insecure_channel(address))
        request = pb.PingRequest(message="ping")
        return lambda i: stub.Ping(request, timeout=timeout)
    if kind == "raw-set":
        from google.protobuf import any_pb2
        stub = pb_grpc.BridgeServiceStub(grpc.insecure_channel(address))
        def call(i):
            value = any_pb2.Any(type_url="type.googleapis.com/snakepit.integer", value=str(i).encode())
            request = pb.SetVariableRequest(session_id=session, variable_identifier=name, value=value)
            stub.SetVariable(request, timeout=timeout)
        return call
    from dspex_dspy.client import SessionContext
    ctx = SessionContext.connect(address, session_id=session, cache=False, timeout=timeout)
    return lambda i: ctx.set_variable(name, i)
"""

_LOAD = (
    CALL_MAKER
    + """
import sys, time
kind, address, session, name, seconds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5])
call = make_call(kind, address, session, name, 10)
for i in range(50):
    call(i)
print("ready", flush=True)
sys.stdin.readline()
count, end = 0, time.perf_counter() + seconds
while time.perf_counter() < end:
    call(count)
    count += 1
print(count, flush=True)
"""
)


_FLOOR_NODE = """
import asyncio, sys
import grpc
from dspex_dspy._proto import snakepit_bridge_pb2 as pb
from dspex_dspy.aio_server import new_event_loop
from dspex_dspy.store._redis_loop import LoopRedis
# The least a node can do per write and still be a store: one atomic script that checks the
# expected version, bumps it, keeps the value and appends the change to a bounded stream.
SCRIPT = \"\"\"
local current = tonumber(redis.call('HGET', KEYS[1], 'version') or '0')
if tonumber(ARGV[2]) > 0 and tonumber(ARGV[2]) ~= current then return -current end
redis.call('HSET', KEYS[1], 'version', current + 1, 'value', ARGV[1])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', 1000, '*', 'v', ARGV[1])
return current + 1
\"\"\"
async def main():
    client = LoopRedis(sys.argv[1])  # the bridge node's own Redis client
    async def set_variable(request, context):
        key = "{floor:" + request.session_id + "}:"
        version = await client.script(SCRIPT, [key + request.variable_identifier, key + "log"],
                                      [request.value.value, request.expected_version])
        return pb.SetVariableResponse(success=version > 0, new_version=abs(version))
    handler = grpc.method_handlers_generic_handler("snakepit.bridge.BridgeService", {
        "SetVariable": grpc.unary_unary_rpc_method_handler(
            set_variable, request_deserializer=pb.SetVariableRequest.FromString,
            response_serializer=pb.SetVariableResponse.SerializeToString)})
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(f"127.0.0.1:{port}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    await server.stop(0)
loop = new_event_loop()  # the node's own loop (uvloop where installed)
loop.run_until_complete(main())
"""


def _sustained(kind: str, addresses: list[str], session: str, seconds: float) -> float:
    """Calls per second from 4 processes, each on one of ``addresses`` in turn, started together."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _LOAD, kind, addresses[i % len(addresses)], session, f"load_{i}", str(seconds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    for proc in procs:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    total = 0
    for proc in procs:
        assert proc.stdout is not None
        total += int(proc.stdout.readline())
        proc.wait(30)
    return total / seconds


def bench_redis(rows: list[Row], quick: bool) -> None:
    """Bridge nodes on Redis: a get through a node, and a write via node A seen by a watcher via B."""
    import tempfile

    import redis

    from dspex_dspy import Context, Variables
    from dspex_dspy.client import SessionContext
    from dspex_dspy.remote import RemoteStore

    rounds, batch = (8, 200) if quick else (20, 500)
    with tempfile.TemporaryDirectory() as directory:
        redis_proc, url = _start_redis(directory)
        node_a, address_a = _start_remote_server("--storage", url)
        node_b, address_b = _start_remote_server("--storage", url)
        try:
            channel, ping = _ping_baseline(address_a)
            raw = redis.Redis.from_url(url)
            raw.set("bench:key", "0.7")
            ctx = Context(bridge=address_a, backend="bridged")
            Variables.defvariable(ctx, "temperature", "float", 0.7)
            Variables.defvariable(ctx, "signal", "integer", 0)

            # The floor of a get through a node is one hop to the node and one from the node to
            # Redis: a raw gRPC Ping plus a raw redis-py GET, made one after the other.
            def ping_and_get() -> None:
                ping()
                raw.get("bench:key")

            compare(
                rows,
                "Redis-backed bridged get (remote node)",
                lambda: Variables.get(ctx, "temperature"),
                "raw gRPC Ping + raw redis-py GET",
                ping_and_get,
                target=1.3,
                batch=batch,
                rounds=rounds,
            )
            compare(
                rows,
                "Redis-backed bridged get (remote node)",
                lambda: Variables.get(ctx, "temperature"),
                "raw gRPC Ping",
                ping,
                target=None,
                batch=batch,
                rounds=rounds,
            )
            compare(
                rows,
                "Redis-backed bridged set (remote node)",
                lambda: Variables.set(ctx, "temperature", 0.5),
                "raw gRPC Ping",
                ping,
                target=None,
                batch=batch,
                rounds=rounds,
            )
            writer = RemoteStore.connect(address_a)
            watcher = SessionContext.connect(address_b, session_id=ctx.id)
            watcher.wait_synced(30)
            latencies, pings = [], []
            for i in range(50 if quick else 300):
                start = time.perf_counter()
                version = writer.set_variable(ctx.id, "signal", i + 1).version
                watcher.wait_cached("signal", version, timeout=30)
                latencies.append((time.perf_counter() - start) * 1e6)
                start = time.perf_counter()
                ping()
                pings.append((time.perf_counter() - start) * 1e6)
            med, bmed = statistics.median(latencies), statistics.median(pings)
            rows.append(
                Row(
                    "write via node A -> seen by a watcher via node B",
                    med,
                    p99(latencies),
                    baseline="raw gRPC Ping",
                    baseline_us=bmed,
                    ratio=med / bmed,
                    best_ratio=min(latencies) / min(pings),
                    target="<= 2.5x",
                    met=med / bmed <= 2.5,
                )
            )
            print(f"  cross-node watch: {med:.1f} us vs Ping {bmed:.1f} us -> {med / bmed:.2f}x", flush=True)
            watcher.close()
            writer.close()
            for i in range(4):
                Variables.defvariable(ctx, f"load_{i}", "integer", 0)
            seconds, rounds = (2.0, 1) if quick else (5.0, 3)
            for label, addresses in (("1 node", [address_a]), ("2 nodes", [address_a, address_b])):
                # The baseline: the same 4 processes calling Ping on as many plain gRPC servers
                # (a bare handler, no bridge in it) as there are nodes, measured in turn with the writes.
                with _plain_servers(len(addresses)) as plain_addresses:
                    pings, [writes] = _alternating(
                        plain_addresses, [lambda a=addresses: _sustained("set", a, ctx.id, seconds)], seconds, rounds
                    )
                _sustained_row(
                    rows,
                    f"sustained writes, 4 processes, {label}",
                    writes,
                    pings,
                    f"raw Ping calls/s, 4 processes, {len(addresses)} plain server(s)",
                    "writes >= 0.7x Ping/s",
                    0.7,
                )
            _write_floor(rows, url, [address_a, address_b], ctx.id, seconds, rounds)
            ctx.stop()

            times = []
            for _ in range(2 if quick else 3):
                big = Context(bridge=address_b)
                for i in range(10_000):
                    Variables.defvariable(big, f"var_{i}", "integer", i, metadata={"index": str(i)})
                start = time.perf_counter()
                big.ensure_bridged()
                times.append((time.perf_counter() - start) * 1e6)
                big.stop()
            med = statistics.median(times)
            rows.append(
                Row(
                    "switch of 10,000 variables to a remote Redis node",
                    med,
                    max(times),
                    target="<= 1000 ms",
                    met=med <= 1e6,
                )
            )
            print(f"  switch of 10,000 variables to a remote Redis node: {med / 1000:.1f} ms", flush=True)
            raw.close()
            channel.close()
        finally:
            for proc in (node_a, node_b):
                proc.terminate()
                proc.wait(10)
            redis_proc.terminate()
            redis_proc.wait(10)


def _alternating(
    plain_addresses: list[str], loads: list[Callable[[], float]], seconds: float, rounds: int
) -> tuple[list[float], list[list[float]]]:
    """Raw Ping calls/s from 4 processes on ``plain_addresses``, and each of ``loads``, measured in turn
    ``rounds`` times, so the baseline and the loads meet the same moments of a noisy machine."""
    pings: list[float] = []
    results: list[list[float]] = [[] for _ in loads]
    count = len(plain_addresses)
    for _ in range(rounds):
        pings.append(_burst([[_PINGER, plain_addresses[i % count], str(seconds)] for i in range(4)]) / seconds)
        for load, got in zip(loads, results, strict=True):
            got.append(load())
    return pings, results


def _sustained_row(
    rows: list[Row],
    name: str,
    writes: list[float],
    pings: list[float],
    baseline: str,
    target: str,
    minimum: float | None = None,
) -> None:
    """A sustained-writes row, printed as it is added: the median writes/s and Ping calls/s of the
    rounds, and the median of the rounds' ratios (each round's writes against its own Ping); the
    best round goes in the p99 and best-of columns."""
    ratios = [w / p for w, p in zip(writes, pings, strict=True)]
    ratio = statistics.median(ratios)
    rate, ping_rate = statistics.median(writes), statistics.median(pings)
    rows.append(
        Row(
            name,
            1e6 / rate,
            1e6 / max(writes),
            baseline=baseline,
            baseline_us=1e6 / ping_rate,
            ratio=1 / ratio,
            best_ratio=1 / max(ratios),
            target=target,
            met=None if minimum is None else ratio >= minimum,
        )
    )
    spread = f" (rounds {min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
    print(f"  {name}: {rate:.0f}/s vs Ping {ping_rate:.0f}/s -> {ratio:.2f}x{spread}", flush=True)


def _write_floor(rows: list[Row], url: str, nodes: list[str], session: str, seconds: float, rounds: int) -> None:
    """Where the sustained-write ratio can go on this machine at all, and where its cost lies.

    The same 4 processes, against the same plain-server Ping baselines, in turn send bare
    ``SetVariable`` stubs (no client library) to the bridge nodes, then to as many *floor nodes*:
    ``grpc.aio`` servers whose only work per write is one Lua script on the same Redis, through the
    bridge node's own Redis client (check the version, bump it, keep the value, append to a bounded
    stream), with no validation, history, leases, limits or auth. No node that stores each write
    in Redis before answering can do less, so the floor's ratio bounds what any such node reaches
    on this machine, with one node and with two.
    """
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _FLOOR_NODE, url], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in nodes
    ]
    try:
        floors = [proc.stdout.readline().strip() for proc in procs if proc.stdout is not None]
        for count in (1, 2):
            targets = (
                (
                    f"bare SetVariable stubs, {count} bridge node(s)",
                    nodes[:count],
                    "the nodes without the client library",
                ),
                (
                    f"bare SetVariable stubs, {count} floor node(s)",
                    floors[:count],
                    "the least any Redis-backed node can do",
                ),
            )
            with _plain_servers(count) as plain:
                pings, results = _alternating(
                    plain,
                    [lambda a=addresses: _sustained("raw-set", a, session, seconds) for _, addresses, _ in targets],
                    seconds,
                    rounds,
                )
            for (label, _, note), writes in zip(targets, results, strict=True):
                _sustained_row(
                    rows,
                    f"sustained writes, 4 processes, {label}",
                    writes,
                    pings,
                    f"raw Ping calls/s, 4 processes, {count} plain server(s) ({note})",
                    "reference",
                )
    finally:
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()
            proc.wait(10)


def bench_security(rows: list[Row], quick: bool) -> None:
    """An uncached get through TLS with a bearer token vs the same get in plaintext, both remote."""
    import secrets
    import tempfile

    from dspex_dspy.remote import RemoteStore
    from dspex_dspy.tokens import mint_token
    from tests.support.tls_material import make_material

    rounds, batch = (8, 200) if quick else (20, 500)
    with tempfile.TemporaryDirectory() as tmp:
        material = make_material(Path(tmp))
        secret = Path(tmp) / "secret"
        secret.write_text(secrets.token_hex(32))
        plain_proc, plain_address = _start_remote_server()
        tls_proc, tls_address = _start_remote_server(
            "--tls-cert",
            str(material.server.cert_path),
            "--tls-key",
            str(material.server.key_path),
            "--auth-secret-file",
            str(secret),
        )
        try:
            token = mint_token(secret.read_text(), sub="bench", sessions=["bench"], perms="read,write", ttl=3600)
            plain = RemoteStore.connect(plain_address)
            secure = RemoteStore.connect(tls_address, root_certificates=material.ca.cert, token=token)
            for store in (plain, secure):
                store.create_session("bench")
                store.register_variable("bench", "temperature", "float", 0.7)
            compare(
                rows,
                "authenticated TLS get (remote, uncached)",
                lambda: secure.get_variable("bench", "temperature"),
                "plaintext get, no token",
                lambda: plain.get_variable("bench", "temperature"),
                target=1.15,
                batch=batch,
                rounds=rounds,
            )
            plain.close()
            secure.close()
        finally:
            for proc in (plain_proc, tls_proc):
                proc.terminate()
                proc.wait(10)


def bench_tuner(rows: list[Row], quick: bool) -> None:
    """VariableTuner per trial against ``dspy.Evaluate`` run directly on the same values.

    A tuner run is ask (the sampler), per-call trial values, ``dspy.Evaluate``, tell, plus the lease
    and the publication amortised over its trials; the baseline writes each trial's values to the
    session and runs the same ``dspy.Evaluate``. The TPE row is the target; the random-sampler row
    shows the tuner's own machinery without TPE's model fitting.
    """
    import logging

    import dspy
    import optuna

    from dspex_dspy import Context, Variables
    from dspex_dspy.modules import VariableAwarePredict
    from dspex_dspy.offline import offline_lm, settings_quality
    from dspex_dspy.tune import VariableTuner

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("dspy.evaluate").setLevel(logging.WARNING)
    models = ["offline/small", "offline/medium", "offline/large"]
    ctx = Context()
    Variables.defvariable(ctx, "temperature", "float", 1.2, constraints={"min": 0.0, "max": 1.5})
    Variables.defvariable(ctx, "max_tokens", "integer", 64, constraints={"min": 16, "max": 4096})
    Variables.defvariable(ctx, "model", "string", models[0], constraints={"enum": models})
    program = VariableAwarePredict("question -> answer", session_context=ctx)
    program.bind_to_variable("model", "model")
    devset = [dspy.Example(question=f"question {i}").with_inputs("question") for i in range(32)]
    evaluate = dspy.Evaluate(devset=devset, metric=lambda e, p, t=None: settings_quality(p.answer), num_threads=1)
    trials = 20

    for label, make_sampler, target in (
        ("TPE", lambda: optuna.samplers.TPESampler(seed=0), 1.1),
        ("random sampler", lambda: optuna.samplers.RandomSampler(seed=0), None),
    ):

        def tune(make_sampler: Callable[[], Any] = make_sampler) -> VariableTuner:
            tuner = VariableTuner(
                evaluate.metric, num_trials=trials, sampler=make_sampler(), num_threads=1, progress=False
            )
            tuner.compile(program, trainset=devset)
            return tuner

        with dspy.context(lm=offline_lm(models[0])):
            first = tune().result
            assert first is not None
            values = [t.values for t in first.trials]

            def direct(values: list[dict[str, Any]] = values) -> None:
                for trial in values:
                    Variables.update_many(ctx, trial)
                    evaluate(program)

            compare(
                rows,
                f"tuner, {label}: {trials} trials x {len(devset)} ex.",
                tune,
                "dspy.Evaluate, same values, direct",
                direct,
                target=target,
                batch=1,
                rounds=3 if quick else 8,
            )
    ctx.stop()


SECTIONS: dict[str, Callable[[list[Row], bool], None]] = {
    "local": bench_local,
    "bridged": bench_bridged,
    "switch": bench_switch,
    "workers": bench_workers,
    "throughput": bench_throughput,
    "modules": bench_modules,
    "redis": bench_redis,
    "security": bench_security,
    "tuner": bench_tuner,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    parser.add_argument("--only", nargs="*", choices=sorted(SECTIONS), help="run only these sections")
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json", help="where to write the JSON results")
    args = parser.parse_args(argv)
    rows: list[Row] = []
    for name, section in SECTIONS.items():
        if args.only and name not in args.only:
            continue
        print(f"[{name}]", flush=True)
        section(rows, args.quick)
    print()
    print(f"{'benchmark':44} {'median':>12} {'p99':>12} {'ratio':>7} {'best-of':>7}  {'target':>10}  baseline")
    for r in rows:
        ratio = f"{r.ratio:.2f}x" if r.baseline else ""
        best = f"{r.best_ratio:.2f}x" if r.best_ratio else ""
        status = "" if r.met is None else (" ok" if r.met else " MISSED")
        print(
            f"{r.name:44} {r.median_us:10.3f}us {r.p99_us:10.3f}us {ratio:>7} {best:>7}  {r.target:>10}{status}  {r.baseline}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    machine = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    args.out.write_text(json.dumps({"machine": machine, "rows": [asdict(r) for r in rows]}, indent=2))
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
