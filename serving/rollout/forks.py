"""Model processes forked from one that imported their frameworks once, before anything served.

A version's process started afresh would first import TensorFlow, Keras and OpenVINO: seconds of
CPU, and for a new version they are taken beside the serving version's forward passes. So the
supervisor starts a fork server (`run_keras_server.py model-forks`) that imports them once, and
forks each version's process from it, left only to load its model. The server only imports: no
runtime's thread pool exists in it to be copied half-way through a fork (the only threads an
import starts are OpenBLAS', which stop across a fork and start again when needed).

The server forks twice and the first child exits at once, so each version's process is
re-parented to the supervisor, its subreaper: the supervisor reaps it and reads its exit status
like any child of its own, and nothing else waits on it.
"""
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback

import settings
from serving import RUN_KERAS_SERVER
from serving.rollout.loader_watch import LOADER_WINDOW_S
from serving.rollout.priority import (can_leave_idle, idle_every_thread, let_go_on,
                                       restore_priority)
from serving.rollout.spec import MALLOC_ARENAS

log = logging.getLogger("keras_server.rollout")
LIBC = ctypes.CDLL(None, use_errno=True)

PR_SET_NAME, PR_SET_CHILD_SUBREAPER = 15, 36  # <linux/prctl.h>


class ForkServer:
    """The supervisor's end of its fork server: started on first use, again if it has ended."""

    def __init__(self, stopping):
        self.stopping = stopping
        self.server = self.control = None
        if LIBC.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "cannot become the model processes' subreaper")

    def fork(self, their_end, low_priority):
        """The pid of a new model process on the socket `their_end` (a child of this process),
        at the lowest CPU priority if asked (where it can return from it); None once `stopping`
        is set. A server that has ended is started again; one that ends or fails meanwhile is
        an OSError (the socket may have been used: it is not sent again)."""
        if self.server is None or self.server.poll() is not None:
            if self.stopping.is_set():
                return None
            self.start(import_idle=low_priority)
        try:
            socket.send_fds(self.control, [b"i" if low_priority else b"n"], [their_end.fileno()])
            reply = self.read_reply()
        except OSError:
            reply = b""
        if reply is None:
            return None
        if not reply or int(reply) <= 0:
            raise OSError("the model processes' fork server ended or could not fork; see its log")
        return int(reply)

    def read_reply(self):
        """The server's reply (b"" if it ended), or None once `stopping` is set."""
        reply, asked = b"", time.monotonic()
        while not reply.endswith(b"\n"):
            try:
                more = self.control.recv(32)
            except TimeoutError:  # importing, still
                if self.stopping.is_set():
                    return None
                if time.monotonic() - asked > LOADER_WINDOW_S:
                    log.warning("the model processes' fork server has not answered in %.0f s: it "
                                "goes on at normal priority (requests served meanwhile may slow)",
                                LOADER_WINDOW_S)
                    try:
                        let_go_on(self.server.pid, normal_priority=True)
                    except (ProcessLookupError, PermissionError) as exc:  # ended; not allowed
                        log.warning("cannot return the fork server to normal priority: %s", exc)
                    asked = time.monotonic()  # (it may have returned to the lowest meanwhile)
                continue
            if not more:
                return b""
            reply += more
        return reply.strip()

    def start(self, import_idle):
        """Start a server; one started for a new version (beside a serving one) imports at the
        lowest CPU priority, as that version would load."""
        if self.server is not None:
            log.warning("the model processes' fork server ended (status %s); starting another",
                        self.server.returncode)
            self.control.close()
        ours, theirs = socket.socketpair()
        self.server = subprocess.Popen(
            [sys.executable, RUN_KERAS_SERVER, "model-forks", str(theirs.fileno()),
             *(["--import-idle"] if import_idle else [])],
            pass_fds=[theirs.fileno()], env={"MALLOC_ARENA_MAX": MALLOC_ARENAS, **os.environ})
        theirs.close()
        ours.settimeout(1)
        self.control = ours

    def stop(self):
        """End the server, even in the middle of its imports (its forks live on: each is stopped
        on its own)."""
        if self.server is not None:
            self.control.close()
            self.server.terminate()
            try:
                self.server.wait(10)
            except subprocess.TimeoutExpired:
                self.server.kill()


