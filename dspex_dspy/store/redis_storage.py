"""RedisStorage: sessions in Redis, so several bridge nodes serve them and a restart loses nothing.

Each session is a handful of keys sharing the hash tag ``{session}`` (a Redis Cluster keeps them in
one slot): ``s`` (the session: metadata, creation time, TTL, change position, id counter), per
variable fields in ``d`` (definition), ``x`` (value, time, writer), ``r`` (version), ``m``
(metadata), ``n`` (name -> id), ``h`` (history, field ``<id>:<version>``), ``l``, a stream that is
the session's change log (entry id ``<position>-0``, bounded with ``XADD MAXLEN ~``), ``a`` and ``o``
(optimization leases) and ``c``, a list of the session's recent module calls (newest first).

Every operation is one Lua script run with ``EVALSHA`` (redis-py's ``register_script``): a write,
an atomic batch or a rollback checks every version, writes the variable, trims its history and
appends to the stream in one atomic step. The session's TTL is key expiry: every operation that
uses a session refreshes the expiry of all its keys. Values are stored as the same JSON the wire
contract uses (NaN and infinities as strings).

Watchers on any node follow the stream with ``XREAD BLOCK`` from their last position (see
:meth:`RedisStorage.read_changes`); a reader behind the trimmed part is told to resync, and so is
a reader that meets a bulk import (logged as one entry rather than one per variable).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import json.encoder
import math
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any, Final

import redis

from dspex_dspy.errors import (
    BridgeUnavailableError,
    LimitExceededError,
    SessionExistsError,
    SessionNotFoundError,
    VariableExistsError,
    VariableLockedError,
    VariableNotFoundError,
    VersionConflictError,
)
from dspex_dspy.leases import LEASE_ID_PREFIX, OptimizationLease
from dspex_dspy.records import HistoryEntry, SessionInfo, UpdateType, VariableUpdate
from dspex_dspy.store.storage import (
    DEFAULT_CHANGELOG_LIMIT,
    LOOP_MAX_VALUE_BYTES,
    ChangeBatch,
    NewVariable,
    StorageListener,
    Write,
    owned_constraints,
)
from dspex_dspy.types import TYPE_URL_PREFIX, OptimizationStatus, Variable, decode_value, encode_value

__all__ = ["RedisStorage"]

PREFIX: Final = "dspex"
_SESSIONS_INDEX: Final = f"{PREFIX}:sessions"
_ID_COUNTER: Final = f"{PREFIX}:ids"
_ALL_HISTORY: Final = 1 << 30  # "every entry there is": the history of a version is at most that version long
# New keys go at the end: the scripts address keys by index.
_KEY_SUFFIXES: Final = ("s", "d", "x", "r", "m", "n", "h", "l", "a", "o", "c")

# Shared by every script: refresh the expiry of all of a session's keys (every KEYS entry).
_TOUCH = """
local function touch()
  local ttl = math.floor(tonumber(redis.call('HGET', KEYS[1], 'ttl')) * 1000)
  for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ttl) end
end
-- For scripts that create no key: a session touched within the last 1% of its TTL (a second at
-- most) keeps its expiry, so a burst of reads and writes does not refresh every key every time.
-- Every key was given the same expiry by the last full touch (and the change log, which a write
-- may append to, must still carry one), so the session still expires as a whole, that much early
-- at worst.
local function touch_soon(ttl_s)
  local ttl = math.floor(tonumber(ttl_s or redis.call('HGET', KEYS[1], 'ttl')) * 1000)
  local left = redis.call('PTTL', KEYS[1])
  if left >= 0 and ttl - left < math.min(1000, ttl / 100) and redis.call('PTTL', KEYS[8]) >= 0 then return end
  for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ttl) end
end
"""

_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
for i = 2, #KEYS do redis.call('DEL', KEYS[i]) end
redis.call('HSET', KEYS[1], 'meta', ARGV[1], 'created_at', ARGV[2], 'ttl', ARGV[3], 'pos', 0, 'ids', 0)
redis.call('PEXPIRE', KEYS[1], math.floor(tonumber(ARGV[3]) * 1000))
return 1
"""

