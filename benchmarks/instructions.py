"""Instructions per call of every process a call runs through, counted by callgrind.

Run with ``make bench-instructions`` (or ``python -m benchmarks.instructions [--calls N]``). Timed
figures on a shared 2-core machine move by a tenth or more between runs; instruction counts do
not (two runs agree within about 0.1%), so they show what a change to the write path costs or
saves, and what the sustained-write ratio is bounded by, whatever else the machine is doing.

Each process of a call (the client, the server and, for writes, redis-server) runs under
``valgrind --tool=callgrind``. One client makes ``--calls`` calls one after another, after a
warm-up; its own counters and the other processes' are zeroed just before the measured calls
(``callgrind_control -z``) and dumped just after (``-d``). The counts are user-space instructions
only: the kernel's share of a call (system calls, the loopback network) is not in them, nor are
cache misses or waits. The scenarios are the sustained-write rows' parts: a raw ``Ping`` to a
plain gRPC server (the baseline), a bare ``SetVariable`` stub to a *floor node* (one Lua script
per write, see ``benchmarks.run``), the same stub to a bridge node on Redis, and a worker's
``SessionContext.set_variable`` to that node. The last column divides the call's instructions
across all processes by the ``Ping``'s: on a machine whose cores the processes share, that is
about the inverse of the writes/s : Ping/s ratio the CPU allows, kernel work aside.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.run import _FLOOR_NODE, _PLAIN_SERVER, CALL_MAKER, RESULTS

_CLIENT = (
    CALL_MAKER
    + r"""
import os, subprocess, sys
kind, address, session, calls = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
pids = [os.getpid(), *(int(p) for p in sys.argv[5].split(",") if p)]
call = make_call(kind, address, session, "x", 120)
for i in range(200):
    call(i)
def control(flag):
    for pid in pids:
        subprocess.run(["callgrind_control", flag, str(pid)], check=True, capture_output=True)
control("-z")
for i in range(calls):
    call(i)
control("-d")
"""
)


@dataclass
class Count:
    """Instructions per call of one scenario, by process."""

    scenario: str
    client: float
    server: float
    redis: float

    @property
    def total(self) -> float:
        return self.client + self.server + self.redis


class _Callgrind:
    """Processes started under callgrind, each writing its counts into one directory."""

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def command(self, *argv: str) -> list[str]:
        return ["valgrind", "--tool=callgrind", f"--callgrind-out-file={self.directory}/cg.%p", *argv]

    def dumped(self, pid: int, calls: int, deadline_s: float = 60.0) -> float:
        """Instructions per call in ``pid``'s dump (the one after the counters were zeroed)."""
        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            for path in glob.glob(f"{self.directory}/cg.{pid}.*"):
                found = re.search(r"^(?:summary|totals): (\d+)", Path(path).read_text(), re.M)
                if found:
                    return int(found.group(1)) / calls
            time.sleep(0.1)
        raise RuntimeError(f"callgrind wrote no dump for process {pid}")


def _ready_line(proc: subprocess.Popen[str], marker: str) -> str:
    assert proc.stdout is not None
    for line in proc.stdout:
        if marker in line:
            return line.strip()
    raise RuntimeError(f"a process under callgrind did not start (no {marker!r})")