class ForkedProcess:
    """A model process forked by the server and re-parented here: what the supervisor uses of a
    subprocess.Popen, reaped by one thread (`reap`)."""

    def __init__(self, pid):
        self.pid, self.returncode, self.ended = pid, None, threading.Event()

    @classmethod
    def never_started(cls):
        """In place of a process that could not be forked: one that has ended (status 1)."""
        process = cls(0)
        process.returncode = 1
        process.ended.set()
        return process

    def reap(self):
        """Wait until it has exited (one thread only)."""
        try:
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        except ChildProcessError:  # reaped already: SIGCHLD is ignored in this process
            pass
        finally:
            self.ended.set()

    def poll(self):
        return self.returncode

    def wait(self, timeout_s=None):
        if not self.ended.wait(timeout_s):
            raise subprocess.TimeoutExpired(f"model process {self.pid}", timeout_s)
        return self.returncode

    def send_signal(self, signum):
        if not self.ended.is_set():  # once reaped, its pid may be another process'
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:  # reaped meanwhile
                pass

    def terminate(self):
        self.send_signal(signal.SIGTERM)

    def kill(self):
        self.send_signal(signal.SIGKILL)


def run_fork_server(fd, import_idle=False):
    """The `model-forks` command (started by the supervisor): import what a model process runs
    (at the lowest CPU priority if `import_idle`), then fork one for each socket the supervisor
    sends, answering with its pid.

    It forks at the lowest CPU priority, as a new version loads (a fork copies the page tables of
    all it imported), where the model process it forks can return to normal priority."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the supervisor, which ends this
    niceness = os.getpriority(os.PRIO_PROCESS, 0)
    idle = can_leave_idle(niceness)
    if idle and import_idle:
        idle_every_thread()
    import_frameworks()
    if idle:
        idle_every_thread()  # (the threads its imports started, too)
    control = socket.socket(fileno=fd)
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 1, 1)
        except ConnectionResetError:
            message, fds = b"", []
        if not message:  # the supervisor has ended
            return 0
        if fds:
            normal = niceness if idle and message == b"n" else None
            pid = fork_model_process(fds[0], control, normal)
            os.close(fds[0])
            if idle:  # again, if the supervisor returned it to normal meanwhile (read_reply)
                idle_every_thread()
        else:  # not received: no descriptor left in this process
            log.error("cannot fork a model process: its socket could not be received")
            pid = 0
        try:
            control.sendall(b"%d\n" % pid)
        except OSError:  # the supervisor has ended (the process forked for it ends too)
            return 0


def fork_model_process(fd, control, normal_niceness=None):
    """Fork a model process on the socket `fd` as a grandchild (returned to normal priority at
    `normal_niceness` if given), and return its pid once its parent has exited (so that it is
    the subreaper's child); 0 if it could not."""
    sys.stdout.flush()  # or each fork would write what is buffered again
    sys.stderr.flush()
    ends = ()
    try:
        ends = reader, writer = os.pipe()
        middle = os.fork()
    except OSError as exc:  # no memory, no more processes or files allowed
        log.error("cannot fork a model process: %s", exc)
        for end in ends:
            os.close(end)
        return 0
    if middle == 0:
        try:
            if normal_niceness is not None:
                restore_priority(normal_niceness)
            pid = os.fork()
            if pid == 0:
                os.close(reader)
                os.close(writer)
                control.close()
                run_forked_model_process(fd)
            os.write(writer, b"%d" % pid)
        except BaseException:  # noqa: BLE001 (reported here: nothing above it may run in a fork)
            traceback.print_exc()
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        pid = int(pipe.read() or 0)
    os.waitpid(middle, 0)
    return pid


def run_forked_model_process(fd):
    """Run a model process in a fork and end the fork with its status (never returns)."""
    from serving.rollout.model_process import run_model_process

    LIBC.prctl(PR_SET_NAME, b"model-process", 0, 0, 0)  # its name in top and ps -o comm
    status = 1
    try:
        status = run_model_process(fd)
    except BaseException:  # noqa: BLE001 (reported here: nothing above it may run in a fork)
        traceback.print_exc()
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def import_frameworks():
    """Import what a model process needs to load a model, and no more: nothing here may start a
    runtime (a device query, a session, a thread pool) or create a metric (serving.metrics: its
    samples would be this process', shown as a worker's for its whole life)."""
    import keras  # noqa: F401 (with its backend: TensorFlow, or JAX where set)

    import serving.model.batch_size  # noqa: F401
    import serving.model.loader  # noqa: F401
    import serving.model.openvino_runtime
    import serving.rollout.model_process  # noqa: F401
    if settings.RUNTIME != "keras":
        serving.model.openvino_runtime.decline_telemetry()
        try:
            import openvino  # noqa: F401
        except ImportError:
            pass
