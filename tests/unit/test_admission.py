"""The admission queue alone: places, waiting, overflow, timeouts, clients that leave."""

import asyncio

import pytest

from models.errors import OverloadedError
from server.deployments.admission import Admission


def test_no_cap_admits_everyone():
    async def scenario():
        admission = Admission("chat", None, 0, 1.0)
        for _ in range(100):
            await admission.enter()
        return admission.num_running

    assert asyncio.run(scenario()) == 100


def test_waiters_get_places_in_order_and_the_overflow_is_refused_at_once():
    async def scenario():
        admission = Admission("chat", 1, 2, 5.0)
        await admission.enter()
        order = []

        async def wait(tag):
            await admission.enter()
            order.append(tag)

        first, second = asyncio.create_task(wait("first")), asyncio.create_task(wait("second"))
        await asyncio.sleep(0.01)
        with pytest.raises(OverloadedError, match="1 running, 2 waiting") as refused:
            await admission.enter()
        assert refused.value.retry_after_s is not None
        admission.leave()
        await first
        admission.leave()
        await second
        admission.leave()
        return order, admission.num_running, admission.num_waiting

    assert asyncio.run(scenario()) == (["first", "second"], 0, 0)


def test_a_waiter_times_out_with_a_503_and_leaves_the_queue():
    async def scenario():
        admission = Admission("chat", 1, 5, 0.05)
        await admission.enter()
        with pytest.raises(OverloadedError, match="no free place within 0.05 s"):
            await admission.enter()
        return admission.num_waiting

    assert asyncio.run(scenario()) == 0


def test_a_waiter_that_is_cancelled_gives_its_place_on():
    async def scenario():
        admission = Admission("chat", 1, 5, 5.0)
        await admission.enter()
        leaving = asyncio.create_task(admission.enter())
        staying = asyncio.create_task(admission.enter())
        await asyncio.sleep(0.01)
        leaving.cancel()
        admission.leave()
        await staying
        return admission.num_running, admission.num_waiting

    assert asyncio.run(scenario()) == (1, 0)


def test_the_soonest_priority_waits_least_and_arrival_orders_one_priority():
    async def scenario():
        admission = Admission("chat", 1, 5, 5.0)
        await admission.enter()
        order = []

        async def wait(tag, priority):
            await admission.enter(priority)
            order.append(tag)

        waiters = []
        for tag, priority in (("batch", 10), ("chat-1", 0), ("urgent", -5), ("chat-2", 0)):
            waiters.append(asyncio.create_task(wait(tag, priority)))
            await asyncio.sleep(0.01)
        for waiter in waiters:
            admission.leave()
            await asyncio.sleep(0.01)
        await asyncio.gather(*waiters)
        return order

    assert asyncio.run(scenario()) == ["urgent", "chat-1", "chat-2", "batch"]
