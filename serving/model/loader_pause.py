"""Holding a loading model process while this one runs forward passes."""
import os
import signal
import threading


class LoaderPause:
    """Holds a process that loads a new model version (SIGSTOP) while this worker's forward
    passes run, and lets it go on (SIGCONT) between them.

    Even at the lowest CPU priority, a process computing beside a forward pass slows it through
    the shared caches and memory, filling every moment a core waits inside the pass: measured
    here, a loop at SCHED_IDLE raised a bare pass's median by 20-60%; held during passes, by 5%.
    """

    def __init__(self):
        self.lock, self.pid, self.running = threading.Lock(), None, 0

    def follow(self, pid):
        """Hold `pid` from now on (None: nobody); one held at this moment goes on at once."""
        with self.lock:
            if self.running:
                self.signal(signal.SIGCONT)
            self.pid = pid or None

    def __enter__(self):
        with self.lock:
            self.running += 1
            if self.running == 1:
                self.signal(signal.SIGSTOP)

    def __exit__(self, *_):
        with self.lock:
            self.running -= 1
            if self.running == 0:
                self.signal(signal.SIGCONT)

    def signal(self, signum):
        if self.pid:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:  # it ended (refused, or superseded)
                self.pid = None
