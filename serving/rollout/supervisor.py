"""Model versions and rollouts: every version serves from a process of its own, and `reload`
switches all workers to a new version (or back) only once each has it loaded, warm and checked.

`run_keras_server.py model` runs a Supervisor, the container's main process. It serves the wanted
model from a child process, forked with TensorFlow and the other frameworks already imported
(see forks). When `reload` proposes another model, the supervisor loads it in a second child at
the lowest CPU priority (SCHED_IDLE); once that one is warm and back at normal priority, the old
child stops claiming, the new one takes over the queue while the old one finishes the batches it
holds, and the old one exits. Old and new never share a heap, and loading competes with serving
on equal terms for the CPU only when it would otherwise starve (LOADER_WINDOW_S).

`run_keras_server.py reload` checks the spec's files where it runs (it loads no model), proposes
it under a new rollout number, and waits until every live worker serves it or one refuses (the
candidate does not load, or does not fit the labels or the queue's input). A refusal or a timeout
takes the proposal back (the workers return to the last accepted version), so the model that
workers started later load is always one that was accepted."""
import logging
import os
import signal
import socket
import threading
import uuid

import settings
from serving import metrics
from serving.rollout.children import Children
from serving.rollout.loader_watch import LoaderWatch
from serving.rollout.spec import spec_from_settings, spec_text
from serving.wire import records
from serving.wire.connection import REDIS_ERRORS, check_login, connect_redis
from serving.wire.keys import Keys

log = logging.getLogger("keras_server.rollout")


class Supervisor:
    """Keeps the wanted model version serving, each version in a child process of its own."""

    def __init__(self, store):
        self.store, self.keys = store, Keys(settings.IMAGE_QUEUE)
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.stopping = threading.Event()
        self.children = Children(self.id, self.stopping)
        self.serving = self.candidate = self.watch = None  # watch: the candidate's CPU share
        self.refused = set()  # rollout numbers this worker refused: not tried again

    def run(self):
        """Serve until SIGTERM, following reloads; the exit status (2: no model would load)."""
        try:
            if not self.start_serving():
                return 0 if self.stopping.is_set() else 2
            while not self.stopping.is_set():
                self.follow_wanted()
                if self.candidate:  # unheld, or at normal priority, if it gets too little CPU
                    self.watch.spur(self.serving, self.candidate.spec["version"])
                child, message = self.children.next_message(settings.HEARTBEAT_INTERVAL_S)
                if child is not None and child is self.candidate:
                    self.candidate_says(message)
                if self.serving.gone:  # (its "gone" may have come while handing over)
                    log.error("worker %s: %s", self.id, self.serving.exit_reason())
                    return 1
            return 0
        finally:
            self.children.stop([child for child in (self.candidate, self.serving) if child])

    def start_serving(self):
        """Start the first child: the wanted model, else the last accepted one, else the
        settings'. False if none loads."""
        for spec, rollout in first_choices(self.store, self.keys, *self.read_wanted()):
            child = self.children.start(spec, rollout, low_priority=False,
                                        batch_size=settings.BATCH_SIZE)
            state, reason = self.children.wait_until_warm(child, self.stopping)
            if state == "stopped":  # not a refusal: run stops it (if any) with the others
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
        self.candidate = self.children.start(wanted, rollout, low_priority=True,
                                             batch_size=self.serving.batch_size,
                                             input_shape=self.serving.input_shape)
        if self.candidate is None:  # stopping
            return
        self.serving.tell("loader", pid=self.candidate.process.pid)
        self.watch = LoaderWatch(self.candidate.process.pid)

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
        over the queue, and once the new one's heartbeat is out the old one deregisters (and
        exits a little later, see model_process). The two never run passes at once, and some
        heartbeat says warm throughout."""
        old = self.serving
        old.tell("hand-over")
        self.children.wait_for(old, ("stopped claiming", "gone"), settings.REQUEST_TIMEOUT_S + 10)
        new.serve()
        self.children.wait_for(new, ("serving", "gone"), 30)
        old.tell("leave")
        self.serving, self.candidate = new, None
        log.info("worker %s now serves version %s (rollout %d)", self.id, new.spec["version"],
                 new.rollout)

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


def first_choices(store, keys, wanted, rollout):
    """[(spec, rollout)] to start with, each spec once: the wanted, the last accepted, the
    settings'."""
    choices = [(wanted, rollout)] if wanted else []
    try:
        choices += [(spec, 0) for spec in records.accepted_models(store, keys)[-1:]]
    except REDIS_ERRORS:
        pass
    choices.append((spec_from_settings(), 0))
    unique = {}
    for spec, number in choices:
        unique.setdefault(spec_text(spec), (spec, number))
    return list(unique.values())


def run_supervisor():
    """The `model` command: serve the wanted model from child processes until SIGTERM/SIGINT
    (their metrics and its readiness on WORKER_METRICS_PORT, if set)."""
    check_login(patience_s=None)
    supervisor = Supervisor(connect_redis(patience_s=None))
    if settings.WORKER_METRICS_PORT:  # ready: a model version serves, and no SIGTERM has come
        metrics.serve_model_metrics(settings.WORKER_METRICS_PORT, lambda: (
            supervisor.serving is not None and not supervisor.stopping.is_set()))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: supervisor.stopping.set())
    return supervisor.run()
