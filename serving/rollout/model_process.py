"""One model version in a process of its own, on orders from its supervisor."""
import gc
import json
import logging
import os
import signal
import socket
import threading

import settings
from serving.rollout.priority import for_every_thread, lower_priority, restore_priority
from serving.rollout.spec import load_model
from serving.wire.connection import connect_redis

log = logging.getLogger("keras_server.rollout")


class Channel:
    """JSON messages, one per line, over one end of a socket pair."""

    def __init__(self, sock):
        self.sock = sock
        self.lines = sock.makefile("r", encoding="utf-8")
        self.closed = threading.Event()  # the other end has closed (read to its end)

    def send(self, **message):
        self.sock.sendall((json.dumps(message) + "\n").encode())

    def receive(self):
        """The next message; None once the other end has closed."""
        line = self.lines.readline()
        if not line:
            self.closed.set()
        return json.loads(line) if line else None


# A process that has handed over exits this long after its successor's first heartbeat: its exit
# (returning gigabytes to the kernel) would otherwise run beside the successor's first passes,
# already slower than its later ones, and slow them further.
EXIT_AFTER_HAND_OVER_S = 3.0


def run_model_process(fd):
    """A model version's process (forked by the supervisor's fork server, see forks): load, check
    and warm up the model it is told, say so, serve it once told to, and hand over to a successor
    when told."""
    from serving.model.batch_size import warm_up
    from serving.model.classifier import device_name
    from serving.model.worker import ModelWorker

    signal.signal(signal.SIGINT, signal.SIG_DFL)  # until it serves, Ctrl-C just ends it
    channel = Channel(socket.socket(fileno=fd))
    order = channel.receive()
    if order is None:  # the supervisor is gone
        return 0
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
    keep_out_of_collection()
    if low_priority:
        restore_priority(order["niceness"])
    device = device_name()
    worker = ModelWorker(connect_redis(), classifier, batch_size,
                         {**order["identity"], "model_pid": os.getpid(), "device": device})
    channel.send(state="warm", batch_size=batch_size, input_shape=list(classifier.input_shape))
    if (channel.receive() or {}).get("state") != "serve":
        return 0  # the supervisor is gone, or took another version
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: worker.stop())
    worker.start_beating()
    channel.send(state="serving")  # its heartbeat is out: the one it replaces may leave
    may_leave = threading.Event()
    threading.Thread(target=follow_supervisor, args=(channel, worker, may_leave, device == "CPU"),
                     daemon=True).start()
    worker.run()
    if worker.handing_over:  # stay registered (and the service ready) until the successor beats
        may_leave.wait(settings.REQUEST_TIMEOUT_S)
    worker.leave()
    if worker.handing_over:  # (unless the supervisor has gone: then at once)
        channel.closed.wait(EXIT_AFTER_HAND_OVER_S)
    # Nothing is left to clean up, and tearing down the runtimes would take the CPU from the
    # successor for a second or more; what exiting costs (returning the memory) runs at the
    # lowest niceness, still sure to end while the successor keeps every core busy.
    logging.shutdown()
    for_every_thread(lambda thread_id: os.setpriority(os.PRIO_PROCESS, thread_id, 19))
    os._exit(0)


def keep_out_of_collection():
    """Collect what loading left behind, then keep every object alive now (the model's, by the
    hundred thousand with Keras) out of the garbage collector's sight for the process's life.
    Otherwise each full collection scans them all while a forward pass waits."""
    gc.collect()
    gc.freeze()


def follow_supervisor(channel, worker, may_leave, hold_loaders):
    """Messages from the supervisor while serving: a new version loads (hold it during forward
    passes on a CPU; a GPU's passes leave the cores to it), hand over (stop claiming, finish the
    batches in hand, and say so: the successor claims from then on), then leave. A supervisor
    that was killed leaves its children: they die too, as abruptly (their claims are re-queued
    by the other workers), rather than serve unwatched."""
    while (message := channel.receive()) is not None:
        if message["state"] == "loader":  # a new version loads beside this one
            worker.loader_pause.follow(message["pid"] if hold_loaders else None)
        elif message["state"] == "hand-over":  # the successor claims once this one stopped
            worker.stop(successor=True)
            channel.send(state="stopped claiming")
        elif message["state"] == "leave":
            may_leave.set()
    worker.loader_pause.follow(None)  # a held loader must not stay stopped for good
    if not worker.stopping.is_set():
        os.kill(os.getpid(), signal.SIGKILL)
    may_leave.set()