_SESSION = (
    _TOUCH
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
if ARGV[1] == '1' then touch() end
local s = redis.call('HMGET', KEYS[1], 'meta', 'created_at', 'ttl')
return {s[1], s[2], s[3], redis.call('HLEN', KEYS[4]), redis.call('PTTL', KEYS[1])}
"""
)

_DELETE_SESSION = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local count = redis.call('HLEN', KEYS[4])
for i = 1, #KEYS do redis.call('DEL', KEYS[i]) end
return count
"""

# Optimization leases: ``a`` maps a variable id to ``[lease id]``; ``o`` maps a lease id to
# ``[optimizer, deadline (Redis time, ms), started_at]`` and ``opt:<optimizer>`` to its lease id.
# Deadlines are Redis's own clock, so every node agrees on when a lease ends.
_LEASE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function held(id, now)
  local raw = redis.call('HGET', KEYS[9], id)
  if not raw then return nil end
  local lid = cjson.decode(raw)[1]
  local lraw = redis.call('HGET', KEYS[10], lid)
  if not lraw then return nil end
  local l = cjson.decode(lraw)
  if tonumber(l[2]) <= now then return nil end
  return {lid, l[1], l[3]}
end
local function status(id, now)
  local l = held(id, now)
  if not l then return '' end
  return cjson.encode({l[2], l[3]})
end
"""

# Resolve an identifier: an id first, then a name.
_RESOLVE = """
local function resolve(ident)
  if redis.call('HEXISTS', KEYS[4], ident) == 1 then return ident end
  return redis.call('HGET', KEYS[6], ident)
end
local function record(id)
  return {id, redis.call('HGET', KEYS[2], id), redis.call('HGET', KEYS[3], id),
          redis.call('HGET', KEYS[4], id), redis.call('HGET', KEYS[5], id)}
end
"""

_READ = (
    _TOUCH
    + _RESOLVE
    + _LEASE
    + """
-- The session's TTL field doubles as its existence check (every session hash has one).
local ttl_s = redis.call('HGET', KEYS[1], 'ttl')
if not ttl_s then return false end
touch_soon(ttl_s)
local leased = redis.call('EXISTS', KEYS[9]) == 1
local now = leased and now_ms() or 0
local out = {}
for i = 1, #ARGV do
  local id = resolve(ARGV[i])
  if id then
    out[i] = record(id)
    out[i][6] = leased and status(id, now) or ''
  else
    out[i] = 0
  end
end
return out
"""
)

_LIST = (
    _TOUCH
    + _LEASE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
touch()
local statuses = {}
local assigned = redis.call('HKEYS', KEYS[9])
if #assigned > 0 then
  local now = now_ms()
  for _, id in ipairs(assigned) do
    local s = status(id, now)
    if s ~= '' then statuses[#statuses + 1] = id; statuses[#statuses + 1] = s end
  end
end
return {redis.call('HGETALL', KEYS[2]), redis.call('HGETALL', KEYS[3]),
        redis.call('HGETALL', KEYS[4]), redis.call('HGETALL', KEYS[5]), statuses}
"""
)

# Append one change to the stream (the change log) at the next position.
_APPEND = """
local function append(kind, id, version, def, state, meta, wmeta, extra)
  local pos = redis.call('HINCRBY', KEYS[1], 'pos', 1)
  redis.call('XADD', KEYS[8], 'MAXLEN', '~', ARGV[1], pos .. '-0', 'k', kind, 'id', id, 'v', version,
             'd', def, 'x', state, 'm', meta, 'w', wmeta, 'e', extra)
  return pos
end
"""