@contextmanager
def _redis(grind: _Callgrind, directory: str) -> Iterator[tuple[subprocess.Popen[str], str]]:
    import socket

    import redis

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--dir", directory, "--save", ""]
    proc = subprocess.Popen(grind.command(*argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True)
    client = redis.Redis(port=port)
    end = time.monotonic() + 120
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > end:
                raise
            time.sleep(0.1)
    client.close()
    try:
        yield proc, f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(60)


@contextmanager
def _server(argv: list[str], marker: str, grind: _Callgrind) -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = subprocess.Popen(
        grind.command(*argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    try:
        line = _ready_line(proc, marker)
        yield proc, line.rsplit(" ", 1)[-1]
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        proc.terminate()
        proc.wait(60)


def _measure(
    scenario: str,
    kind: str,
    address: str,
    session: str,
    calls: int,
    server: subprocess.Popen[str],
    redis_proc: subprocess.Popen[str] | None,
    grind: _Callgrind,
) -> Count:
    others = [server.pid] + ([redis_proc.pid] if redis_proc is not None else [])
    client = subprocess.run(
        grind.command(sys.executable, "-c", _CLIENT, kind, address, session, str(calls), ",".join(map(str, others))),
        capture_output=True,
        text=True,
        check=False,
    )
    if client.returncode != 0:
        raise RuntimeError(f"the {scenario} client failed:\n{client.stderr[-2000:]}")
    dumps = [path for path in glob.glob(f"{grind.directory}/cg.*.*") if re.search(r"\.\d+\.\d+$", path)]
    client_pid = next(int(path.split(".")[-2]) for path in dumps if int(path.split(".")[-2]) not in others)
    count = Count(
        scenario,
        client=grind.dumped(client_pid, calls),
        server=grind.dumped(server.pid, calls),
        redis=grind.dumped(redis_proc.pid, calls) if redis_proc is not None else 0.0,
    )
    for path in glob.glob(f"{grind.directory}/cg.*"):
        os.remove(path)  # the next scenario's processes find only their own
    print(
        f"  {scenario}: client {count.client:,.0f}, server {count.server:,.0f}, redis {count.redis:,.0f}"
        f" -> {count.total:,.0f} instructions per call",
        flush=True,
    )
    return count


def measure(calls: int) -> list[Count]:
    """Count the four scenarios (see the module's docstring)."""
    from dspex_dspy.remote import RemoteStore

    counts: list[Count] = []
    with tempfile.TemporaryDirectory() as tmp:
        grind = _Callgrind(tmp)
        plain = [sys.executable, "-c", _PLAIN_SERVER]
        with _server(plain, "127.0.0.1:", grind) as (server, address):
            counts.append(_measure("raw gRPC Ping, plain server", "ping", address, "", calls, server, None, grind))
        with _redis(grind, tmp) as (redis_proc, url):
            with _server([sys.executable, "-c", _FLOOR_NODE, url], "127.0.0.1:", grind) as (server, address):
                counts.append(
                    _measure(
                        "bare SetVariable stub, floor node", "raw-set", address, "s", calls, server, redis_proc, grind
                    )
                )
            node = [sys.executable, "-m", "dspex_dspy.cli", "serve", "--port", "0", "--log-level", "WARNING"]
            with _server([*node, "--storage", url], "listening on", grind) as (server, address):
                with RemoteStore.connect(address, timeout=120, call_timeout=120) as setup:
                    setup.create_session("s")
                    setup.register_variable("s", "x", "integer", 0)
                for scenario, kind in (
                    ("bare SetVariable stub, bridge node", "raw-set"),
                    ("worker's set_variable, bridge node", "set"),
                ):
                    counts.append(_measure(scenario, kind, address, "s", calls, server, redis_proc, grind))
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--calls", type=int, default=1000, help="measured calls per scenario (default 1000)")
    parser.add_argument("--out", type=Path, default=RESULTS / "instructions.json", help="where to write the counts")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error(f"--calls must be at least 1, got {args.calls}")
    missing = [tool for tool in ("valgrind", "callgrind_control", "redis-server") if shutil.which(tool) is None]
    if missing:
        print(f"missing: {', '.join(missing)} (run: apt-get install -y valgrind redis-server)", file=sys.stderr)
        return 1
    print(f"instructions per call, {args.calls} calls per scenario, every process under callgrind:", flush=True)
    counts = measure(args.calls)
    ping = counts[0].total
    print()
    print("| scenario | client | server | redis-server | all | vs Ping |")
    print("|---|---|---|---|---|---|")
    for count in counts:
        print(
            f"| {count.scenario} | {count.client:,.0f} | {count.server:,.0f} | {count.redis:,.0f}"
            f" | {count.total:,.0f} | {count.total / ping:.2f} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {"calls": args.calls, "python": sys.version.split()[0], "rows": [asdict(c) for c in counts]}, indent=2
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
