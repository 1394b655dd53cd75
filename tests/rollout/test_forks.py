"""Model processes forked from a server that imported their frameworks once (rollout.forks)."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import (ROOT, children_of, digits_settings, is_running, post_image, process_name,
                      reload, reload_args, tiny_settings, wait_until, worker_stats)
from serving.rollout.children import model_order
from serving.rollout.model_process import EXIT_AFTER_HAND_OVER_S, Channel


def lowest_policy():
    """SCHED_IDLE, where this process can return from it; else a fork server stays at
    SCHED_OTHER (see serving.rollout.priority.lower_priority)."""
    from serving.rollout.priority import can_leave_idle

    return os.SCHED_IDLE if can_leave_idle(os.getpriority(os.PRIO_PROCESS, 0)) else os.SCHED_OTHER


def start_fork_server(env):
    """`run_keras_server.py model-forks` as a supervisor starts it: (process, our end of its
    socket)."""
    ours, theirs = socket.socketpair()
    server = subprocess.Popen([sys.executable, "run_keras_server.py", "model-forks",
                               str(theirs.fileno())], pass_fds=[theirs.fileno()], cwd=ROOT,
                              env=env)
    theirs.close()
    return server, ours


def test_the_fork_server_forks_model_processes_with_their_frameworks_already_imported():
    """Each model process it forks has TensorFlow, Keras and OpenVINO's libraries in its memory
    before it has read its order (the first thing a model process does): it never imports them,
    and so a new version loading beside a serving one takes none of the CPU they cost. A new
    version's process is at the lowest CPU priority from its start, the first one at normal."""
    lowest = lowest_policy()
    server, ours = start_fork_server({**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    replies = ours.makefile("r")
    try:
        for request, policy in ((b"n", os.SCHED_OTHER), (b"i", lowest)):
            mine, its = socket.socketpair()
            socket.send_fds(ours, [request], [its.fileno()])
            its.close()
            pid = int(replies.readline())  # once it has imported them, the first time
            libraries = Path(f"/proc/{pid}/maps").read_text()
            parent = psutil.Process(pid).ppid()
            scheduled = os.sched_getscheduler(pid)
            wait_until(lambda: process_name(pid) == "model-process", what="its name in top")
            mine.close()  # no order comes: it ends

            assert "libtensorflow_framework" in libraries and "libopenvino" in libraries
            assert parent != server.pid  # forked twice: it is the subreaper's (or init's)
            assert scheduled == policy
            wait_until(lambda: not is_running(pid), what="the model process to end")
    finally:
        replies.close()
        ours.close()  # the supervisor's end: the server ends
    assert server.wait(30) == 0


IMPORT_AND_COUNT = """
import os, threading
import settings
from serving.model.openvino_runtime import TELEMETRY_CONSENT
from serving.rollout.forks import import_frameworks
forks = []
os.register_at_fork(before=lambda: forks.append(1))
import_frameworks()
print(len(forks), threading.active_count(), open(TELEMETRY_CONSENT).read())
"""


def test_a_fork_server_imports_openvino_without_a_thread_or_a_fork_and_telemetry_off(
        tmp_path, monkeypatch):
    """OpenVINO sends usage telemetry unless its user declined it, from a process forked for each
    event by a thread left running: a fork server must hold no thread when it forks, and forks
    escape a held loader. Where the user has not chosen, the service declines it as OpenVINO's
    `opt_in_out --opt_out` does; a choice already made stays as it is."""
    from serving.model import openvino_runtime

    env = {**os.environ, "HOME": str(tmp_path), "RUNTIME": "auto", "TF_CPP_MIN_LOG_LEVEL": "2"}
    counted = subprocess.run([sys.executable, "-c", IMPORT_AND_COUNT], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)

    assert counted.stdout.split() == ["0", "1", "0"], counted.stderr[-2000:]
    chosen = tmp_path / "chosen"
    chosen.write_text("1")
    monkeypatch.setattr(openvino_runtime, "TELEMETRY_CONSENT", str(chosen))
    openvino_runtime.decline_telemetry()
    assert chosen.read_text() == "1"


def test_a_fork_server_started_beside_a_serving_version_imports_at_the_lowest_priority():
    """One started for a new version (the first server ended while a version serves) takes the
    lowest CPU priority before it imports TensorFlow, as a new version's process loads."""
    if lowest_policy() != os.SCHED_IDLE:
        pytest.skip("this process could not return from the lowest priority")
    ours, theirs = socket.socketpair()
    server = subprocess.Popen([sys.executable, "run_keras_server.py", "model-forks",
                               str(theirs.fileno()), "--import-idle"],
                              pass_fds=[theirs.fileno()], cwd=ROOT,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    theirs.close()

    def lowest_before_tensorflow():
        assert server.poll() is None, "the server exited"
        policy = os.sched_getscheduler(server.pid)  # read first: so it held before the import
        return policy == os.SCHED_IDLE and "libtensorflow" not in Path(
            f"/proc/{server.pid}/maps").read_text()

    try:
        wait_until(lowest_before_tensorflow, interval=0.005,
                   what="the lowest priority before the import")
    finally:
        ours.close()
        server.kill()
        server.wait()


def test_a_model_process_is_the_supervisors_child_and_a_fork_server_that_ended_is_replaced(
        service, digits, redis_client, keys):
    worker = service.worker(**digits_settings(digits["v1"], "1"))
    model_pid = int(worker_stats(redis_client, keys)[str(worker.pid)]["model_pid"])
    children = {child.pid: child.cmdline() for child in psutil.Process(worker.pid).children()}

    assert model_pid in children  # reaped by the supervisor, not by the server it forked from
    assert [command[2:3] for command in children.values()] == [["model-forks"]] * 2

    server = next(pid for pid in children if pid != model_pid)
    os.kill(server, signal.SIGKILL)
    status, log = reload(service, *reload_args(digits["v2"], "2"))

    assert status == 0, log
    assert worker_stats(redis_client, keys)[str(worker.pid)]["version"] == "2"
    assert "fork server ended (status -9); starting another" in worker.log_path.read_text()


@pytest.mark.parametrize("left, failure", [
    (1, "Too many open files"),  # the socket it is sent takes it: its pipe finds none
    (0, "its socket could not be received"),
])
def test_a_fork_that_fails_refuses_the_version_and_the_serving_one_serves_on(
        service, digits, redis_client, keys, left, failure):
    """When no process can be forked for a new version (the fork server out of memory, of
    processes or, here, of file descriptors), the reload is refused with the reason, and the
    worker and its fork server stay up, serving version 1; the next reload succeeds."""
    worker, web = service.worker(**digits_settings(digits["v1"], "1")), service.web()
    model_pid = int(worker_stats(redis_client, keys)[str(worker.pid)]["model_pid"])
    server = psutil.Process(next(pid for pid in children_of(worker.pid) if pid != model_pid))
    limits = server.rlimit(psutil.RLIMIT_NOFILE)
    taken = {int(fd) for fd in os.listdir(f"/proc/{server.pid}/fd")}
    lowest_free = min(set(range(len(taken) + 1)) - taken)
    server.rlimit(psutil.RLIMIT_NOFILE, (lowest_free + left, limits[1]))
    try:
        status, log = reload(service, *reload_args(digits["v2"], "2"))
    finally:
        if server.is_running():
            server.rlimit(psutil.RLIMIT_NOFILE, limits)

    assert status != 0
    assert "no model process could be started" in log, log
    assert failure in worker.log_path.read_text()
    assert worker.poll() is None and server.is_running()
    answer = post_image(web.url, digits["images"][0], "d.png")
    assert answer.json()["success"] and answer.headers["X-Model-Version"] == "1"
    assert is_running(model_pid)
    status, log = reload(service, *reload_args(digits["v2"], "3"))  # the same server forks it
    assert status == 0, log
    assert server.is_running() and server.pid in children_of(worker.pid)


def test_a_fork_server_left_no_cpu_goes_on_at_normal_priority(service, digits, redis_client,
                                                              keys):
    """A fork server that gets no CPU (here stopped: at the lowest priority, a busy worker can
    leave it next to none) is let go on at normal priority once it has not answered for
    LOADER_WINDOW_S, so the reload goes through; then it returns to the lowest."""
    from serving.rollout.loader_watch import LOADER_WINDOW_S

    lowest = lowest_policy()
    worker = service.worker(**digits_settings(digits["v1"], "1"))
    model_pid = int(worker_stats(redis_client, keys)[str(worker.pid)]["model_pid"])
    server = next(pid for pid in children_of(worker.pid) if pid != model_pid)
    os.kill(server, signal.SIGSTOP)
    started = time.monotonic()
    status, log = reload(service, *reload_args(digits["v2"], "2"), "--timeout-s",
                         str(LOADER_WINDOW_S + 240))

    assert status == 0, log
    assert time.monotonic() - started > LOADER_WINDOW_S
    assert "fork server has not answered in" in worker.log_path.read_text()
    assert os.sched_getscheduler(server) == lowest


def test_a_killed_supervisors_fork_server_and_model_process_end_too(service, tiny_model):
    worker = service.worker(**tiny_settings(tiny_model))
    children = children_of(worker.pid)
    assert len(children) == 2  # the fork server and the model process

    worker.send_signal(signal.SIGKILL)  # no goodbye: they see their sockets close
    wait_until(lambda: not any(is_running(pid) for pid in children), timeout=30,
               what="the fork server and the model process to end")


def test_a_process_that_handed_over_waits_to_exit_unless_its_supervisor_goes(service, tiny_model):
    """After its hand-over the old version's process waits EXIT_AFTER_HAND_OVER_S before exiting
    (its exit would run beside the successor's first passes), but not once its supervisor has
    gone: nothing would ever stop it then. Here the test is its supervisor, on its socket."""
    server, ours = start_fork_server(service.env({**tiny_settings(tiny_model),
                                                  "RUNTIME": "keras"}))
    replies, (mine, its) = ours.makefile("r"), socket.socketpair()
    channel = Channel(mine)
    try:
        socket.send_fds(ours, [b"n"], [its.fileno()])
        its.close()
        pid = int(replies.readline())
        mine.settimeout(120)
        spec = {"model": tiny_model["MODEL"], "weights": "none", "labels": tiny_model["LABELS"],
                "preprocess": "scale_0_1", "version": "1"}
        channel.send(**model_order("test/1", "test", spec, 0, False, 4))
        states = [channel.receive()["state"]]  # warm
        channel.send(state="serve")
        states.append(channel.receive()["state"])
        channel.send(state="hand-over")
        states.append(channel.receive()["state"])
        channel.send(state="leave")
        time.sleep(EXIT_AFTER_HAND_OVER_S / 3)
        waiting = is_running(pid)
        channel.lines.close()
        mine.close()  # its supervisor goes: the socket's last reference closed
        gone = time.monotonic()
        wait_until(lambda: not is_running(pid), timeout=EXIT_AFTER_HAND_OVER_S / 2,
                   what="the process to exit at once")

        assert states == ["warm", "serving", "stopped claiming"]
        assert waiting
        print(f"exited {time.monotonic() - gone:.2f} s after its supervisor went")
    finally:
        channel.lines.close()
        mine.close()
        replies.close()
        ours.close()  # the fork server ends too
        server.wait(30)
