"""A process that writes atomic batches and reads them back through a worker's cache at once.

Run as ``python tests/integration/workers/batch_reads.py WRITES``. An orchestrator context on the
embedded bridge runs ``update_many({"a": i, "b": i})`` on a thread while a worker client in the
same process takes snapshots of both variables; it prints ``{"snapshots", "torn", "final"}`` as
one JSON line. Threads switch very often, so reads land between the updates of a batch.
"""

from __future__ import annotations

import json
import sys
import threading

from dspex_dspy import Context, SessionContext, Variables


def main(writes: int) -> int:
    with Context(backend="bridged") as ctx:
        Variables.defvariable(ctx, "a", "integer", 0)
        Variables.defvariable(ctx, "b", "integer", 0)
        with SessionContext.connect(ctx.bridge_address, ctx.id) as worker:
            if not worker.wait_synced(timeout=30):
                raise SystemExit("the worker's cache did not sync")
            done = threading.Event()

            def write() -> None:
                for i in range(1, writes + 1):
                    Variables.update_many(ctx, {"a": i, "b": i})
                done.set()

            sys.setswitchinterval(1e-6)
            writer = threading.Thread(target=write)
            writer.start()
            snapshots = torn = 0
            while not done.is_set():
                got = worker.get_versioned_many(["a", "b"])
                snapshots += 1
                torn += got["a"][0] != got["b"][0]
            writer.join()
            worker.wait_cached("b", writes + 1, timeout=30)
            final = worker.get_versioned_many(["a", "b"])
    print(json.dumps({"snapshots": snapshots, "torn": torn, "final": final}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1])))