# ARGV: maxlen, max_variables, then per variable: name, id, def, state, version, meta, history entry.
_INSERT = (
    _TOUCH
    + _APPEND
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'nosession'} end
local n = (#ARGV - 2) / 7
for i = 0, n - 1 do
  local name = ARGV[3 + i * 7]
  if redis.call('HEXISTS', KEYS[6], name) == 1 then return {'exists', name} end
end
local total = redis.call('HLEN', KEYS[4]) + n
if total > tonumber(ARGV[2]) then return {'limit', total} end
-- Field-value pairs per hash, each hash written by a few HSETs of many fields (not one per field).
local pairs_of = {{}, {}, {}, {}, {}, {}}
local function add(t, field, value) t[#t + 1] = field; t[#t + 1] = value end
for i = 0, n - 1 do
  local b = 3 + i * 7
  local id = ARGV[b + 1]
  add(pairs_of[1], ARGV[b], id)
  add(pairs_of[2], id, ARGV[b + 2])
  add(pairs_of[3], id, ARGV[b + 3])
  add(pairs_of[4], id, ARGV[b + 4])
  add(pairs_of[5], id, ARGV[b + 5])
  add(pairs_of[6], id .. ':' .. ARGV[b + 4], ARGV[b + 6])
  if n == 1 then append('c', id, ARGV[b + 4], ARGV[b + 2], ARGV[b + 3], ARGV[b + 5], ARGV[b + 5], '') end
end
for k, key in ipairs({KEYS[6], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[7]}) do
  local t = pairs_of[k]
  for first = 1, #t, 1000 do  -- an even step: a chunk never splits a pair (unpack's stack is bounded)
    redis.call('HSET', key, unpack(t, first, math.min(first + 999, #t)))
  end
end
-- A bulk import is one change: readers of the log re-read the variables (a resync).
if n > 1 then append('i', '', 0, '', '', '', '', n) end
touch()
return {'ok'}
"""
)

# ARGV: maxlen, history limit, then per write: id, expected version (0 = none), state, write
# metadata, history entry, lease check ('' none, 'admit', 'force' or 'refuse'), the writer's
# optimizer id. Every version and lease is checked before anything is written. The change log's
# copy of the definition is read here, where it is kept, rather than sent with every write.
_WRITE = (
    _TOUCH
    + _APPEND
    + _LEASE
    + """
local ttl_s = redis.call('HGET', KEYS[1], 'ttl')
if not ttl_s then return {'nosession'} end
local n = (#ARGV - 2) / 7
local limit = tonumber(ARGV[2])
local current = {}
local forced = {}
local now = nil
local leased = redis.call('EXISTS', KEYS[9]) == 1
local locked = {'locked'}
for i = 0, n - 1 do
  local b = 3 + i * 7
  local id = ARGV[b]
  local v = current[id] or tonumber(redis.call('HGET', KEYS[4], id) or '-1')
  if v < 0 then return {'novar', id} end
  local expected = tonumber(ARGV[b + 1])
  if expected ~= 0 and expected ~= v then return {'conflict', id, v} end
  current[id] = v + 1
  local mode = ARGV[b + 5]
  if mode ~= '' then
    now = now or now_ms()
    local l = held(id, now)
    if l and (mode == 'refuse' or l[2] ~= ARGV[b + 6]) then
      if mode == 'force' then
        forced[i] = l[2]
      else
        locked[#locked + 1] = id; locked[#locked + 1] = l[2]; locked[#locked + 1] = mode
      end
    end
  end
end
if #locked > 1 then return locked end
local out = {'ok'}
for i = 0, n - 1 do
  local b = 3 + i * 7
  local id = ARGV[b]
  local wmeta = ARGV[b + 3]
  local entry = ARGV[b + 4]
  if forced[i] then
    -- Written through another optimizer's lease: the write's metadata says over whose.
    local m = cjson.decode(wmeta)
    m['forced_over'] = forced[i]
    wmeta = cjson.encode(m)
    entry = string.sub(ARGV[b + 2], 1, -2) .. ',' .. wmeta .. ']'
  end
  local version = redis.call('HINCRBY', KEYS[4], id, 1)
  -- The state keeps this write's metadata: it shows on this version only, never on later ones.
  redis.call('HSET', KEYS[3], id, entry)
  local meta = redis.call('HGET', KEYS[5], id) or '{}'
  if wmeta ~= '{}' then
    local merged = cjson.decode(meta)
    for k, v in pairs(cjson.decode(wmeta)) do merged[k] = v end
    meta = cjson.encode(merged)
  end
  redis.call('HSET', KEYS[7], id .. ':' .. version, entry)
  if version - limit >= 1 then redis.call('HDEL', KEYS[7], id .. ':' .. (version - limit)) end
  -- The lease holding the variable travels with the change, so watchers on every node see it.
  local st = ''
  if leased then
    now = now or now_ms()
    st = status(id, now)
  end
  append('c', id, version, redis.call('HGET', KEYS[2], id), ARGV[b + 2], meta, wmeta, st)
  out[#out + 1] = version
  out[#out + 1] = meta
  out[#out + 1] = wmeta
  out[#out + 1] = st
end
touch_soon(ttl_s)
return out
"""
)

# ARGV: maxlen, history limit, id, deletion (JSON [source, timestamp]).
_DELETE = (
    _TOUCH
    + _APPEND
    + _RESOLVE
    + _LEASE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'nosession'} end
local id = ARGV[3]
if redis.call('HEXISTS', KEYS[4], id) == 0 then return {'novar', id} end
local r = record(id)
local version = tonumber(r[4])
local name = cjson.decode(r[2])[1]
local l = held(id, now_ms())
if l then return {'locked', name, l[2]} end
redis.call('HDEL', KEYS[9], id)
for k, key in ipairs({KEYS[2], KEYS[3], KEYS[4], KEYS[5]}) do redis.call('HDEL', key, id) end
redis.call('HDEL', KEYS[6], name)
for v = math.max(1, version - tonumber(ARGV[2]) + 1), version do redis.call('HDEL', KEYS[7], id .. ':' .. v) end
append('d', id, version, r[2], r[3], r[5], '{}', ARGV[4])
touch()
return {'ok', r[1], r[2], r[3], r[4], r[5]}
"""
)

# ARGV: id, history limit.
_HISTORY = (
    _TOUCH
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'nosession'} end
local version = tonumber(redis.call('HGET', KEYS[4], ARGV[1]) or '-1')
if version < 0 then return {'novar'} end
touch()
local out = {'ok'}
for v = math.max(1, version - tonumber(ARGV[2]) + 1), version do
  local entry = redis.call('HGET', KEYS[7], ARGV[1] .. ':' .. v)
  if entry then out[#out + 1] = v; out[#out + 1] = entry end
end
return out
"""
)


# ARGV: optimizer, ttl (ms), a new lease id, started_at, then the variable ids. A live lease of the
# same optimizer is renewed (same id and start, new deadline) and widened to these variables.
_LEASE_START = (
    _TOUCH
    + _LEASE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'nosession'} end
local now = now_ms()
local opt = ARGV[1]
for i = 5, #ARGV do
  if redis.call('HEXISTS', KEYS[4], ARGV[i]) == 0 then return {'novar', ARGV[i]} end
  local l = held(ARGV[i], now)
  if l and l[2] ~= opt then return {'locked', ARGV[i], l[2]} end
end
local lid = redis.call('HGET', KEYS[10], 'opt:' .. opt)
local started = ARGV[4]
local live = false
if lid then
  local lraw = redis.call('HGET', KEYS[10], lid)
  if lraw then
    local l = cjson.decode(lraw)
    if tonumber(l[2]) > now then live = true; started = l[3] end
  end
end
if not live then
  if lid then
    -- The optimizer's lease that lapsed: forget it and the variables it still names.
    redis.call('HDEL', KEYS[10], lid)
    local all = redis.call('HGETALL', KEYS[9])
    for i = 1, #all, 2 do
      if cjson.decode(all[i + 1])[1] == lid then redis.call('HDEL', KEYS[9], all[i]) end
    end
  end
  lid = ARGV[3]
end
-- started_at stays the caller's text: cjson would keep only 14 significant digits of a number.
redis.call('HSET', KEYS[10], lid, cjson.encode({opt, now + tonumber(ARGV[2]), started}), 'opt:' .. opt, lid)
for i = 5, #ARGV do redis.call('HSET', KEYS[9], ARGV[i], cjson.encode({lid})) end
touch()
return {'ok', lid, started}
"""
)

# ARGV: 'id' and a lease id, or 'var', a variable id and '1' to force. Stopping what already ended
# does nothing; naming a held variable without force is refused.
_LEASE_STOP = (
    _TOUCH
    + _LEASE
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {'nosession'} end
local lid
if ARGV[1] == 'id' then
  lid = ARGV[2]
  if redis.call('HEXISTS', KEYS[10], lid) == 0 then return {'ok'} end
else
  local l = held(ARGV[2], now_ms())
  if not l then return {'ok'} end
  if ARGV[3] ~= '1' then return {'locked', l[2]} end
  lid = l[1]
end
local lraw = redis.call('HGET', KEYS[10], lid)
if lraw then
  local opt = cjson.decode(lraw)[1]
  if redis.call('HGET', KEYS[10], 'opt:' .. opt) == lid then redis.call('HDEL', KEYS[10], 'opt:' .. opt) end
  redis.call('HDEL', KEYS[10], lid)
end
local all = redis.call('HGETALL', KEYS[9])
for i = 1, #all, 2 do
  if cjson.decode(all[i + 1])[1] == lid then redis.call('HDEL', KEYS[9], all[i]) end
end
touch()
return {'ok'}
"""
)

# Recent module calls: ARGV[1] how many to keep, then the records, oldest first.
_REPORT_CALLS = (
    _TOUCH
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
for i = 2, #ARGV do redis.call('LPUSH', KEYS[11], ARGV[i]) end
redis.call('LTRIM', KEYS[11], 0, tonumber(ARGV[1]) - 1)
touch()
return #ARGV - 1
"""
)

_RECENT_CALLS = (
    _TOUCH
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
touch()
return redis.call('LRANGE', KEYS[11], 0, tonumber(ARGV[1]) - 1)
"""
)


@functools.lru_cache(maxsize=4096)
def _keys(session_id: str) -> tuple[str, ...]:
    """A session's keys, in the order the scripts name them (``KEYS[1]`` .. ``KEYS[11]``)."""
    return tuple(f"{PREFIX}:{{{session_id}}}:{suffix}" for suffix in _KEY_SUFFIXES)


_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def _dumps(value: Any) -> str:
    return _ENCODER.encode(value)


# The records below are JSON arrays of a fixed shape, written once per write and per imported
# variable: spelled out from their parts, as the encoder above spells them (strings quoted by its
# own C routine, numbers as ``repr``), at a fraction of a general ``encode`` call's cost.
_quote: Final = json.encoder.encode_basestring_ascii


def _number(value: float) -> str:
    """A finite number as JSON (what the encoder writes; it refuses NaN and infinities too)."""
    if isinstance(value, float) and math.isfinite(value):
        return float.__repr__(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return int.__repr__(value)
    raise ValueError(f"not a finite number for JSON: {value!r}")


def _map(mapping: Mapping[str, Any]) -> str:
    """A mapping as a JSON object (``{}`` for none)."""
    if not mapping:
        return "{}"
    return _ENCODER.encode(mapping if type(mapping) is dict else dict(mapping))


def _text_map(mapping: Mapping[str, str]) -> str:
    """A ``str -> str`` map (metadata) as a JSON object, spelled as the encoder spells it."""
    if not mapping:
        return "{}"
    return "{" + ",".join([f"{_quote(key)}:{_quote(value)}" for key, value in mapping.items()]) + "}"


def _loads_map(text: str) -> dict[str, Any]:
    """A JSON object read back (most metadata is empty: ``{}`` or nothing is not parsed)."""
    return {} if not text or text == "{}" else json.loads(text)


def _value_json(type_: str, value: Any) -> str:
    return encode_value(type_, value)[1].decode()


def _definition(var: NewVariable | Variable, created_at: float) -> str:
    """``[name, type, constraints, description, created_at]``."""
    return (
        f"[{_quote(var.name)},{_quote(var.type)},{_map(var.constraints)},"
        f"{_quote(var.description)},{_number(created_at)}]"
    )


def _state(type_: str, value: Any, updated_at: float, source: str) -> str:
    """``[value JSON, updated_at, source]``."""
    return f"[{_quote(_value_json(type_, value))},{_number(updated_at)},{_quote(source)}]"


def _history_entry(state: str, metadata: str) -> str:
    """``[value JSON, timestamp, source, metadata]``: a write's state plus the metadata it came with."""
    return f"{state[:-1]},{metadata}]"


def _status(lease: str) -> OptimizationStatus | None:
    """A lease status from a script (``[optimizer, started_at]`` as JSON; empty: no lease)."""
    if not lease:
        return None
    optimizer_id, started_at = json.loads(lease)
    return OptimizationStatus(optimizer_id, float(started_at))


@functools.lru_cache(maxsize=4096)
def _parsed_definition(definition: str) -> tuple[str, str, dict[str, Any], str, float]:
    """``(name, type, constraints, description, created_at)`` of a definition record (a definition
    never changes, and the same few are read over and over)."""
    name, type_, constraints, description, created_at = json.loads(definition)
    return name, type_, constraints, description, created_at


def _variable(var_id: str, definition: str, state: str, version: Any, meta: str, lease: str = "") -> Variable:
    name, type_, shared, description, created_at = _parsed_definition(definition)
    constraints = owned_constraints(shared) if shared else {}  # the cached parse is never handed out
    # A written state is a history entry: ``[value JSON, updated_at, source, write metadata]``.
    value_json, updated_at, source, *written = json.loads(state)
    metadata = _loads_map(meta)
    if written and written[0]:
        metadata = {**metadata, **written[0]}
    return Variable(
        id=var_id,
        name=name,
        type=type_,
        value=decode_value(TYPE_URL_PREFIX + type_, value_json.encode(), name=name),
        constraints=constraints,
        description=description,
        metadata=metadata,
        version=int(version),
        created_at=created_at,
        updated_at=updated_at,
        source=source,
        optimization_status=_status(lease),
    )


def _creation_order(var: Variable) -> tuple[float, int]:
    tail = var.id.rsplit("_", 1)[-1]
    return var.created_at, int(tail) if tail.isdigit() else 0


_CLOSE_WAIT_S: Final = 2.0
try:
    from dspex_dspy.store._redis_loop import LoopRedis
except ImportError:  # pragma: no cover - hiredis comes with the redis extra; without it, no loop path
    LoopRedis = None  # type: ignore[misc,assignment]


class RedisStorage:
    """Sessions and variables in Redis (redis-py, with hiredis when installed).

    Args:
        url: ``redis://HOST:PORT/DB`` (or ``rediss://`` / ``unix://``).
        changelog_limit: changes each session's stream keeps (approximately, at least this many).
        client: an existing ``redis.Redis`` (with ``decode_responses=True``) instead of ``url``.

    Raises:
        BridgeUnavailableError: Redis cannot be reached.

    Example:
        >>> storage = RedisStorage("redis://127.0.0.1:6379/0")  # doctest: +SKIP
        >>> store = SessionStore(storage=storage)  # doctest: +SKIP
    """

    shared = True

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        changelog_limit: int = DEFAULT_CHANGELOG_LIMIT,
        client: redis.Redis | None = None,
    ) -> None:
        if changelog_limit < 1:
            raise ValueError(f"changelog_limit must be at least 1, got {changelog_limit}")
        self.url = url
        self._async_url = url if client is None else None
        self._async_lock = threading.Lock()
        self._loop_clients: dict[asyncio.AbstractEventLoop, LoopRedis] = {}
        self._redis: redis.Redis = (
            client
            if client is not None
            else redis.Redis.from_url(url, decode_responses=True, health_check_interval=30, socket_keepalive=True)
        )
        self._changelog_limit = changelog_limit
        self._listeners: list[StorageListener] = []
        self._closed = False
        register = self._redis.register_script
        self._create = register(_CREATE)
        self._session = register(_SESSION)
        self._delete_session = register(_DELETE_SESSION)
        self._read = register(_READ)
        self._list = register(_LIST)
        self._insert = register(_INSERT)
        self._write = register(_WRITE)
        self._delete = register(_DELETE)
        self._history = register(_HISTORY)
        self._lease_start = register(_LEASE_START)
        self._lease_stop = register(_LEASE_STOP)
        self._report_calls = register(_REPORT_CALLS)
        self._recent_calls = register(_RECENT_CALLS)
        self._call(self._redis.ping)

    def __repr__(self) -> str:
        return f"RedisStorage({self.url!r})"

    def _call(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            failure = self._failure(exc)
            if failure is exc:
                raise
            raise failure from exc

    def _failure(self, exc: Exception) -> Exception:
        """What a failed Redis call raises: Redis unreachable, or the storage closed under the call,
        is :class:`BridgeUnavailableError`; anything else is itself."""
        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
            return BridgeUnavailableError(f"the session storage at {self.url} cannot be reached: {exc}")
        if self._closed:  # a call still running when the pool was closed under it
            return BridgeUnavailableError(f"the session storage at {self.url} is closed")
        return exc

    def add_listener(self, listener: StorageListener) -> None:
        self._listeners.append(listener)

    def _changed(self, session_id: str, updates: list[VariableUpdate]) -> None:
        for listener in self._listeners:
            listener.changed(session_id, updates)

    # ------------------------------------------------------------------ sessions

    def create_session(
        self, session_id: str, metadata: Mapping[str, str], ttl: float, created_at: float, max_sessions: int
    ) -> SessionInfo:
        count = self._call(self._redis.scard, _SESSIONS_INDEX)
        if count >= max_sessions:
            self.sweep()
            count = self._call(self._redis.scard, _SESSIONS_INDEX)
            if count >= max_sessions:
                raise LimitExceededError("sessions", count + 1, max_sessions)
        made = self._call(
            self._create, keys=_keys(session_id), args=[_dumps(dict(metadata)), repr(created_at), repr(ttl)]
        )
        if not made:
            raise SessionExistsError(session_id)
        self._call(self._redis.sadd, _SESSIONS_INDEX, session_id)
        return SessionInfo(session_id, dict(metadata), created_at, ttl, 0, ttl)

    def get_session(self, session_id: str, *, touch: bool = True) -> SessionInfo | None:
        got = self._call(self._session, keys=_keys(session_id), args=["1" if touch else "0"])
        if not got:
            return None
        meta, created_at, ttl, count, pttl = got
        return SessionInfo(session_id, json.loads(meta), float(created_at), float(ttl), int(count), int(pttl) / 1000)

    def touch_session(self, session_id: str) -> bool:
        return self.get_session(session_id) is not None

    def delete_session(self, session_id: str) -> int | None:
        count = int(self._call(self._delete_session, keys=_keys(session_id)))
        self._call(self._redis.srem, _SESSIONS_INDEX, session_id)
        if count < 0:
            return None
        for listener in self._listeners:
            listener.ended(session_id)
        return count

    def session_ids(self) -> list[str]:
        ids = sorted(self._call(self._redis.smembers, _SESSIONS_INDEX))
        pipe = self._redis.pipeline(transaction=False)
        for session_id in ids:
            pipe.exists(_keys(session_id)[0])
        alive = self._call(pipe.execute)
        return [sid for sid, live in zip(ids, alive, strict=True) if live]

    def sweep(self) -> list[str]:
        """Forget expired sessions in the index (Redis itself expired their keys); return their ids."""
        ids = sorted(self._call(self._redis.smembers, _SESSIONS_INDEX))
        alive = set(self.session_ids())
        gone = [sid for sid in ids if sid not in alive]
        if gone:
            self._call(self._redis.srem, _SESSIONS_INDEX, *gone)
        return gone

    # ------------------------------------------------------------------ variables

    def read_variables(self, session_id: str, identifiers: Sequence[str]) -> dict[str, Variable]:
        got = self._call(self._read, keys=_keys(session_id), args=list(identifiers))
        if got is None:
            raise SessionNotFoundError(session_id)
        return {ident: _variable(*rec) for ident, rec in zip(identifiers, got, strict=True) if rec}

    def list_variables(self, session_id: str) -> list[Variable]:
        got = self._call(self._list, keys=_keys(session_id))
        if got is None:
            raise SessionNotFoundError(session_id)
        defs, states, versions, metas, leases = (dict(zip(h[::2], h[1::2], strict=True)) for h in got)
        out = [_variable(i, defs[i], states[i], versions[i], metas.get(i, "{}"), leases.get(i, "")) for i in versions]
        out.sort(key=_creation_order)
        return out

    def insert_variables(
        self, session_id: str, variables: Sequence[NewVariable], *, now: float, max_variables: int, history_limit: int
    ) -> list[Variable]:
        args: list[Any] = [self._changelog_limit, max_variables]
        stamped: list[tuple[NewVariable, float, float]] = []
        # Ids come from one counter for all sessions: unique and increasing, never reused by a
        # session made anew under an old id (a gap after a refused insert is harmless).
        last = int(self._call(self._redis.incrby, _ID_COUNTER, max(1, len(variables))))
        ids = [
            f"var_{new.name}_{n}" for new, n in zip(variables, range(last - len(variables) + 1, last + 1), strict=True)
        ]
        for var_id, new in zip(ids, variables, strict=True):
            created = new.created_at or now
            updated = new.updated_at or created
            stamped.append((new, created, updated))
            meta = _text_map(new.metadata)
            state = _state(new.type, new.value, updated, new.source)
            args += [new.name, var_id, _definition(new, created), state, new.version, meta, _history_entry(state, meta)]
        got = self._call(self._insert, keys=_keys(session_id), args=args)
        status = got[0]
        if status == "nosession":
            raise SessionNotFoundError(session_id)
        if status == "exists":
            raise VariableExistsError(got[1], session_id)
        if status == "limit":
            raise LimitExceededError("variables per session", int(got[1]), max_variables)
        # The records share the inserted definitions' maps: the store above hands out detached copies.
        out = [
            Variable(
                id=var_id,
                name=new.name,
                type=new.type,
                value=new.value,
                constraints=new.constraints,
                description=new.description,
                metadata=new.metadata,
                version=new.version,
                created_at=created,
                updated_at=updated,
                source=new.source,
            )
            for var_id, (new, created, updated) in zip(ids, stamped, strict=True)
        ]
        if self._listeners:
            self._changed(
                session_id,
                [VariableUpdate(v.id, v, UpdateType.VALUE_CHANGE, v.source, dict(v.metadata), now) for v in out],
            )
        return out

    def apply_writes(self, session_id: str, writes: Sequence[Write], *, history_limit: int) -> list[Variable]:
        # The definitions travel with the writes (for the change log): the store's read, or one more.
        found = {w.variable_id: w.variable for w in writes if w.variable is not None}
        unknown = [w.variable_id for w in writes if w.variable_id not in found]
        if unknown:
            found.update(self.read_variables(session_id, list(dict.fromkeys(unknown))))
        got = self._call(
            self._write, keys=_keys(session_id), args=self._write_args(session_id, writes, found, history_limit)
        )
        return self._written(session_id, writes, found, got)

    @property
    def nonblocking(self) -> bool:
        """Whether the ``*_async`` operations are available (this storage was opened from a URL, and
        hiredis is installed)."""
        return self._async_url is not None and LoopRedis is not None

    async def apply_writes_async(
        self, session_id: str, writes: Sequence[Write], *, history_limit: int
    ) -> list[Variable]:
        """:meth:`apply_writes` on the running event loop, through the loop's own multiplexed connection.

        The same script, checks and change log as the blocking call; every write must carry its
        definition (``Write.variable``). A bridge node on ``grpc.aio`` writes this way, so a write
        costs no thread hand-off and blocks nothing while Redis answers.

        Raises:
            ValueError: a write without its definition, or no URL to open the loop's connection from (or no hiredis).
        """
        found = {w.variable_id: w.variable for w in writes if w.variable is not None}
        if len(found) != len({w.variable_id for w in writes}):
            raise ValueError("apply_writes_async needs every write's definition (Write.variable)")
        args = self._write_args(session_id, writes, found, history_limit)
        got = await self._on_loop(_WRITE, _keys(session_id), args)
        return self._written(session_id, writes, found, got)

    async def read_variables_async(self, session_id: str, identifiers: Sequence[str]) -> dict[str, Variable] | None:
        """:meth:`read_variables` on the running event loop (see :meth:`apply_writes_async`).

        Returns None when the values read are too large to decode on the loop (more than
        :data:`~dspex_dspy.store.storage.LOOP_MAX_VALUE_BYTES`): read them with :meth:`read_variables`.
        """
        got = await self._on_loop(_READ, _keys(session_id), list(identifiers))
        if got is None:
            raise SessionNotFoundError(session_id)
        if sum(len(rec[2]) for rec in got if rec) > LOOP_MAX_VALUE_BYTES:
            return None
        return {ident: _variable(*rec) for ident, rec in zip(identifiers, got, strict=True) if rec}

    async def _on_loop(self, source: str, keys: Sequence[str], args: list[Any]) -> Any:
        """Run a script on the running loop's connection, mapping errors as :meth:`_call`.

        The loop's calls share one multiplexed connection (see :mod:`._redis_loop`): a Redis stall
        under load queues them on it, as the blocking path queues on its thread pool.
        """
        try:
            return await self._loop_client().script(source, keys, args)
        except Exception as exc:
            failure = self._failure(exc)
            if failure is exc:
                raise
            raise failure from exc

    def _loop_client(self) -> LoopRedis:
        """The client bound to the running loop, made on first use."""
        loop = asyncio.get_running_loop()
        here = self._loop_clients.get(loop)
        if here is not None:
            return here
        if self._async_url is None or LoopRedis is None:
            raise ValueError("this storage has no loop client: it was given a client, not a URL, or hiredis is missing")
        with self._async_lock:
            if self._closed:
                raise BridgeUnavailableError(f"the session storage at {self.url} is closed")
            here = self._loop_clients.get(loop)
            if here is None:
                here = self._loop_clients[loop] = LoopRedis(self._async_url)
        return here

    def _write_args(
        self, session_id: str, writes: Sequence[Write], found: Mapping[str, Variable], history_limit: int
    ) -> list[Any]:
        """The write script's arguments: per write its id, expected version, state, metadata and lease check."""
        args: list[Any] = [self._changelog_limit, history_limit]
        for write in writes:
            var = found.get(write.variable_id)
            if var is None:
                raise VariableNotFoundError(write.variable_id, session_id)
            state = _state(var.type, write.value, write.timestamp, write.source)
            meta = _text_map(write.metadata)
            args += [
                write.variable_id,
                write.expected_version or 0,
                state,
                meta,
                _history_entry(state, meta),
                write.lease_check,
                write.holder,
            ]
        return args

    def _written(
        self, session_id: str, writes: Sequence[Write], found: Mapping[str, Variable], got: Any
    ) -> list[Variable]:
        """The variables the write script's answer reports written (raising what it refused), announced."""
        status = got[0]
        if status == "nosession":
            raise SessionNotFoundError(session_id)
        if status == "novar":
            raise VariableNotFoundError(got[1], session_id)
        if status == "conflict":
            var = found[got[1]]
            raise VersionConflictError(
                var.name, next(w.expected_version for w in writes if w.variable_id == got[1]) or 0, int(got[2])
            )
        if status == "locked":
            # Every refused variable is named (an atomic batch reports each one).
            refused = [
                VariableLockedError(
                    found[var_id].name,
                    holder,
                    "rolling it back needs the optimization stopped first" if mode == "refuse" else "",
                )
                for var_id, holder, mode in zip(got[1::3], got[2::3], got[3::3], strict=True)
            ]
            first = refused[0]
            raise VariableLockedError(first.name, first.optimizer_id, first.detail, refused[1:])
        out: list[Variable] = []
        updates: list[VariableUpdate] = []
        for i, write in enumerate(writes):
            base = found[write.variable_id]
            var = Variable(
                id=base.id,
                name=base.name,
                type=base.type,
                value=write.value,
                constraints=base.constraints,
                description=base.description,
                metadata=_loads_map(got[2 + 4 * i]),
                version=int(got[1 + 4 * i]),
                created_at=base.created_at,
                updated_at=write.timestamp,
                source=write.source,
                optimization_status=_status(got[4 + 4 * i]),
            )
            out.append(var)
            updates.append(
                VariableUpdate(
                    var.id,
                    var,
                    UpdateType.VALUE_CHANGE,
                    write.source,
                    {**_loads_map(got[3 + 4 * i]), **write.announce},
                    write.timestamp,
                )
            )
        self._changed(session_id, updates)
        return out

    def delete_variable(
        self, session_id: str, variable_id: str, *, source: str, timestamp: float, history_limit: int = 0
    ) -> Variable:
        got = self._call(
            self._delete,
            keys=_keys(session_id),
            args=[self._changelog_limit, history_limit or _ALL_HISTORY, variable_id, _dumps([source, timestamp])],
        )
        if got[0] == "nosession":
            raise SessionNotFoundError(session_id)
        if got[0] == "novar":
            raise VariableNotFoundError(variable_id, session_id)
        if got[0] == "locked":
            raise VariableLockedError(got[1], got[2], "deleting it needs the optimization stopped first")
        var = _variable(*got[1:])
        for listener in self._listeners:
            listener.changed(session_id, [VariableUpdate(var.id, var, UpdateType.DELETED, source, {}, timestamp)])
        return var

    def history(self, session_id: str, variable_id: str, *, limit: int = 0) -> list[HistoryEntry]:
        got = self._call(self._history, keys=_keys(session_id), args=[variable_id, limit or _ALL_HISTORY])
        if got[0] == "nosession":
            raise SessionNotFoundError(session_id)
        if got[0] == "novar":
            raise VariableNotFoundError(variable_id, session_id)
        found = self.read_variables(session_id, [variable_id])
        if variable_id not in found:
            raise VariableNotFoundError(variable_id, session_id)
        type_url = TYPE_URL_PREFIX + found[variable_id].type
        out = []
        for version, raw in zip(got[1::2], got[2::2], strict=True):
            value_json, ts, source, meta = json.loads(raw)
            out.append(HistoryEntry(int(version), decode_value(type_url, value_json.encode()), ts, source, meta))
        return out

    # ------------------------------------------------------------------ optimization leases

    #: Leases live in Redis beside the variables: every node sees and enforces the same ones, and
    #: the write scripts check them in the same atomic step as the versions.
    shares_leases: Final = True

    def start_lease(
        self, session_id: str, variables: Mapping[str, str], optimizer_id: str, ttl: float
    ) -> OptimizationLease:
        """Take or renew ``optimizer_id``'s lease on ``variables`` (id -> name) for ``ttl`` seconds.

        Raises:
            SessionNotFoundError, VariableNotFoundError: the session or a variable is gone.
            VariableLockedError: another optimizer holds one of them (nothing changes).
        """
        now = time.time()
        args = [optimizer_id, max(1, round(ttl * 1000)), LEASE_ID_PREFIX + secrets.token_hex(12), repr(now), *variables]
        got = self._call(self._lease_start, keys=_keys(session_id), args=args)
        if got[0] == "nosession":
            raise SessionNotFoundError(session_id)
        if got[0] == "novar":
            raise VariableNotFoundError(variables.get(got[1], got[1]), session_id)
        if got[0] == "locked":
            raise VariableLockedError(
                variables[got[1]], got[2], f"optimizer {optimizer_id} cannot start on it until that lease ends"
            )
        return OptimizationLease(got[1], optimizer_id, tuple(variables.values()), ttl, now + ttl)

    def stop_lease(self, session_id: str, lease_id: str) -> None:
        """End the lease with that id (nothing happens if it already ended)."""
        got = self._call(self._lease_stop, keys=_keys(session_id), args=["id", lease_id, "0"])
        if got[0] == "nosession":
            raise SessionNotFoundError(session_id)

    def stop_variable_lease(self, session_id: str, variable_id: str, name: str, *, force: bool) -> None:
        """End the lease holding a variable; without ``force`` a held variable is refused.

        Raises:
            VariableLockedError: a lease holds it and ``force`` is false.
        """
        got = self._call(self._lease_stop, keys=_keys(session_id), args=["var", variable_id, "1" if force else "0"])
        if got[0] == "nosession":
            raise SessionNotFoundError(session_id)
        if got[0] == "locked":
            raise VariableLockedError(name, got[1], "stop the optimization by its lease id, or with force=True")

    # ------------------------------------------------------------------ recent calls

    def report_calls(self, session_id: str, calls: Sequence[str], *, keep: int) -> int:
        got = int(self._call(self._report_calls, keys=_keys(session_id), args=[keep, *calls]))
        if got < 0:
            raise SessionNotFoundError(session_id)
        return got

    def recent_calls(self, session_id: str, limit: int) -> list[str]:
        got = self._call(self._recent_calls, keys=_keys(session_id), args=[limit])
        if got is None:
            raise SessionNotFoundError(session_id)
        return list(got)

    # ------------------------------------------------------------------ change log

    def position(self, session_id: str) -> int:
        pos = self._call(self._redis.hget, _keys(session_id)[0], "pos")
        if pos is None:
            raise SessionNotFoundError(session_id)
        return int(pos)

    def read_changes(self, session_id: str, after: int, timeout: float) -> ChangeBatch:
        """Changes after ``after`` (``XREAD BLOCK``); a gap (trimmed entries) answers ``resync``."""
        stream = _keys(session_id)[7]
        got = self._call(self._redis.xread, {stream: f"{after}-0"}, count=1000, block=max(1, int(timeout * 1000)))
        if not got:
            return ChangeBatch(after)
        entries = got[0][1]
        first = int(entries[0][0].split("-")[0])
        if first != after + 1:
            return ChangeBatch(self.position(session_id), resync=True)
        if any(fields["k"] == "i" for _, fields in entries):
            return ChangeBatch(int(entries[-1][0].split("-")[0]), resync=True)  # a bulk import: re-read all
        updates = []
        for _, fields in entries:
            definition, state = fields["d"], fields["x"]
            var = _variable(fields["id"], definition, state, fields["v"], fields["m"])
            if fields["k"] == "d":
                source, ts = json.loads(fields["e"])
                updates.append(VariableUpdate(var.id, var, UpdateType.DELETED, source, {}, ts))
            else:
                if fields["e"]:  # the lease that held the variable when it was written
                    var = replace(var, optimization_status=_status(fields["e"]))
                updates.append(
                    VariableUpdate(
                        var.id, var, UpdateType.VALUE_CHANGE, var.source, json.loads(fields["w"]), var.updated_at
                    )
                )
        return ChangeBatch(int(entries[-1][0].split("-")[0]), tuple(updates))

    def close(self) -> None:
        """Close the connection pool, and each loop's connection on its own loop."""
        self._closed = True
        self._redis.close()
        with self._async_lock:
            clients = list(self._loop_clients.items())
            self._loop_clients.clear()
        for loop, here in clients:
            _close_on(loop, here)


def _close_on(loop: asyncio.AbstractEventLoop, client: LoopRedis) -> None:
    """Close a loop's Redis client on the loop it belongs to (a closed loop took its sockets with it)."""
    if loop.is_closed():
        return
    if not loop.is_running():
        with contextlib.suppress(RuntimeError):  # another loop runs in this thread: the sockets go with the process
            loop.run_until_complete(client.aclose())
        return
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        loop.create_task(client.aclose())
        return
    done = asyncio.run_coroutine_threadsafe(client.aclose(), loop)
    try:
        done.result(_CLOSE_WAIT_S)
    except Exception:  # closing is best effort: the sockets go with the process
        done.cancel()
