"""Worker-side access to a session: SessionContext (blocking) and AsyncSessionContext (grpc.aio).

A Python worker (DSPy code, a notebook) reads and writes the orchestrator's variables through the
bridge with one of these clients. Reads are served from a local cache kept current by a background
``WatchVariables`` stream — no fixed TTL — and the worker always reads its own writes. Every call
has a deadline and raises the :mod:`dspex_dspy.errors` exception the server reported.

The package: :mod:`.cache` (the cache, no I/O), :mod:`.feed` (the cache feed and the watches as
machines: messages in, calls and events out), :mod:`.policy` (reconnect and silence rules),
:mod:`.core` (the operations and the process lifecycle), and two thin drivers, :mod:`.sync`
(threads) and :mod:`.aio` (asyncio).

How the cache stays correct:

- **Synced.** The feed opens ``WatchVariables`` (all variables, initial values included). The
  server registers the watcher before it sends anything, so the first message of any kind proves
  that no later write can be missed. The feed then lists the variables (``ListVariables``) and
  that listing *replaces* the cache: from then on the cache is "synced" and serves reads. Messages
  already queued from before the listing are older and are ignored. (Waiting for "the end of the
  initial snapshot" instead would be wrong: the server coalesces pending updates per variable, so
  snapshot and change messages interleave.) An empty session sends nothing until its first
  variable or heartbeat, and until then reads simply go to the server.
- **Never backwards.** Per variable id, an update replaces the cached record only if its version
  is higher; updates for a deleted id, or for another id than the cached one under that name (a
  stale incarnation), are dropped.
- **Read-your-writes.** A write's answer updates the cache at once. If the cache is not synced at
  that moment, the write leaves a *floor* (name, version): reads of that name bypass the cache
  until it holds that version; a resync drops the floors of writes that finished before its
  listing was taken (the listing includes them).
- **Always a state the server was in.** The server keeps one pending update per variable and
  replaces it in place when the variable is written again, so an update can overtake earlier
  writes of other variables (pending ``[done=False, temperature]`` becomes ``[done=True,
  temperature]``). The feed applies an update at once only when it is provably in write order
  (the variable's next version after the last one this stream delivered, a creation, an initial
  value, or a deletion at the last version seen); any other update that would change the cache
  is applied together with a fresh listing (``ListVariables``, taken after the update arrived),
  which holds that update and every write before it. Only the worker's own newer writes are kept
  over the listing.
- **Down = bypassed.** As soon as the stream breaks the cache stops serving; reads go to the server
  until a reconnect (backoff 0.05 s doubling to 2 s) has resynced. ``cache=False`` turns the cache
  off. The first failure of an outage is logged once at WARNING; ``ctx.cache_state`` tells
  ``synced`` / ``syncing`` / ``down`` / ``disabled``.
- **Silent = dead.** A bridge sends a ``heartbeat`` on every watch stream after 10 s without other
  messages. A cache stream silent for ``silence_timeout`` seconds (30 s by default) is taken as a
  dead (half-open) connection: from that moment the cache stops serving reads (they go to the
  server, or raise :class:`~dspex_dspy.errors.BridgeUnavailableError` within ``call_timeout``),
  the stream is cancelled and the client reconnects, on a new channel when it opened its own.
  gRPC keepalive pings (every 10 s, answered within 5 s) close such a connection too.

``watch_variables`` yields :class:`WatchEvent` records. With the cache on, it is served from the
cache's own stream: each update is handed to the watches only after the cache applied it (or
already held a later state), so a watch is never ahead of the cache — **read-after-watch**: after
``watch_variables`` yields an event, cached reads return that version or newer for that variable
and reflect every write the server applied before it. A watch then opens no stream of its own.
With ``cache=False`` each watch opens its own ``WatchVariables`` stream over every variable of the
session and keeps the ones it names, so a name deleted and created again is followed.

Either way a watch survives broken streams and server restarts: after each (re)connect the
variables are listed, so the last event per variable is its latest state (and a variable that
vanished while the stream was down is reported ``deleted``). Repeats are filtered per variable
**name**: an update is yielded only if its version is higher than the last one yielded for that
name, or if it belongs to a new incarnation of the name — after a ``deleted``, or with another
``created_at`` (ids are not stable across a server restart, a creation time is; a state
re-imported with its versions and creation times is the same incarnation, so nothing is
repeated). A slow reader gets coalesced updates (always ending on the latest), never an unbounded
backlog. Heartbeats are never yielded.

Copies and pickles: ``copy.deepcopy`` (as DSPy optimizers deep-copy modules) returns the same
client, so copies share the live session; pickling stores the address, session id and options and
reconnects on unpickling.

Processes: live clients are closed by an ``atexit`` hook (so a worker never hangs at exit), and a
client inherited by a forked child reconnects lazily there, leaving the parent's channel alone
(see ``docs/multiprocessing.md``).

Event loops: grpc.aio objects belong to the event loop that created them. An
:class:`AsyncSessionContext` creates its channel and its cache task lazily, inside the running loop
of its first call, and refuses use from another loop while that one is alive.
"""

from __future__ import annotations

from dspex_dspy.client.aio import AsyncSessionContext, AsyncVariableWatch
from dspex_dspy.client.cache import CacheState
from dspex_dspy.client.core import ADDRESS_ENV
from dspex_dspy.client.events import WatchEvent
from dspex_dspy.client.policy import DEFAULT_RECONNECT_TIMEOUT, DEFAULT_SILENCE_TIMEOUT
from dspex_dspy.client.sync import SessionContext, VariableWatch

__all__ = [
    "ADDRESS_ENV",
    "DEFAULT_RECONNECT_TIMEOUT",
    "DEFAULT_SILENCE_TIMEOUT",
    "AsyncSessionContext",
    "AsyncVariableWatch",
    "CacheState",
    "SessionContext",
    "VariableWatch",
    "WatchEvent",
]
