"""Model processes forked from a server that imported their frameworks once (serving.rollout.forks)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import psutil

from conftest import ROOT, tiny_settings, wait_until, worker_stats


def test_the_fork_server_forks_model_processes_with_their_frameworks_already_imported():
    """Each model process it forks has TensorFlow, Keras and OpenVINO's libraries in its memory
    before it has read its order (the first thing a model process does): it never imports them,
    and so a new version loading beside a serving one takes none of the CPU they cost."""
    ours, theirs = socket.socketpair()
    server = subprocess.Popen([sys.executable, "run_keras_server.py", "model-forks",
                               str(theirs.fileno())], pass_fds=[theirs.fileno()], cwd=ROOT,
                              env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    theirs.close()
    replies = ours.makefile("r")
    try:
        for _ in range(2):
            mine, its = socket.socketpair()
            socket.send_fds(ours, [b"f"], [its.fileno()])
            its.close()
            pid = int(replies.readline())  # once it has imported them, the first time
            libraries = Path(f"/proc/{pid}/maps").read_text()
            parent = psutil.Process(pid).ppid()
            mine.close()  # no order comes: it ends

            assert "libtensorflow_framework" in libraries and "libopenvino" in libraries
            assert parent != server.pid  # forked twice: it is the subreaper's (or init's)
            wait_until(lambda: not psutil.pid_exists(pid)
                       or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
                       what="the model process to end")
    finally:
        replies.close()
        ours.close()  # the supervisor's end: the server ends
    assert server.wait(30) == 0


def test_a_workers_model_process_is_its_own_child_beside_the_fork_server(
        service, tiny_model, redis_client, keys):
    worker = service.worker(**tiny_settings(tiny_model))
    model_pid = int(worker_stats(redis_client, keys)[str(worker.pid)]["model_pid"])
    children = {child.pid: child.cmdline() for child in psutil.Process(worker.pid).children()}

    assert model_pid in children  # reaped by the supervisor, not by the server it forked from
    assert [command[2:3] for command in children.values()] == [["model-forks"]] * 2
