"""How much CPU a loading model version gets, and when to stop holding it back.

A new version loads at the lowest priority, held during forward passes, as long as it gets on. One
that used less than LOADER_MIN_SHARE of a core over LOADER_WINDOW_S (a busy worker leaves it next
to nothing) is held no more; if it still gets too little, it returns to normal priority. Slower
answers for a while, rather than a reload that takes longer than any reload waits."""
import logging
import time

import psutil

from serving.rollout.priority import let_go_on

log = logging.getLogger("keras_server.rollout")

LOADER_WINDOW_S = 30.0
# A load is starved below this share only: held back at it, one that needs 15 s of CPU still ends
# in 5 minutes, half of what `reload` waits by default, while every step taken slows the answers.
LOADER_MIN_SHARE = 0.05


class LoaderWatch:
    """The CPU share of one loading process, window by window: `step()` says when to unhold it,
    then when to return it to normal priority."""

    def __init__(self, pid, window_s=LOADER_WINDOW_S, min_share=LOADER_MIN_SHARE,
                 clock=time.monotonic):
        self.pid, self.window_s, self.min_share, self.clock = pid, window_s, min_share, clock
        self.since, self.cpu_then = clock(), 0.0
        self.steps = ["unhold", "normal priority"]  # what is left to give it, in order

    @property
    def held(self):
        return len(self.steps) == 2

    def step(self):
        """None while the process gets its share (or the window is not over); else what to do
        now, "unhold" or then "normal priority", with the share it got and over how long."""
        now = self.clock()
        if not self.pid or not self.steps or now - self.since < self.window_s:
            return None  # (pid 0: no process was started; its refusal is on the way)
        try:
            cpu = sum(psutil.Process(self.pid).cpu_times()[:2])  # user and system
        except psutil.Error:
            return None  # it has ended: its "gone" is on the way
        share, seconds = (cpu - self.cpu_then) / (now - self.since), now - self.since
        self.since, self.cpu_then = now, cpu
        if share >= self.min_share:
            return None
        return self.steps.pop(0), share, seconds

    def spur(self, serving, version):
        """Act on step(): tell the serving process to hold the loader no more, or return the
        loader to normal priority."""
        step = self.step()
        if not step:
            return
        action, share, seconds = step
        if action == "unhold":
            serving.tell("loader", pid=0)  # the serving process holds it no more
        try:
            let_go_on(self.pid, normal_priority=action == "normal priority")
        except ProcessLookupError:
            return  # it has ended: its "gone" is on the way
        except PermissionError as exc:
            log.warning("cannot return version %s to normal priority: %s", version, exc)
            return
        # Said once done, so that whoever reads it knows the process has been let go on.
        log.warning("version %s got %.2f of a core in the last %.0f s of loading: it loads on %s "
                    "(requests served meanwhile may slow)", version, share, seconds,
                    "unheld during forward passes" if action == "unhold" else "at normal priority")
