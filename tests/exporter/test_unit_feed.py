"""The weight pass's feed (exporter.unit_feed): results come back in plan order whatever the
lookahead, and no more than `workers + ahead` batches are ever in flight (produced, running or
queued) beyond the one the consumer holds."""

from __future__ import annotations

import threading
import time

import pytest

from quantgate.exporter.switches import SettingError
from quantgate.exporter.unit_feed import AHEAD_ENV, DEFAULT_AHEAD, UnitFeed, feed_ahead


@pytest.mark.parametrize(("workers", "ahead"), [(1, 0), (2, 0), (2, 1), (2, 6), (3, 40)])
def test_results_in_order_and_in_flight_bounded(workers: int, ahead: int) -> None:
    units = list(range(30))
    batches = [[i, i + 1] for i in range(0, 30, 2)]
    lock = threading.Lock()
    started: list[int] = []
    taken = [0]                 # batches the consumer has finished with
    most_in_flight = [0]

    def work_batch(members: list[int]) -> list[int]:
        with lock:
            started.append(members[0])
            most_in_flight[0] = max(most_in_flight[0], len(started) - taken[0])
        time.sleep(0.002 * (members[0] % 3))    # uneven batches finish out of order
        return [m * 10 for m in members]

    got = []
    with UnitFeed(units, lambda u: u * 10, workers, single_threaded_torch=False, batches=batches,
                  work_batch=work_batch, ahead=ahead) as feed:
        for unit in units:
            got.append(feed.get(unit))
            time.sleep(0.001)   # a slow consumer lets the workers run ahead as far as they may
            if unit % 2:
                with lock:
                    taken[0] += 1
    assert got == [u * 10 for u in units]
    assert sorted(started) == [b[0] for b in batches]
    assert most_in_flight[0] <= max(1, workers + ahead)


def test_started_batches_run_before_the_first_get() -> None:
    ran = threading.Event()
    units = list(range(4))
    with UnitFeed(units, lambda u: (ran.set(), u)[1], 2, single_threaded_torch=False) as feed:
        feed.start()
        assert ran.wait(5), "start() begins the first batches without a get"
        assert [feed.get(u) for u in units] == units
    with pytest.raises(RuntimeError, match="outside its `with` block"):
        UnitFeed(units, lambda u: u, 2, single_threaded_torch=False).start()


def test_the_lookahead_setting(monkeypatch) -> None:
    monkeypatch.delenv(AHEAD_ENV, raising=False)
    assert feed_ahead() == DEFAULT_AHEAD
    monkeypatch.setenv(AHEAD_ENV, " 6 ")
    assert feed_ahead() == 6
    for bad in ("-1", "two", "1.5"):
        monkeypatch.setenv(AHEAD_ENV, bad)
        with pytest.raises(SettingError, match=AHEAD_ENV):
            feed_ahead()
