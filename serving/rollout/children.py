"""A supervisor's model processes: each started with its order, and what they say, on one queue."""
import contextlib
import logging
import os
import queue
import signal
import socket
import subprocess
import threading
import time

import settings
from serving import metrics
from serving.rollout.forks import ForkedProcess, ForkServer
from serving.rollout.model_process import Channel
from serving.rollout.spec import spec_text

log = logging.getLogger("keras_server.rollout")


def model_order(process_id, supervisor_id, spec, rollout, low_priority, batch_size,
                input_shape=None):
    """A model process's first message (see model_process.run_model_process): what to load, how,
    and the identity its heartbeats carry."""
    return {"spec": spec, "rollout": rollout, "low_priority": low_priority,
            "batch_size": batch_size, "input_shape": input_shape,
            "niceness": os.getpriority(os.PRIO_PROCESS, 0),
            "identity": {"id": process_id, "supervisor": supervisor_id, "pid": os.getpid(),
                         "spec": spec_text(spec), "rollout": rollout}}


class ModelProcess:
    """A child process that loads one model version and, when told, serves it."""

    def __init__(self, process, channel, spec, rollout):
        self.process, self.channel = process, channel  # channel None: no process started
        self.spec, self.rollout = spec, rollout
        self.batch_size = self.input_shape = None  # known once it is warm
        # Set before its "gone" is queued: a message dropped while handing over.
        self.gone = channel is None

    def relay(self, events):
        """Put each message from the child on the supervisor's queue; "gone" when it closes."""
        while (message := self.channel.receive()) is not None:
            events.put((self, message))
        self.process.reap()  # here, whether it is still serving or long replaced
        self.gone = True
        events.put((self, {"state": "gone"}))
        with contextlib.suppress(OSError):
            metrics.forget_model_process(self.process.pid)

    def note_warm(self, message):
        """Keep what a warm child reports: its successor loads at the same size and shape."""
        self.batch_size, self.input_shape = message["batch_size"], message["input_shape"]

    def serve(self):
        self.tell("serve")

    def tell(self, state, **details):
        try:
            if self.channel:
                self.channel.send(state=state, **details)
        except OSError:  # it has exited: its "gone" is on the way
            pass

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            self.process.send_signal(signal.SIGCONT)  # a held process must run to stop

    def exit_reason(self):
        try:
            return f"the model process exited with status {self.process.wait(5)}"
        except subprocess.TimeoutExpired:
            return "the model process closed its connection and has not exited"


class Children:
    """The model processes of one supervisor, and the queue where their messages arrive."""

    def __init__(self, supervisor_id, stopping):
        self.supervisor_id = supervisor_id
        self.events = queue.Queue()
        self.started = 0
        self.forks = ForkServer(stopping)

    def start(self, spec, rollout, low_priority, batch_size, input_shape=None):
        """A new model process loading `spec`; None if stopping was set meanwhile. One that
        cannot be started (the fork server failed: no memory, no more processes allowed) is a
        child whose first message refuses the version, so a reload fails and the serving
        version serves on."""
        ours, theirs = socket.socketpair()
        with theirs:
            try:
                pid = self.forks.fork(theirs, low_priority)
            except OSError as exc:
                ours.close()
                log.error("cannot start a process for version %s: %s", spec["version"], exc)
                child = ModelProcess(ForkedProcess.never_started(), None, spec, rollout)
                self.events.put((child, {"state": "refused",
                                         "reason": f"no model process could be started: {exc}"}))
                return child
        if pid is None:
            ours.close()
            return None
        self.started += 1
        child = ModelProcess(ForkedProcess(pid), Channel(ours), spec, rollout)
        child.channel.send(**model_order(f"{self.supervisor_id}/{self.started}",
                                         self.supervisor_id, spec, rollout, low_priority,
                                         batch_size, input_shape))
        threading.Thread(target=child.relay, args=(self.events,), daemon=True).start()
        return child

    def next_message(self, timeout_s):
        """(child, message), or (None, None) if none came within timeout_s."""
        try:
            return self.events.get(timeout=timeout_s)
        except queue.Empty:
            return None, None

    def wait_until_warm(self, child, stopping):
        """("warm", None) or ("refused", reason) from a child that is loading; ("stopped", ...)
        once `stopping` is set."""
        while not stopping.is_set():
            sender, message = self.next_message(1)
            if sender is not child:  # e.g. the "gone" of one refused before it
                continue
            if message["state"] == "warm":
                child.note_warm(message)
                return "warm", None
            if message["state"] in ("refused", "gone"):
                return "refused", message.get("reason") or child.exit_reason()
        return "stopped", "stopping"

    def wait_for(self, child, states, timeout_s):
        """Wait until `child` says one of `states` (other messages are dropped: while handing
        over nothing else happens); on a timeout, kill it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not child.gone:  # its "gone" may be dropped already
            sender, message = self.next_message(1)
            if sender is child and message["state"] in states:
                return
        if not child.gone:
            log.warning("version %s did not answer in time; killed", child.spec["version"])
            child.process.kill()

    def stop(self, children):
        """Stop each child, letting it finish its requests, and kill what does not stop; then
        the fork server."""
        for child in children:
            child.stop()
        for child in children:
            try:
                child.process.wait(settings.REQUEST_TIMEOUT_S + 10)
            except subprocess.TimeoutExpired:
                child.process.kill()
        self.forks.stop()
