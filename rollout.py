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
workers started later load is always one that was accepted.
"""
import json
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

import jobqueue
import settings
from helpers import Keys, header_value_problem
from jobqueue import REDIS_ERRORS, connect_redis

log = logging.getLogger("keras_server.rollout")

RUN_KERAS_SERVER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "run_keras_server.py")

# A new version loads at the lowest priority, held during forward passes, as long as it gets on. One
# that used less than LOADER_MIN_SHARE of a core over LOADER_WINDOW_S (a busy worker leaves it next
# to nothing) is held no more; if it still gets too little, it returns to normal priority. Slower
# answers for a while, rather than a reload that takes longer than any reload waits.
LOADER_WINDOW_S = 30.0
LOADER_MIN_SHARE = 0.1

# glibc gives each thread that allocates an arena of its own, and an arena keeps much of what it
# frees: a model process's decoding threads, each taking a large image in turn, would together keep
# several times the decoding budget. Two arenas keep it near the budget (unless set otherwise).
MALLOC_ARENAS = "2"


def spec_from_settings():
    """The model the settings name (served until a `reload` records another)."""
    return {"model": settings.MODEL, "weights": settings.MODEL_WEIGHTS, "labels": settings.LABELS,
            "preprocess": settings.PREPROCESS, "version": settings.MODEL_VERSION,
            "precision": settings.PRECISION, "calibration_images": settings.CALIBRATION_IMAGES}


def spec_text(spec):
    """A spec as heartbeats carry it: JSON with sorted keys, so equal specs compare equal."""
    return json.dumps({name: str(value) for name, value in spec.items()}, sort_keys=True)


def files_named(spec):
    """The files (and folders) a model spec names: its model, weights, labels and calibration
    images, where they are paths rather than names (resnet50, imagenet, none, ...)."""
    from classifier import APPLICATIONS

    paths = [spec["model"]] if spec["model"] not in APPLICATIONS else []
    paths += [spec["weights"]] if spec["weights"] not in ("imagenet", "none") else []
    return paths + [spec[name] for name in ("labels", "calibration_images") if spec.get(name)]


def check_files(spec):
    """ModelLoadError unless every file the spec names is under MODELS_DIR or is one this
    process's own settings name: whoever can write to Redis must not make the workers load (and,
    with a legacy model's layers, run) whatever file they can reach."""
    from classifier import ModelLoadError

    root = os.path.realpath(settings.MODELS_DIR)
    own = {os.path.realpath(path) for path in files_named(spec_from_settings())}
    for path in files_named(spec):
        real = os.path.realpath(path)
        if real not in own and os.path.commonpath([real, root]) != root:
            raise ModelLoadError(f"{path} is not under MODELS_DIR ({root}): a version given by "
                                 "`reload` may only name files there")


def load_model(spec):
    """Load the classifier a model spec describes, once check_files passes it (raises
    classifier.ModelLoadError)."""
    from classifier import load_classifier

    check_files(spec)
    # (A spec recorded by a version before precisions takes the worker's own settings.)
    return load_classifier(spec["model"], spec["weights"], spec["labels"], spec["preprocess"],
                           settings.MODEL_SEED, settings.MODEL_THREADS, spec["version"],
                           settings.RUNTIME, settings.OPENVINO_CACHE_DIR,
                           settings.BATCHES_IN_FLIGHT, spec.get("precision") or settings.PRECISION,
                           spec.get("calibration_images", settings.CALIBRATION_IMAGES))


# --- The supervisor -------------------------------------------------------------------------

class Channel:
    """JSON messages, one per line, over one end of a socket pair."""

    def __init__(self, sock):
        self.sock = sock
        self.lines = sock.makefile("r", encoding="utf-8")

    def send(self, **message):
        self.sock.sendall((json.dumps(message) + "\n").encode())

    def receive(self):
        """The next message; None once the other end has closed."""
        line = self.lines.readline()
        return json.loads(line) if line else None


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
            choices += [(spec, 0) for spec in jobqueue.accepted_models(self.store, self.keys)[-1:]]
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
                    self.record(jobqueue.accept_first_model, spec)
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
            self.record(jobqueue.refuse_model, child.rollout, self.id, reason)

    def read_wanted(self):
        try:
            return jobqueue.wanted_model(self.store, self.keys)
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
    jobqueue.check_login(patience_s=None)
    supervisor = Supervisor(connect_redis(patience_s=None))
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: supervisor.stopping.set())
    return supervisor.run()


