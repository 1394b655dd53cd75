"""Model versions and rollouts: every version serves from a process of its own, and `reload`
switches all workers to a new version (or back) only once each has it loaded, warm and checked.

`run_keras_server.py model` runs a Supervisor, the container's main process. It serves the wanted
model from a child process (`run_keras_server.py model-process`). When `reload` proposes another
model, the supervisor loads it in a second child at the lowest CPU priority (SCHED_IDLE); once
that one is warm and back at normal priority, the old child stops claiming and finishes the
batches it holds, the new one takes over the queue, and the old one exits. Old and new never share
a heap, and loading competes with serving on equal terms for the CPU only when it would otherwise
starve (LOADER_WINDOW_S).

`run_keras_server.py reload` checks the spec's files where it runs (it loads no model), proposes
it under a new rollout number, and waits until every live worker serves it or one refuses (the
candidate does not load, or does not fit the labels or the queue's input). A refusal or a timeout
takes the proposal back (the workers return to the last accepted version), so the model that
workers started later load is always one that was accepted."""
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid

import psutil

import settings
from serving.rollout.model_process import Channel
from serving.rollout.priority import can_leave_idle, restore_priority
from serving.rollout.spec import MALLOC_ARENAS, spec_from_settings, spec_text
from serving.wire import records
from serving.wire.connection import REDIS_ERRORS, check_login, connect_redis
from serving.wire.keys import Keys

log = logging.getLogger("keras_server.rollout")


from serving import ROOT  # noqa: E402

RUN_KERAS_SERVER = os.path.join(ROOT, "run_keras_server.py")


# A new version loads at the lowest priority, held during forward passes, as long as it gets on. One
# that used less than LOADER_MIN_SHARE of a core over LOADER_WINDOW_S (a busy worker leaves it next
# to nothing) is held no more; if it still gets too little, it returns to normal priority. Slower
# answers for a while, rather than a reload that takes longer than any reload waits.
LOADER_WINDOW_S = 30.0


LOADER_MIN_SHARE = 0.1


class ModelProcess:
    """A child process that loads one model version and, when told, serves it."""

    def __init__(self, spec, rollout, order, events):
        ours, theirs = socket.socketpair()
        self.process = subprocess.Popen(
            [sys.executable, RUN_KERAS_SERVER, "model-process", str(theirs.fileno())],
            pass_fds=[theirs.fileno()], env={"MALLOC_ARENA_MAX": MALLOC_ARENAS, **os.environ})
        if order["low_priority"] and can_leave_idle(order["niceness"]):
            # From its first import on, not only once it has its order: it has one thread yet,
            # and the threads it starts inherit the policy.
            os.sched_setscheduler(self.process.pid, os.SCHED_IDLE, os.sched_param(0))
        theirs.close()
        self.channel = Channel(ours)
        self.spec, self.rollout = spec, rollout
        self.batch_size = self.input_shape = None  # known once it is warm
        self.gone = False  # set before its "gone" is queued: a message dropped while handing over
        self.channel.send(**order)
        threading.Thread(target=self.relay, args=(events,), daemon=True).start()

    def relay(self, events):
        """Put each message from the child on the supervisor's queue; "gone" when it closes."""
        while (message := self.channel.receive()) is not None:
            events.put((self, message))
        self.process.wait()  # reaped here, whether it is still serving or long replaced
        self.gone = True
        events.put((self, {"state": "gone"}))

    def note_warm(self, message):
        """Keep what a warm child reports: its successor loads at the same size and shape."""
        self.batch_size, self.input_shape = message["batch_size"], message["input_shape"]

    def serve(self):
        self.tell("serve")

    def tell(self, state, **details):
        try:
            self.channel.send(state=state, **details)
        except OSError:  # it has exited: its "gone" is on the way
            pass

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            self.process.send_signal(signal.SIGCONT)  # a held process must run to stop

    def exit_reason(self):
        self.process.wait(5)
        return f"the model process exited with status {self.process.returncode}"


