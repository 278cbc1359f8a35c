"""The decode budget on its own (no server): bodies held while their decodes wait must not lock it."""

from __future__ import annotations

import asyncio

import pytest

from cxr.serving.budget import BudgetError, DecodeBudget


async def _request(budget: DecodeBudget, body: int, decode: int, read: asyncio.Event, log: list[str], name: str) -> str:
    """One upload: hold the body, wait until every body is read, then reserve the decode and "decode"."""
    try:
        async with budget.hold(body, name, body=True):
            await read.wait()
            async with budget.hold(decode, name):
                log.append(f"{name} decoding")
                await asyncio.sleep(0.05)
        return "200"
    except BudgetError as exc:
        return str(exc.status)


def test_bodies_waiting_for_their_decodes_give_way_to_the_oldest_instead_of_locking_the_budget() -> None:
    async def scenario() -> tuple[list[str], list[str], float]:
        budget = DecodeBudget(1000, wait_s=3.0)
        read, log = asyncio.Event(), []
        # three bodies of 300 fill 900 of 1000; each decode needs 500 more
        tasks = [asyncio.create_task(_request(budget, 300, 500, read, log, f"r{i}")) for i in range(3)]
        await asyncio.sleep(0.05)
        assert budget.used == 900
        loop = asyncio.get_running_loop()
        started = loop.time()
        read.set()
        outcomes = await asyncio.gather(*tasks)
        return outcomes, log, loop.time() - started

    outcomes, log, took = asyncio.run(scenario())
    # the oldest decodes; the two younger ones are refused at once (their bodies released), not after 3 s
    assert outcomes == ["200", "503", "503"], outcomes
    assert log == ["r0 decoding"]
    assert took < 1.0, took


def test_no_new_body_is_admitted_while_the_oldest_decode_waits_for_room() -> None:
    async def scenario() -> list[str]:
        budget = DecodeBudget(1000, wait_s=2.0)
        order: list[str] = []
        # a decode in progress (600 of 1000) and r0's body (100): r0's decode of 400 must wait
        async with budget.hold(600, "a running decode"), budget.hold(100, "r0's body", body=True):
            waiting = asyncio.create_task(_hold_then_log(budget, 400, "r0 decode", order))
            await asyncio.sleep(0.05)
            late_body = asyncio.create_task(_hold_then_log(budget, 100, "r1 body", order, body=True))
            await asyncio.sleep(0.2)
            assert order == [], order  # 100 would fit, but the older decode waits first
        await asyncio.gather(waiting, late_body)
        return order

    assert asyncio.run(scenario()) == ["r0 decode", "r1 body"]


async def _hold_then_log(budget: DecodeBudget, n: int, name: str, order: list[str], body: bool = False) -> None:
    async with budget.hold(n, name, body=body):
        order.append(name)
        await asyncio.sleep(0.01)


def test_a_reservation_that_can_never_fit_is_413_at_once_and_a_busy_one_503_after_the_wait() -> None:
    async def scenario() -> tuple[int, int]:
        budget = DecodeBudget(1000, wait_s=0.2)
        with pytest.raises(BudgetError) as never:
            async with budget.hold(1001, "a huge image"):
                pass
        async with budget.hold(900, "a running decode"):
            with pytest.raises(BudgetError) as busy:
                async with budget.hold(200, "another"):
                    pass
        return never.value.status, busy.value.status

    assert asyncio.run(scenario()) == (413, 503)
