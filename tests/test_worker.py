"""The worker's parts that need no process: its drain meter, with a clock the test turns."""
import pytest

from worker import DrainMeter


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
