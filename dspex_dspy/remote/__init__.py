"""Talking to a bridge server over gRPC: RPC descriptions, channels and :class:`RemoteStore`.

- :mod:`dspex_dspy.remote.calls`: :class:`BridgeCall` / :class:`BridgeCalls`, what each operation
  sends and how its answer is read (no I/O);
- :mod:`dspex_dspy.remote.channel`: :func:`open_channel` and the options of every channel;
- :mod:`dspex_dspy.remote.store`: :class:`RemoteStore`, the SessionStore methods over gRPC.

The status <-> exception mapping both the server and the clients use is in
:mod:`dspex_dspy.wire_errors`. The names below are re-exported here for convenience.
"""

from __future__ import annotations

from dspex_dspy.remote.calls import BridgeCall, BridgeCalls, encode_write, infer_type, registered_variable
from dspex_dspy.remote.channel import BALANCE_ENV, CHANNEL_OPTIONS, DEFAULT_CALL_TIMEOUT, channel_args, open_channel
from dspex_dspy.remote.store import IMPORT_WINDOW, RemoteStore

__all__ = [
    "BALANCE_ENV",
    "CHANNEL_OPTIONS",
    "DEFAULT_CALL_TIMEOUT",
    "IMPORT_WINDOW",
    "BridgeCall",
    "BridgeCalls",
    "RemoteStore",
    "channel_args",
    "encode_write",
    "infer_type",
    "open_channel",
    "registered_variable",
]
