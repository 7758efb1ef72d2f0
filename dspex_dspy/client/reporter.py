"""Reporting module call provenance to the bridge, off the caller's path.

A worker client built with ``report_calls=True`` (or ``DSPEX_REPORT_CALLS=1``) hands each call
record of a variable-aware module to a :class:`CallReporter`: the record joins a bounded queue
(the caller never waits and never sees an error) and one daemon thread sends the queue in
batches with ``BridgeAdmin/ReportCalls``. When the bridge cannot take a batch, or the queue is
full, records are dropped with a debug log line: provenance is an aid, never a reason to slow
or fail a program.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

__all__ = ["MAX_BATCH", "MAX_QUEUED", "CallReporter"]

logger = logging.getLogger("dspex_dspy.client")

MAX_QUEUED: Final = 1_000
"""Records waiting to be sent; more are dropped."""
MAX_BATCH: Final = 100
"""Records sent in one ``ReportCalls``."""

_STOP: Final = object()


class CallReporter:
    """A bounded queue of call records and the daemon thread that sends them.

    Args:
        send: sends one batch (raises on failure); called on the reporter's thread only.
        guard: a context manager factory held around each send (the client's fork pause).
        name: the thread's name.
    """

    def __init__(
        self,
        send: Callable[[list[Mapping[str, Any]]], object],
        *,
        guard: Callable[[], contextlib.AbstractContextManager[object]] = contextlib.nullcontext,
        name: str = "dspex-call-reporter",
    ) -> None:
        self._send = send
        self._guard = guard
        self._queue: queue.Queue[Any] = queue.Queue(MAX_QUEUED)
        self._stopped = False
        self.sent = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, record: Mapping[str, Any]) -> None:
        """Queue a record to send; never blocks, never raises (a full queue drops it)."""
        if self._stopped:
            return
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            logger.debug("call report dropped: %d records already wait to be sent", MAX_QUEUED)

    def _batches(self) -> Iterator[list[Mapping[str, Any]]]:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    stop = True
                    break
                batch.append(item)
            yield batch
            if stop:
                return

    def _run(self) -> None:
        for batch in self._batches():
            try:
                with self._guard():
                    self._send(batch)
                self.sent += len(batch)
            except Exception as exc:  # an outage or a refusal: the records are dropped
                self.dropped += len(batch)
                logger.debug("%d call reports dropped: %s", len(batch), exc)

    def close(self, timeout: float | None = None) -> None:
        """Send what is queued (within ``timeout``), then end the thread. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(queue.Full):
            self._queue.put(_STOP, timeout=timeout)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
