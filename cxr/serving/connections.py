"""Connections that a few idle sockets cannot exhaust: uvicorn's HTTP/1.1 protocol with a header
deadline and a cap on connections waiting for a request.

uvicorn times out an idle connection only after it has answered a request on it (its keep-alive
timeout). A client that connects and sends nothing, or half a header block, holds its socket
forever; and uvicorn's ``limit_concurrency`` counts those sockets, so 64 of them made every request,
``/health`` included, a 503. Neither uvicorn nor Starlette has a header-timeout option (Hypercorn's
``read_timeout`` would mean another server, with its own logging and lifespan to redo), so this
module subclasses uvicorn's h11 protocol, adding two rules:

* **Header deadline.** A connection must deliver a complete request header within
  ``header_timeout_s`` of connecting, or of its previous answer; otherwise it is closed.
* **Waiting connections are capped**, per client address and in all: when a new connection would
  pass a cap, the *oldest* waiting connection is closed. A flood of idle sockets therefore evicts
  itself, and a fresh request (``GET /health``) is always read and answered.
* **A connection gets a grace period** (``EVICT_AFTER_S``) before it can be evicted. The event loop
  accepts every queued connection before it reads from any, so a burst of real clients (64 uploads
  at once from one address, on busy cores) counted as "waiting" all together, and the cap closed
  some of them before their headers, already sent, were read: their clients saw a reset. Within the
  grace period the caps may be passed; ``limit_concurrency`` still bounds the whole.

A connection whose request is being read, decoded or scored is not waiting; what bounds those is
the decode budget (:mod:`cxr.serving.budget`).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("cxr.serve")

HEADER_TIMEOUT_S = 10.0
MAX_WAITING_PER_CLIENT = 16
MAX_WAITING = 32
EVICT_AFTER_S = 1.0


class _Waiting:
    """The connections of one server that have not yet sent a complete request header, oldest first."""

    def __init__(self, per_client: int, total: int, grace_s: float = EVICT_AFTER_S) -> None:
        self.per_client = per_client
        self.total = total
        self.grace_s = grace_s
        self.all: OrderedDict[_GuardedH11Protocol, float] = OrderedDict()  # → when it started waiting
        self.by_client: dict[str, OrderedDict[_GuardedH11Protocol, float]] = {}

    def add(self, conn: _GuardedH11Protocol, client: str, now: float) -> list[_GuardedH11Protocol]:
        """Register ``conn``, waiting since ``now``; return the connections to close so that both caps
        hold, oldest first, sparing those that have waited less than the grace period."""
        self.all[conn] = now
        self.by_client.setdefault(client, OrderedDict())[conn] = now
        evicted = []
        mine = self.by_client[client]
        while len(mine) > self.per_client and self._expendable(mine, now):
            evicted.append(next(iter(mine)))
            self.remove(evicted[-1], client)
        while len(self.all) > self.total and self._expendable(self.all, now):
            oldest = next(iter(self.all))
            evicted.append(oldest)
            self.remove(oldest, oldest.waiting_client)
        return evicted

    def _expendable(self, queue: OrderedDict[_GuardedH11Protocol, float], now: float) -> bool:
        """The oldest connection in ``queue`` has had its grace period."""
        return now - next(iter(queue.values())) >= self.grace_s

    def remove(self, conn: _GuardedH11Protocol, client: str) -> None:
        self.all.pop(conn, None)
        mine = self.by_client.get(client)
        if mine is not None:
            mine.pop(conn, None)
            if not mine:
                del self.by_client[client]


class _GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header deadline and capped waiting connections (the module's rules).

    A subclass per server (:func:`guarded_protocol`) sets ``waiting``, its registry of the connections
    waiting for a request header, and ``header_deadline_s``.
    """

    waiting: _Waiting
    header_deadline_s: float
    waiting_client = ""
    _deadline: asyncio.TimerHandle | None = None
    _is_waiting = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.waiting_client = self.client[0] if self.client else ""
        self._wait()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_waiting()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._stop_waiting()  # a request is in progress: its header arrived

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
            self._wait()  # kept alive: the next request's header has its own deadline

    def _wait(self) -> None:
        if self._is_waiting:
            return
        self._is_waiting = True
        self._deadline = self.loop.call_later(self.header_deadline_s, self._expire)
        for conn in self.waiting.add(self, self.waiting_client, self.loop.time()):
            conn._drop("evicted: too many connections waiting for a request header")

    def _stop_waiting(self) -> None:
        if not self._is_waiting:
            return
        self._is_waiting = False
        self.waiting.remove(self, self.waiting_client)
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if self._is_waiting:
            self._drop(f"no complete request header within {self.header_deadline_s:g} s")

    def _drop(self, why: str) -> None:
        self._stop_waiting()
        if not self.transport.is_closing():
            log.debug("closed a connection from %s: %s", self.waiting_client or "?", why)
            self.transport.close()


def guarded_protocol(
    header_timeout_s: float = HEADER_TIMEOUT_S,
    max_waiting_per_client: int = MAX_WAITING_PER_CLIENT,
    max_waiting: int = MAX_WAITING,
) -> type[H11Protocol]:
    """An h11 protocol class for ``uvicorn.Config(http=...)`` with its own registry of waiting connections.

    Args:
        header_timeout_s: seconds a connection may take to send a complete request header.
        max_waiting_per_client: waiting connections one client address may hold.
        max_waiting: waiting connections in all.

    Returns:
        The protocol class (one per server, so servers in one process do not share caps).
    """

    class GuardedH11Protocol(_GuardedH11Protocol):
        waiting = _Waiting(max_waiting_per_client, max_waiting)
        header_deadline_s = header_timeout_s

    return GuardedH11Protocol
