"""The worker's parts that need no process: its drain meter and arrival rate, with a clock the test
turns."""
import threading

import pytest

from worker import ArrivalRate, DrainMeter


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_two_lanes_at_once_count_their_busy_time_once():
    clock = Clock()
    meter = DrainMeter(clock=clock)
    assert meter.rate() == 0 and meter.batch_s() == 0
    first = meter.start()
    clock.now += 0.5
    second = meter.start()  # the other lane starts while the first still runs
    clock.now += 0.5
    meter.finish(first, 8)  # 1 s, 8 images
    clock.now += 0.5
    meter.finish(second, 8)  # 1 s, 8 images; 1.5 s busy in all
    clock.now += 10  # idle time is not busy time
    third = meter.start()
    clock.now += 0.5
    meter.finish(third, 4)

    assert meter.rate() == pytest.approx(20 / 2.0)  # 20 images in 2 busy seconds, not 2.5
    assert meter.batch_s() == pytest.approx((1 + 1 + 0.5) / 3)


def test_the_rate_follows_the_last_batches():
    clock = Clock()
    meter = DrainMeter(window=2, clock=clock)
    for seconds in (1.0, 0.25, 0.25):  # a slow batch, then two fast ones
        started = meter.start()
        clock.now += seconds
        meter.finish(started, 5)
    assert meter.rate() == pytest.approx(10 / 0.5)


def test_arrival_rate_counts_the_last_second_and_the_batch_being_filled():
    clock = Clock()
    arrivals = ArrivalRate(horizon_s=1.0, clock=clock)
    assert arrivals.per_second() == 0 and arrivals.per_second(1) == 1
    arrivals.note(3)
    clock.now += 0.5
    arrivals.note(2)
    assert arrivals.per_second() == 5 and arrivals.per_second(2) == 7
    clock.now += 0.6  # the first 3 are now older than a second
    assert arrivals.per_second() == 2


def test_wait_idle_returns_when_the_last_running_pass_ends():
    meter = DrainMeter()
    assert meter.wait_idle(0)
    first, second = meter.start(), meter.start()
    assert not meter.wait_idle(0.01)
    meter.finish(first, 1)
    assert not meter.wait_idle(0.01)  # the other pass still runs
    ended = threading.Timer(0.05, meter.finish, (second, 1))
    ended.start()
    assert meter.wait_idle(5)
    ended.join()
