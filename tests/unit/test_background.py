"""A streamed background run's event log: followed from any sequence number, live, to its end;
kept a while after the run ends, then gone."""

import asyncio

from server.api.background import BackgroundRuns, EventLog


async def _collect(events) -> list[str]:
    return [event async for event in events]


def test_a_follower_gets_the_events_after_its_number_then_each_as_it_comes_until_the_end():
    async def scenario():
        log = EventLog()
        for event in ("e0", "e1", "e2"):
            log.append(event)
        late, whole = asyncio.ensure_future(_collect(log.follow(starting_after=1))), asyncio.ensure_future(_collect(log.follow()))
        await asyncio.sleep(0)
        log.append("e3")
        await asyncio.sleep(0)
        log.append("e4")
        log.close()
        return await late, await whole, await _collect(log.follow(starting_after=4))

    late, whole, past_the_end = asyncio.run(scenario())
    assert late == ["e2", "e3", "e4"]
    assert whole == ["e0", "e1", "e2", "e3", "e4"]
    assert past_the_end == []


def test_a_runs_events_are_kept_after_it_ends_for_the_time_set_then_forgotten():
    async def scenario():
        runs = BackgroundRuns(keep_events_s=0.05)
        log = EventLog()

        async def work():
            log.append("e0")

        runs.start("resp_1", work(), log)
        await asyncio.sleep(0.01)
        kept = runs.events_of("resp_1")
        closed = log.is_closed
        await asyncio.sleep(0.1)
        return kept, closed, runs.events_of("resp_1")

    kept, closed, later = asyncio.run(scenario())
    assert kept is not None and closed  # the run's end closes its log: followers stop there
    assert later is None


def test_of_the_runs_that_ended_only_the_newest_logs_are_kept():
    async def scenario():
        runs = BackgroundRuns(max_ended_logs=2)

        async def work():
            pass

        for run_id in ("a", "b", "c"):
            runs.start(run_id, work(), EventLog())
            await asyncio.sleep(0.01)
        return [runs.events_of(run_id) is not None for run_id in ("a", "b", "c")]

    assert asyncio.run(scenario()) == [False, True, True]