# --- A model process ------------------------------------------------------------------------

def run_model_process(fd):
    """The `model-process` command (started by the supervisor): load, check and warm up the
    model it is told, say so, serve it once told to, and hand over to a successor when told."""
    from classifier import device_name, warm_up
    from worker import ModelWorker

    signal.signal(signal.SIGINT, signal.SIG_DFL)  # until it serves, Ctrl-C just ends it
    channel = Channel(socket.socket(fileno=fd))
    order = channel.receive()
    low_priority = order["low_priority"] and lower_priority(order["niceness"])
    try:
        classifier = load_model(order["spec"])
        if order["input_shape"] and list(classifier.input_shape) != order["input_shape"]:
            raise ValueError(f"its input {list(classifier.input_shape)} differs from the served "
                             f"{order['input_shape']}: queued jobs are resized for that")
        batch_size = warm_up(classifier, order["batch_size"], settings.REQUEST_TIMEOUT_S / 10)
    except Exception as exc:  # any failure to load is a refusal, reported with its reason
        log.error("cannot serve version %s: %s", order["spec"]["version"], exc)
        channel.send(state="refused", reason=f"{type(exc).__name__}: {exc}")
        return 2
    if low_priority:
        restore_priority(order["niceness"])
    channel.send(state="warm", batch_size=batch_size, input_shape=list(classifier.input_shape))
    if (channel.receive() or {}).get("state") != "serve":
        return 0  # the supervisor is gone, or took another version
    device = device_name()
    worker = ModelWorker(connect_redis(), classifier, batch_size,
                         {**order["identity"], "model_pid": os.getpid(), "device": device})
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: worker.stop())
    worker.start_beating()
    channel.send(state="serving")  # its heartbeat is out: the one it replaces may leave
    may_leave = threading.Event()
    threading.Thread(target=follow_supervisor, args=(channel, worker, may_leave, device == "CPU"),
                     daemon=True).start()
    worker.run()
    if worker.handing_over:  # stay registered (and the service ready) until the successor beats
        channel.send(state="drained")
        may_leave.wait(settings.REQUEST_TIMEOUT_S)
    worker.leave()
    # Nothing is left to clean up, and tearing down the runtimes would take the CPU from the
    # successor for a second or more.
    logging.shutdown()
    os._exit(0)


def follow_supervisor(channel, worker, may_leave, hold_loaders):
    """Messages from the supervisor while serving: a new version loads (hold it during forward
    passes on a CPU; a GPU's passes leave the cores to it), hand over (stop claiming, finish the
    batches in hand), then leave. A supervisor that was killed leaves its children: they die too,
    as abruptly (their claims are re-queued by the other workers), rather than serve unwatched."""
    while (message := channel.receive()) is not None:
        if message["state"] == "loader":  # a new version loads beside this one
            worker.loader_pause.follow(message["pid"] if hold_loaders else None)
        elif message["state"] == "hand-over":
            worker.stop(successor=True)
        elif message["state"] == "leave":
            may_leave.set()
    worker.loader_pause.follow(None)  # a held loader must not stay stopped for good
    if not worker.stopping.is_set():
        os.kill(os.getpid(), signal.SIGKILL)
    may_leave.set()


def lower_priority(niceness):
    """Put this process (its threads, and those to come, which inherit it) at the lowest CPU
    priority, SCHED_IDLE, if it can return to `niceness` afterwards; True if it did.

    Under SCHED_IDLE a thread yields its CPU the moment a serving thread wakes up, where at nice
    19 it keeps it for a time slice, on every one of a forward pass's many thread wake-ups.
    Returning needs CAP_SYS_NICE or an RLIMIT_NICE of at least 20 - niceness: a probe thread tries
    both steps first, so that a process never stays at the lowest priority for good.
    """
    if not can_leave_idle(niceness):
        log.warning("this version loads at normal CPU priority and may slow the requests being "
                    "served meanwhile: returning from the lowest priority needs CAP_SYS_NICE or an "
                    "RLIMIT_NICE of %d (ulimit -e; compose: ulimits nice)", 20 - niceness)
        return False
    idle_every_thread()
    return True


