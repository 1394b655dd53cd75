"""Prometheus metrics of the web tier and of the model workers.

The web tier runs as several gunicorn processes: its gunicorn.conf.py sets PROMETHEUS_MULTIPROC_DIR,
each process writes its samples there, and /metrics adds them up. Queue depth and live workers are
read from Redis when /metrics is scraped, so every web instance reports the same, current values.
A model worker's supervisor serves on WORKER_METRICS_PORT the metrics (batch sizes, forward
passes) of its model processes, which write them to a folder of their own the same way, and its
readiness."""
import atexit
import os
import shutil
import tempfile
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    make_wsgi_app,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer

from serving.wire import jobqueue
from serving.wire.connection import REDIS_ERRORS

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

# Both tiers
CLOCK_OFFSET = Gauge("keras_clock_offset_seconds",
                     "Redis's clock minus this process's host's, as last measured (deadlines are "
                     "counted on Redis's clock): beyond a second or so, the host's clock wants "
                     "NTP.",
                     multiprocess_mode="liveall")

# Web tier
REQUESTS = Counter("keras_requests_total", "Answers of /predict and /v2 infer, by HTTP status.",
                   ["status"])
REQUEST_SECONDS = Histogram("keras_request_seconds", "Time to answer /predict or /v2 infer.",
                            buckets=LATENCY_BUCKETS)
OVERLOAD_REFUSALS = Counter("keras_overload_refusals_total",
                            "Requests refused because the queue was full: at 'admission', before "
                            "the upload was decoded, or at 'enqueue', after.", ["stage"])
QUEUE_WAIT_SECONDS = Histogram("keras_queue_wait_seconds",
                               "Time an answered job waited in the queue before its batch ran.",
                               buckets=LATENCY_BUCKETS)

# Model worker
BATCH_SIZE = Histogram("keras_batch_size", "Images per forward pass.",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
FORWARD_SECONDS = Histogram("keras_forward_pass_seconds", "Time of one forward pass.",
                            buckets=LATENCY_BUCKETS)
EXPIRED = Counter("keras_jobs_expired_total", "Jobs dropped unanswered: past their deadline.")
REQUEUED = Counter("keras_jobs_requeued_total", "Claimed jobs of dead workers put back on the queue.")


class QueueCollector:
    """Queue depth and live model workers, read from Redis at each scrape."""

    def __init__(self, store, keys):
        self.store, self.keys = store, keys

    def collect(self):
        try:
            depth = self.store.llen(self.keys.queue)
            workers = jobqueue.live_workers(self.store, self.keys)
        except REDIS_ERRORS:
            return  # /readyz says why; the scrape still gets this process's own metrics
        yield GaugeMetricFamily("keras_queue_depth", "Jobs waiting in the queue.", value=depth)
        yield GaugeMetricFamily("keras_live_workers", "Model workers with a fresh heartbeat.",
                                value=len(workers))


def web_metrics(store, keys):
    """The text of /metrics: every gunicorn process's samples, and the queue's gauges."""
    queue = CollectorRegistry()
    queue.register(QueueCollector(store, keys))
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        processes = CollectorRegistry()
        multiprocess.MultiProcessCollector(processes)
    else:
        processes = REGISTRY
    return generate_latest(processes) + generate_latest(queue)


def serve_model_metrics(port, ready):
    """Serve on `port` the samples of the model processes this process starts from now on, and
    GET /readyz: 200 while ready() (a model version serves), else 503. Kubernetes' readiness
    probe reads it, so a rolling update stops an old worker only once its successor is warm."""
    folder = tempfile.mkdtemp(prefix="keras-model-metrics-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder  # the children inherit it
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=folder)
    samples = make_wsgi_app(registry)

    def app(environ, start_response):
        if environ.get("PATH_INFO") != "/readyz":
            return samples(environ, start_response)
        status, body = ("200 OK", b"ready\n") if ready() else (
            "503 Service Unavailable", b"no model version serves yet\n")
        start_response(status, [("Content-Type", "text/plain")])
        return [body]

    server = make_server("", port, app, ThreadingWSGIServer, handler_class=QuietHandler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()


def forget_model_process(pid):
    """Drop the live gauges (its clock offset) of a model process that has ended from the
    samples serve_model_metrics serves; its counters stay, added to those of the others."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        multiprocess.mark_process_dead(pid)


class QuietHandler(WSGIRequestHandler):
    """Logs no line per request (probes and scrapes come every few seconds)."""

    def log_message(self, *args):
        pass