class Supervisor:
    """Keeps the wanted model version serving, each version in a child process of its own."""

    def __init__(self, store):
        self.store, self.keys = store, Keys(settings.IMAGE_QUEUE)
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.events = queue.Queue()
        self.serving = self.candidate = None
        self.loader_mark = None  # the candidate's (when, CPU seconds, held) at its last check
        self.refused = set()  # rollout numbers this worker refused: not tried again
        self.started = 0
        self.stopping = threading.Event()

    def run(self):
        """Serve until SIGTERM, following reloads; the exit status (2: no model would load)."""
        try:
            if not self.start_serving():
                return 0 if self.stopping.is_set() else 2
            while not self.stopping.is_set():
                self.follow_wanted()
                self.spur_starving_candidate()
                try:
                    child, message = self.events.get(timeout=settings.HEARTBEAT_INTERVAL_S)
                except queue.Empty:
                    continue
                if child is self.candidate:
                    self.candidate_says(message)
                if self.serving.gone:  # (its "gone" may have come while handing over)
                    log.error("worker %s: %s", self.id, self.serving.exit_reason())
                    return 1
            return 0
        finally:
            self.stop_children()

    def start_serving(self):
        """Start the first child: the wanted model, else the last accepted one, else the
        settings'. False if none loads."""
        wanted, rollout = self.read_wanted()
        choices = [(wanted, rollout)] if wanted else []
        try:
            choices += [(spec, 0) for spec in records.accepted_models(self.store, self.keys)[-1:]]
        except REDIS_ERRORS:
            pass
        choices.append((spec_from_settings(), 0))
        tried = set()
        for spec, rollout in choices:
            if spec_text(spec) in tried:
                continue
            tried.add(spec_text(spec))
            child = self.start(spec, rollout, low_priority=False, batch_size=settings.BATCH_SIZE)
            state, reason = self.wait_until_warm(child)
            if state == "stopped":  # not a refusal: stop_children stops it with the others
                self.candidate = child
                return False
            if state == "warm":
                child.serve()
                self.serving = child
                if rollout == 0:  # (a proposal a reload has not accepted yet is not recorded)
                    self.record(records.accept_first_model, spec)
                return True
            self.refuse(child, reason)
        return False

    def wait_until_warm(self, child):
        """("warm", None) or ("refused", reason) from a child that is loading."""
        while not self.stopping.is_set():
            try:
                sender, message = self.events.get(timeout=1)
            except queue.Empty:
                continue
            if sender is not child:  # e.g. the "gone" of one refused before it
                continue
            if message["state"] == "warm":
                child.note_warm(message)
                return "warm", None
            if message["state"] in ("refused", "gone"):
                return "refused", message.get("reason") or child.exit_reason()
        return "stopped", "stopping"

    def follow_wanted(self):
        """Start loading the wanted model in a candidate child if it is not the one serving."""
        wanted, rollout = self.read_wanted()
        if wanted is None or rollout in self.refused:
            return
        if spec_text(wanted) == spec_text(self.serving.spec):
            if self.candidate:  # the proposal was taken back while it loaded
                self.drop_candidate()
            return
        if self.candidate and spec_text(self.candidate.spec) == spec_text(wanted):
            return
        if self.candidate:
            log.info("rollout %d replaces rollout %d before it was warm", rollout,
                     self.candidate.rollout)
            self.drop_candidate()
        log.info("rollout %d: loading version %s beside version %s", rollout, wanted["version"],
                 self.serving.spec["version"])
        self.candidate = self.start(wanted, rollout, low_priority=True,
                                    batch_size=self.serving.batch_size,
                                    input_shape=self.serving.input_shape)
        self.serving.tell("loader", pid=self.candidate.process.pid)
        self.loader_mark = (time.monotonic(), 0.0, True)

    def spur_starving_candidate(self):
        """A candidate that got less than LOADER_MIN_SHARE of a core over the last
        LOADER_WINDOW_S goes on unheld; if it still gets too little, at normal priority."""
        if not (self.candidate and self.loader_mark):
            return
        since, cpu_then, held = self.loader_mark
        now, pid = time.monotonic(), self.candidate.process.pid
        if now - since < LOADER_WINDOW_S:
            return
        try:
            cpu = sum(psutil.Process(pid).cpu_times()[:2])  # user and system
        except psutil.Error:
            return  # it has ended: its "gone" is on the way
        share = (cpu - cpu_then) / (now - since)
        if share >= LOADER_MIN_SHARE:
            self.loader_mark = (now, cpu, held)
            return
        self.loader_mark = (now, cpu, False) if held else None  # the next step is the last
        version = self.candidate.spec["version"]
        log.warning("version %s got %.2f of a core in the last %.0f s of loading: it loads on %s "
                    "(requests served meanwhile may slow)", version, share, now - since,
                    "unheld during forward passes" if held else "at normal priority")
        if held:
            self.serving.tell("loader", pid=0)  # the serving process holds it no more
        try:
            os.kill(pid, signal.SIGCONT)
            if not held:
                restore_priority(os.getpriority(os.PRIO_PROCESS, 0), pid)
        except ProcessLookupError:
            pass  # it has ended: its "gone" is on the way
        except PermissionError as exc:  # (it could return itself, which is all the kernel asks)
            log.warning("cannot return version %s to normal priority: %s", version, exc)

    def candidate_says(self, message):
        """A message from the candidate: warm (take over), refused, or gone."""
        candidate = self.candidate
        if message["state"] == "warm":
            candidate.note_warm(message)
            wanted, _ = self.read_wanted()
            if wanted and spec_text(wanted) != spec_text(candidate.spec):
                self.drop_candidate()  # superseded while it loaded: follow_wanted starts the next
                return
            self.hand_over(candidate)
        elif message["state"] in ("refused", "gone"):
            self.refuse(candidate, message.get("reason") or candidate.exit_reason())
            self.drop_candidate()

    def drop_candidate(self):
        self.candidate.stop()
        self.candidate = None
        self.serving.tell("loader", pid=0)

    def hand_over(self, new):
        """The serving child stops claiming and finishes the batches it holds; then `new` takes
        over the queue, and once its heartbeat is out the old one deregisters and exits. The
        two never compute at once, and some heartbeat says warm throughout."""
        old = self.serving
        old.tell("hand-over")
        self.wait_for(old, ("drained", "gone"), settings.REQUEST_TIMEOUT_S + 10)
        new.serve()
        self.wait_for(new, ("serving", "gone"), 30)
        old.tell("leave")
        self.serving, self.candidate = new, None
        log.info("worker %s now serves version %s (rollout %d)", self.id, new.spec["version"],
                 new.rollout)

    def wait_for(self, child, states, timeout_s):
        """Wait until `child` says one of `states` (other messages are dropped: while handing
        over nothing else happens); on a timeout, kill it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not child.gone:  # its "gone" may be dropped already
            try:
                sender, message = self.events.get(timeout=1)
            except queue.Empty:
                continue
            if sender is child and message["state"] in states:
                return
        if not child.gone:
            log.warning("version %s did not answer in time; killed", child.spec["version"])
            child.process.kill()

    def start(self, spec, rollout, low_priority, batch_size, input_shape=None):
        self.started += 1
        order = {"spec": spec, "rollout": rollout, "low_priority": low_priority,
                 "batch_size": batch_size, "input_shape": input_shape,
                 "niceness": os.getpriority(os.PRIO_PROCESS, 0),
                 "identity": {"id": f"{self.id}/{self.started}", "supervisor": self.id,
                              "pid": os.getpid(), "spec": spec_text(spec), "rollout": rollout}}
        return ModelProcess(spec, rollout, order, self.events)

    def refuse(self, child, reason):
        log.error("worker %s refuses version %s: %s", self.id, child.spec["version"], reason)
        if child.rollout:
            self.refused.add(child.rollout)
            self.record(records.refuse_model, child.rollout, self.id, reason)

    def read_wanted(self):
        try:
            return records.wanted_model(self.store, self.keys)
        except REDIS_ERRORS:
            return None, 0  # the serving child waits for Redis in its own loop

    def record(self, function, *args):
        try:
            function(self.store, self.keys, *args)
        except REDIS_ERRORS as exc:
            log.warning("cannot record %s in Redis: %s", function.__name__, exc)

    def stop_children(self):
        children = [child for child in (self.candidate, self.serving) if child]
        for child in children:
            child.stop()
        for child in children:
            try:
                child.process.wait(settings.REQUEST_TIMEOUT_S + 10)
            except subprocess.TimeoutExpired:
                child.process.kill()


def run_supervisor():
    """The `model` command: serve the wanted model from child processes until SIGTERM/SIGINT."""
    check_login(patience_s=None)
    supervisor = Supervisor(connect_redis(patience_s=None))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: supervisor.stopping.set())
    return supervisor.run()