def can_leave_idle(niceness):
    """Whether a process can go to SCHED_IDLE and return to `niceness`: a probe thread tries."""
    returned = []

    def probe():
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            os.setpriority(os.PRIO_PROCESS, 0, niceness)
            returned.append(True)
        except PermissionError:
            pass
    thread = threading.Thread(target=probe)
    thread.start()
    thread.join()
    return bool(returned)


def idle_every_thread():
    """SCHED_IDLE for every thread of this process (e.g. a BLAS pool started at import) and,
    by inheritance, for those it starts later."""
    for_every_thread(lambda thread_id: os.sched_setscheduler(thread_id, os.SCHED_IDLE,
                                                             os.sched_param(0)))


def restore_priority(niceness, pid="self"):
    """Return every thread of a process (this one by default), the runtime's thread pools too, to
    normal CPU scheduling at the supervisor's niceness."""
    def restore(thread_id):
        os.sched_setscheduler(thread_id, os.SCHED_OTHER, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, thread_id, niceness)
    for_every_thread(restore, pid)


def for_every_thread(change, pid="self"):
    try:
        thread_ids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return  # the process has ended
    for thread_id in thread_ids:
        try:
            change(int(thread_id))
        except ProcessLookupError:
            pass  # a thread that has ended meanwhile


# --- reload ---------------------------------------------------------------------------------

class RolloutFailed(Exception):
    """A rollout that was refused, timed out or superseded; the message says which and why."""

    status = 1


class SpecRefused(RolloutFailed):
    """A model spec refused by `reload` itself, before any worker saw it."""

    status = 2


def run_reload(args):
    """The `reload` command: check the spec here (check_model), then switch every worker to it
    (or, with --rollback, to the accepted version before the current one); 0 once all serve it."""
    # SIGTERM as an exception, as Ctrl-C is: a proposal made by now is taken back (roll_out).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    # Ctrl-C too where a shell started this in the background: it hands SIGINT ignored, and
    # Python would keep it so (as run_keras_server.py's run_all does).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    store, keys = connect_redis(), Keys(settings.IMAGE_QUEUE)
    try:
        if args.rollback:
            spec = previous_model(store, keys)
        elif header_value_problem(args.version):
            raise SpecRefused(f"--version {args.version!r} {header_value_problem(args.version)}: "
                              "every answer carries it in a header")
        else:
            spec = {"model": args.model, "weights": args.weights, "labels": args.labels,
                    "preprocess": args.preprocess, "version": args.version,
                    "precision": args.precision, "calibration_images": args.calibration_images}
        check_model(spec)
        roll_out(store, keys, spec, args.timeout_s, rollback=args.rollback)
    except RolloutFailed as exc:
        log.error("reload failed: %s", exc)
        return exc.status
    log.info("every worker on %s serves version %s", settings.IMAGE_QUEUE, spec["version"])
    return 0


def previous_model(store, keys):
    history = jobqueue.accepted_models(store, keys)
    if len(history) < 2:
        raise SpecRefused("no earlier accepted version to roll back to")
    return history[-2]


