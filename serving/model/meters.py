"""What a worker measures to fill its batches (its drain rate, the arrival rate, and back-off),
and the order in which a worker times alternatives (batch sizes, precisions)."""
import collections
import logging
import threading
import time

log = logging.getLogger("keras_server.worker")


class DrainMeter:
    """Images per second of busy time and the mean forward pass, over the last batches.

    Lanes overlap: busy time is the time at least one forward pass runs, so two lanes at once
    count once (adding up each pass's own time would halve the rate).
    """

    def __init__(self, window=20, clock=time.monotonic):
        self.lock, self.clock = threading.Lock(), clock
        self.idle = threading.Condition(self.lock)  # notified when the last running pass ends
        self.running, self.busy_since = 0, 0.0
        self.images, self.busy_s = 0, 0.0
        self.marks = collections.deque([(0, 0.0)], maxlen=window + 1)  # (images, busy_s) totals
        self.passes = collections.deque(maxlen=window)  # seconds of the last forward passes

    def start(self):
        """A forward pass begins; returns what finish() needs."""
        with self.lock:
            now = self.clock()
            self.account(now)
            self.running += 1
            return now

    def finish(self, started, images):
        """The forward pass that start() returned `started` for has answered `images` images."""
        with self.lock:
            now = self.clock()
            self.account(now)
            self.running -= 1
            self.passes.append(now - started)
            self.images += images
            self.marks.append((self.images, self.busy_s))
            if not self.running:
                self.idle.notify_all()

    def wait_idle(self, timeout_s):
        """Wait until no forward pass runs, at most timeout_s; True if none runs."""
        with self.lock:
            return self.idle.wait_for(lambda: not self.running, timeout_s)

    def account(self, now):
        if self.running:
            self.busy_s += now - self.busy_since
        self.busy_since = now

    def rate(self):
        """Images per busy second over the window; 0 before any batch."""
        with self.lock:
            (images0, busy0), (images1, busy1) = self.marks[0], self.marks[-1]
        return (images1 - images0) / (busy1 - busy0) if busy1 > busy0 else 0.0

    def batch_s(self):
        """Mean seconds of the last forward passes; 0 before any."""
        with self.lock:
            return sum(self.passes) / len(self.passes) if self.passes else 0.0


class ArrivalRate:
    """Jobs claimed per second over the last horizon_s: how busy the queue has been lately."""

    def __init__(self, horizon_s=1.0, clock=time.monotonic):
        self.horizon_s, self.clock = horizon_s, clock
        self.lock, self.times = threading.Lock(), collections.deque()

    def note(self, jobs):
        with self.lock:
            now = self.clock()
            self.times.extend([now] * jobs)
            self.forget(now)

    def per_second(self, extra=0):
        """The rate, counting `extra` jobs claimed just now (a batch being filled) too."""
        with self.lock:
            self.forget(self.clock())
            return (len(self.times) + extra) / self.horizon_s

    def forget(self, now):
        while self.times and self.times[0] <= now - self.horizon_s:
            self.times.popleft()


class Backoff:
    """Capped, growing waits between retries of a failing Redis call, each one logged."""

    def __init__(self, first_s=0.1, cap_s=2.0):
        self.first_s, self.cap_s, self.delay_s = first_s, cap_s, first_s

    def reset(self):
        self.delay_s = self.first_s

    def next_delay(self):
        """The delay to wait now; the one after it is twice as long, up to the cap."""
        delay, self.delay_s = self.delay_s, min(self.delay_s * 2, self.cap_s)
        return delay

    def wait(self, reason, stop_event):
        log.warning("%s; retrying in %.1f s", reason, self.delay_s)
        delay = self.next_delay()
        if stop_event is not None:
            stop_event.wait(delay)
        else:
            time.sleep(delay)


class FillWindow:
    """How long a partial batch waits for more jobs, from the worker's drain and arrival meters.

    While another lane's forward pass runs, it waits for that pass to end (started beside it, it
    would share the cores with that pass, and a backlog would be split into a full and a small
    batch). With the model idle, it waits out `timeout_s` (BATCH_TIMEOUT_MS) only if the recent
    arrival rate makes another job likely within it: at light load a request never waits for
    company.
    """

    def __init__(self, timeout_s, clock=time.monotonic):
        self.timeout_s, self.clock = timeout_s, clock
        self.drain = DrainMeter(clock=clock)
        self.arrivals = ArrivalRate(clock=clock)

    def timer(self):
        """claim_batch's time_to_fill for one claim: seconds left to wait, given those claimed."""
        window_end = None

        def time_to_fill(claimed):
            nonlocal window_end
            if not self.drain.wait_idle(0.01):
                return 0.0001  # claim what came meanwhile, then ask again
            if window_end is None:
                expected = self.arrivals.per_second(claimed) * self.timeout_s
                window_end = self.clock() + (self.timeout_s if expected >= 1 else 0)
            return window_end - self.clock()
        return time_to_fill


def alternating(items, number):
    """The items in round `number`'s order when timing them in interleaved rounds: forwards in
    even rounds, backwards in odd ones, so that a drift of the machine's speed touches every item
    alike."""
    items = list(items)
    return items if number % 2 == 0 else items[::-1]
