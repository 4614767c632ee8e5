"""The heap's rules: frozen once an engine has started, thawed while one stops, so that
what a stopped engine held in reference cycles is still freed."""

from __future__ import annotations

import gc
import weakref

import pytest

from server.deployments.heap import Heap


class Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the cyclic collector frees it


@pytest.fixture
def heap():
    yield Heap()
    gc.unfreeze()  # the rest of the test process collects as usual


def test_frozen_cycles_outlive_collections_until_a_stop_thaws_them(heap):
    engine_state = Node()
    alive = weakref.ref(engine_state)
    heap.freeze()
    assert gc.get_freeze_count() > 0
    del engine_state
    gc.collect()
    assert alive() is not None  # frozen: no collection walks it
    with heap.thawed():
        assert gc.get_freeze_count() == 0
    assert alive() is None  # the stop's end collected it
    assert gc.get_freeze_count() > 0  # and froze what remains


def test_a_freeze_during_a_stop_waits_for_the_last_stop_to_end(heap):
    with heap.thawed():
        with heap.thawed():
            heap.freeze()  # another engine started meanwhile
            assert gc.get_freeze_count() == 0
        cycle = Node()
        alive = weakref.ref(cycle)
        del cycle
        assert gc.get_freeze_count() == 0  # the outer stop still runs
    assert alive() is None and gc.get_freeze_count() > 0


def test_at_shutdown_the_heap_stays_thawed(heap):
    heap.freeze()
    heap.thaw_for_good()
    with heap.thawed():
        pass
    heap.freeze()
    assert gc.get_freeze_count() == 0