def check_model(spec):
    """Refuse a spec here, before any worker sees it, by what can be told without loading it: its
    files are under MODELS_DIR, exist and can be read, and its labels read. Whether the model
    loads, its outputs match the labels and its input the queue's is checked where it is loaded
    anyway, by the workers' held candidate processes, whose refusal comes back with the reason.
    So `reload` never loads a model, nor imports a deep learning framework, on a serving
    machine."""
    from classifier import APPLICATIONS, ModelLoadError, load_labels

    try:
        check_files(spec)
        if spec["model"] not in APPLICATIONS and not os.path.isfile(spec["model"]):
            raise ModelLoadError(f"--model {spec['model']!r} is neither one of "
                                 f"{', '.join(APPLICATIONS)} nor an existing .keras/.h5 file")
        for path in files_named(spec):
            if not os.access(path, os.R_OK):
                raise ModelLoadError(f"{path} cannot be read")
        if spec.get("calibration_images") and not os.path.isdir(spec["calibration_images"]):
            raise ModelLoadError(f"--calibration-images {spec['calibration_images']} is not a "
                                 "folder")
        load_labels(spec["labels"])
    except ModelLoadError as exc:
        raise SpecRefused(f"version {spec['version']} cannot serve: {exc}") from exc


def roll_out(store, keys, spec, timeout_s, rollback=False):
    """Propose `spec`, wait until every live worker serves it, and accept it; on a refusal or a
    timeout take it back and raise RolloutFailed."""
    # With no accepted version (Redis lost its history), a failure returns to the one every live
    # worker serves; without it, the workers that had switched would stay switched.
    served = {beat.get("spec") for beat in jobqueue.live_workers(store, keys)}
    if len(served) == 1 and None not in served:
        jobqueue.accept_first_model(store, keys, json.loads(served.pop()))
    # Ctrl-C or SIGTERM waits until the proposal is made and can be taken back: arriving while
    # Redis answered the proposal, it would leave it proposed.
    interrupts = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, interrupts)
    try:
        rollout = jobqueue.propose_model(store, keys, spec)
    except BaseException:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, interrupts)
        raise
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, interrupts)
        log.info("rollout %d: asked every worker on %s to serve version %s", rollout,
                 settings.IMAGE_QUEUE, spec["version"])
        failure = wait_for_rollout(store, keys, rollout, spec, time.monotonic() + timeout_s)
    except BaseException:  # Ctrl-C, SIGTERM, Redis gone: no proposal is left open
        try:
            take_back(store, keys, rollout)
        except REDIS_ERRORS as exc:
            log.error("rollout %d stays proposed: %s", rollout, exc)
        raise
    if failure is None:
        if rollback:
            jobqueue.forget_newest_model(store, keys)
        else:
            jobqueue.accept_model(store, keys, spec)
        return
    if "superseded" not in failure:
        take_back(store, keys, rollout, time.monotonic() + timeout_s)
    raise RolloutFailed(f"version {spec['version']}: {failure}")


def take_back(store, keys, rollout, deadline=None):
    """Return the workers to the last accepted version after a failed rollout; wait for them
    until `deadline` (None: an interrupted reload does not wait)."""
    history = jobqueue.accepted_models(store, keys)
    previous = history[-1] if history else None
    restored = jobqueue.restore_model(store, keys, rollout, previous)
    if restored:
        log.info("rollout %d: workers return to version %s", restored, previous["version"])
        if deadline is None:
            return
        failure = wait_for_rollout(store, keys, restored, previous, deadline)
        if failure:
            log.error("returning to version %s: %s", previous["version"], failure)


def wait_for_rollout(store, keys, rollout, spec, deadline):
    """None once every live worker serves `spec`; else why not (refused, timed out,
    superseded)."""
    target = spec_text(spec)
    while True:
        if jobqueue.wanted_model(store, keys)[1] != rollout:
            return "superseded by a later reload"
        refused = jobqueue.refusals(store, keys, rollout)
        if refused:
            return "refused by " + "; ".join(f"worker {worker}: {reason}"
                                             for worker, reason in sorted(refused.items()))
        pending = workers_not_serving(jobqueue.live_workers(store, keys), target)
        if not pending:
            return None
        if time.monotonic() > deadline:
            return f"timed out; not yet served by {', '.join(pending)}"
        time.sleep(0.2)


def workers_not_serving(beats, target):
    """The supervisors whose every live process does not yet serve the spec `target`."""
    pending = set()
    for beat in beats:
        if beat.get("spec") != target or beat.get("warm") != "1":
            pending.add(beat.get("supervisor", beat.get("id")))
    return sorted(pending)
