"""A worker process for the integration tests: connects to a session and does one job.

Run as ``python tests/integration/workers/worker.py JOB --address HOST:PORT --session ID [options]``.
Every result is printed as one JSON line on stdout; ``ready`` lines tell the test when the worker is
in position. Jobs:

- ``read NAME...``: print ``{name: value}``.
- ``write NAME=JSON...``: write each value, print ``{name: new version}``.
- ``watch NAME --until VALUE``: print ``ready`` after the first event, then the observed
  ``[[version, value], ...]`` once ``NAME`` has ``VALUE``.
- ``cas NAME --times N``: N compare-and-swap increments with retries; print
  ``{"done": N, "conflicts": C}``. With ``--forever`` it never stops and prints ``inc VERSION``
  after each increment (``ready`` after the first).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from dspex_dspy.client import SessionContext
from dspex_dspy.errors import VersionConflictError


def say(line: Any) -> None:
    print(line if isinstance(line, str) else json.dumps(line), flush=True)


def increment(ctx: SessionContext, name: str) -> tuple[int, int]:
    """Add 1 to ``name`` with compare-and-swap; return ``(new version, conflicts on the way)``."""
    conflicts = 0
    while True:
        value, version = ctx.get_versioned(name)
        try:
            return ctx.set_variable(name, value + 1, expected_version=version), conflicts
        except VersionConflictError as conflict:
            conflicts += 1
            # Our view was stale: wait (briefly) for the cache to catch up with the winner's write.
            ctx.wait_cached(name, conflict.actual, timeout=1.0)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("job", choices=["read", "write", "watch", "cas"])
    parser.add_argument("args", nargs="*")
    parser.add_argument("--address", required=True)
    parser.add_argument("--session", required=True)
    parser.add_argument("--until", type=json.loads)
    parser.add_argument("--times", type=int, default=1)
    parser.add_argument("--forever", action="store_true")
    opts = parser.parse_args(argv)

    with SessionContext.connect(opts.address, opts.session) as ctx:
        if opts.job == "read":
            say({name: ctx[name] for name in opts.args})
        elif opts.job == "write":
            versions = {}
            for item in opts.args:
                name, _, text = item.partition("=")
                versions[name] = ctx.set_variable(name, json.loads(text))
            say(versions)
        elif opts.job == "watch":
            (name,) = opts.args
            observed: list[list[Any]] = []
            with ctx.watch_variables([name]) as watch:
                for event in watch:
                    observed.append([event.version, event.value])
                    if len(observed) == 1:
                        say("ready")
                    if event.value == opts.until:
                        break
            say(observed)
        else:
            (name,) = opts.args
            done = conflicts = 0
            while opts.forever or done < opts.times:
                version, lost = increment(ctx, name)
                done += 1
                conflicts += lost
                if opts.forever:
                    say(f"inc {version}")
                    if done == 1:
                        say("ready")
            say({"done": done, "conflicts": conflicts})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
