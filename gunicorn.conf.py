"""gunicorn settings of the web tier: `gunicorn -c gunicorn.conf.py run_keras_server:app`.

Every value comes from settings.py, so the same environment variables configure every process.
"""
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import settings  # noqa: E402

bind = f"{settings.HOST}:{settings.PORT}"

# A /predict request spends most of its life blocked in Redis (BLPOP on its result) while the
# model works. With gthread that costs one idle thread, not a process, and the blocked thread
# releases the GIL; so a few processes with many threads each hold many waiting requests. The
# processes (one per core) are what decode uploads in parallel. gevent would need monkey-patching
# of redis-py and Pillow's C code would still block its loop, so plain threads are the simpler fit.
worker_class = "gthread"
workers = settings.WEB_WORKERS
threads = settings.WEB_THREADS

# A request may wait REQUEST_TIMEOUT_S for its result; a worker is only killed as stuck well after
# that. On SIGTERM, in-flight requests get the same time to finish before the process exits.
timeout = int(settings.REQUEST_TIMEOUT_S) + 30
graceful_timeout = int(settings.REQUEST_TIMEOUT_S) + 5

# Behind nginx, connections are re-used; keep them open a little longer than nginx's keepalive.
keepalive = 75

errorlog = "-"
loglevel = settings.LOG_LEVEL.lower()

# gunicorn's control socket (for `gunicornc`) defaults to one path per user, $HOME/.gunicorn/
# gunicorn.ctl: the several web instances of deploy/topology.py (and of the tests) on one machine
# would each take it over from the last. Nothing here uses gunicornc, so it is off.
control_socket_disable = True

# Prometheus: the gunicorn processes share one folder of metric files, which /metrics adds up. It
# must be set before any process imports prometheus_client, and emptied at start so that counts
# of an earlier run are not added in; each instance gets its own unless one is given.
_OWN_METRICS_DIR = None
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _OWN_METRICS_DIR = tempfile.mkdtemp(prefix="keras-web-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _OWN_METRICS_DIR


def on_starting(server):
    folder = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    for name in os.listdir(folder):
        if name.endswith(".db"):
            os.remove(os.path.join(folder, name))


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _OWN_METRICS_DIR:
        shutil.rmtree(_OWN_METRICS_DIR, ignore_errors=True)
