"""The server's connection rules, unit by unit: which waiting connections the caps close, and how long a
refused upload is read and dropped (``cxr.serving.connections`` and ``cxr.serving.app._CappedBody``).
The same rules under real sockets are in ``tests/hostile/test_serve_load.py``."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import pytest

pytest.importorskip("uvicorn")

from cxr.serving.app import _CappedBody
from cxr.serving.connections import _Waiting


@dataclass(eq=False)
class _Conn:
    name: str
    waiting_client: str = field(default="10.0.0.1")


def _names(conns: list) -> list[str]:
    return [c.name for c in conns]


def test_a_burst_of_new_connections_from_one_client_is_not_evicted_before_its_grace_period() -> None:
    waiting = _Waiting(per_client=2, total=3, grace_s=1.0)
    burst = [_Conn(f"c{i}") for i in range(6)]
    assert [waiting.add(c, c.waiting_client, now=100.0 + i * 0.01) for i, c in enumerate(burst)] == [[]] * 6
    assert len(waiting.all) == 6  # over both caps, but all still in their grace period


def test_once_the_grace_period_is_over_the_oldest_go_first_until_the_caps_hold() -> None:
    waiting = _Waiting(per_client=2, total=3, grace_s=1.0)
    old = [_Conn(f"old{i}") for i in range(4)]
    for i, c in enumerate(old):  # 0.1 s apart: all within the grace period, none evicted yet
        assert waiting.add(c, c.waiting_client, now=100.0 + i / 10) == []
    # at 101.25 old0..old2 have waited ≥ 1 s, old3 only 0.95 s
    evicted = waiting.add(_Conn("new"), "10.0.0.1", now=101.25)
    assert _names(evicted) == ["old0", "old1", "old2"]  # down to the per-client 2: old3 and new
    assert _names(list(waiting.all)) == ["old3", "new"]


def test_the_total_cap_counts_every_client_and_spares_young_ones() -> None:
    waiting = _Waiting(per_client=16, total=2, grace_s=1.0)
    a, b = _Conn("a", "10.0.0.1"), _Conn("b", "10.0.0.2")
    waiting.add(a, a.waiting_client, now=0.0)
    waiting.add(b, b.waiting_client, now=0.5)
    assert waiting.add(_Conn("c", "10.0.0.3"), "10.0.0.3", now=1.2) == [a]  # b is 0.7 s old: spared
    assert sorted(waiting.by_client) == ["10.0.0.2", "10.0.0.3"]
    waiting.remove(b, "10.0.0.2")
    assert "10.0.0.2" not in waiting.by_client


def _trickle(chunks: int, every_s: float, stall_after: int | None = None):
    """An ASGI ``receive`` sending ``chunks`` body messages, ``every_s`` apart; silent after ``stall_after``."""
    sent = 0

    async def receive() -> dict:
        nonlocal sent
        if stall_after is not None and sent >= stall_after:
            await asyncio.sleep(3600)
        await asyncio.sleep(every_s)
        sent += 1
        return {"type": "http.request", "body": b"x" * 1000, "more_body": sent < chunks}

    return receive, lambda: sent


def test_a_refused_body_is_read_to_its_end_while_the_client_keeps_sending() -> None:
    receive, sent = _trickle(chunks=20, every_s=0.02)
    body = _CappedBody(receive, limit=10)
    started = time.monotonic()
    asyncio.run(body.discard_rest({"content-length": "20000"}, budget=1_000_000, total_s=5.0, idle_s=0.5))
    assert sent() == 20 and body.finished
    assert time.monotonic() - started < 4.0


def test_reading_a_refused_body_stops_when_the_client_goes_quiet_or_the_time_is_up() -> None:
    receive, sent = _trickle(chunks=100, every_s=0.01, stall_after=5)
    body = _CappedBody(receive, limit=10)
    started = time.monotonic()
    asyncio.run(body.discard_rest({}, budget=1_000_000, total_s=30.0, idle_s=0.3))
    assert sent() == 5 and not body.finished
    assert 0.3 <= time.monotonic() - started < 3.0

    receive, sent = _trickle(chunks=10_000, every_s=0.01)
    body = _CappedBody(receive, limit=10)
    started = time.monotonic()
    asyncio.run(body.discard_rest({}, budget=10**9, total_s=0.5, idle_s=0.3))
    assert not body.finished and 0.5 <= time.monotonic() - started < 3.0


def test_nothing_is_read_for_a_client_waiting_for_100_continue_or_a_body_over_the_budget() -> None:
    for headers in ({"expect": "100-continue"}, {"content-length": "2000000"}):
        receive, sent = _trickle(chunks=5, every_s=0.0)
        asyncio.run(_CappedBody(receive, limit=10).discard_rest(headers, budget=1_000_000))
        assert sent() == 0, headers
