"""Backends of a Context: the :class:`StateProvider` protocol, :class:`LocalState` and :class:`BridgedState`."""

from dspex_dspy.state.base import StateProvider
from dspex_dspy.state.bridged import BridgedState, SessionAccess
from dspex_dspy.state.local import LocalState

__all__ = ["BridgedState", "LocalState", "SessionAccess", "StateProvider"]
