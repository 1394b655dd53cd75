"""gunicorn settings of the web tier:
`gunicorn -c serving/web/gunicorn.conf.py 'serving.web.app:create_app()'`.

Every value comes from settings.py, so the same environment variables configure every process.
"""
import gc
import os
import shutil
import sys
import tempfile

# The repository's root, where settings.py and the package are, wherever gunicorn starts.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import settings  # noqa: E402
from serving.web.gevent_worker import StampingGeventWorker  # noqa: E402

settings.check_web_tier()

bind = f"{settings.HOST}:{settings.PORT}"

# A /predict request spends most of its life blocked in Redis while the model works. Under gevent
# that costs a greenlet and a Redis connection, not a thread: one process holds WEB_CONNECTIONS
# waiting requests (more than the queue admits), so a full queue is refused at once with
# Retry-After instead of leaving new connections unseen in a thread pool's queue or the kernel's
# backlog. Uploads are decoded by the model workers; what CPU work the web tier has (parsing a
# large /v2 JSON body) runs in a native thread (gevent_worker.off_loop), so the event loop keeps
# answering meanwhile.
worker_class = StampingGeventWorker
workers = settings.WEB_WORKERS
worker_connections = settings.WEB_CONNECTIONS

# A request may wait REQUEST_TIMEOUT_S for its result; a worker is only killed as stuck well after
# that. On SIGTERM, in-flight requests get the same time to finish before the process exits.
timeout = int(settings.REQUEST_TIMEOUT_S) + 30
graceful_timeout = int(settings.REQUEST_TIMEOUT_S) + 5

# An idle kept-alive connection holds its greenlet, and a stopping worker waits for every greenlet:
# idle connections close after 5 s, so a SIGTERM takes that much longer at most. nginx closes its
# idle upstream connections sooner (keepalive_timeout 4s), so it never sends a request on a
# connection gunicorn is closing.
keepalive = 5

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


def post_worker_init(worker):
    # What the worker has loaded lives as long as it does: kept out of the garbage collector's full
    # passes, which would scan all of it each time, while no request on this worker moves.
    gc.freeze()


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _OWN_METRICS_DIR:
        shutil.rmtree(_OWN_METRICS_DIR, ignore_errors=True)
