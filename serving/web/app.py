"""The Flask app of the web tier, built by its factory in each gunicorn process."""
import json
import logging
import os
import time

from flask import Flask, Response, g, jsonify, request, send_from_directory
from prometheus_client import CONTENT_TYPE_LATEST
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

import settings
from serving import metrics
from serving.errors import ServiceError
from serving.images import MemoryBudget
from serving.web import api_docs, inference_protocol
from serving.web.api_docs import documented
from serving.web.predict import PredictEndpoint
from serving.web.submit import (WorkerView, find_warm, fresh_heartbeats, input_shape_of,
                                 warm_beats)
from serving.wire.connection import REDIS_ERRORS, connect_redis
from serving.wire.keys import Keys

log = logging.getLogger("keras_server")

HERE = os.path.dirname(os.path.abspath(__file__))
PAGE_FOLDER = os.path.join(HERE, "static")  # the page at / and its assets, served offline


def create_app(redis_client=None):
    """The Flask app: POST /predict, the page at /, health, /model, /metrics, the API's
    document and docs, the Open Inference Protocol under /v2; errors as JSON. Only the web tier
    makes one (gunicorn calls this factory in each of its processes): no other command connects
    the web tier's Redis client or builds its routes."""
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.MAX_UPLOAD_BYTES
    store = redis_client or connect_redis()
    keys = Keys(settings.IMAGE_QUEUE)
    workers = WorkerView(store, keys)
    budget = MemoryBudget(settings.DECODE_BUDGET_BYTES)  # for parsing /v2 bodies

    endpoint = app.wsgi_app = PredictEndpoint(app.wsgi_app, store, keys, workers)

    @app.post("/predict")
    @documented(**api_docs.PREDICT)
    def predict():
        """Classify one image, or several (repeat the field `image`), each a job of its own.

        The image comes as the multipart/form-data field `image` (the classic tutorial's form),
        or as the body itself (Content-Type image/...). One image gets the classic tutorial's
        answer; several get one result each, in order, with its own error if it alone failed. The
        images of a request are enqueued all or none.
        """
        # PredictEndpoint answers POST /predict in front of Flask (this view is reached only
        # without it); the route documents it, and answers 405 to other methods.
        status, headers, body = endpoint.answer(request.environ)
        return Response(body, status, headers)

    @app.get("/")
    @documented(**api_docs.PAGE)
    def page():
        """A page to try the model in a browser: drop, pick or paste images."""
        return send_from_directory(PAGE_FOLDER, "index.html")

    @app.get("/assets/<path:filename>")
    @documented(**api_docs.PAGE)
    def asset(filename):
        """The page's script and style sheet."""
        return send_from_directory(PAGE_FOLDER, filename)

    @app.get("/healthz")
    @documented(**api_docs.HEALTH)
    def healthz():
        """The web instance answers (liveness)."""
        return jsonify(success=True, instance=settings.INSTANCE_NAME, pid=os.getpid())

    @app.get("/readyz")
    @documented(**api_docs.READY)
    def readyz():
        """Some model worker is warm (readiness), with every live worker's heartbeat."""
        beats = fresh_heartbeats(store, keys)
        if not warm_beats(beats):
            reason = ("model workers are still warming up" if beats
                      else "no model worker has sent a heartbeat recently")
            return jsonify(success=False, error=reason, workers=beats), 503
        return jsonify(success=True, workers=beats)

    @app.get("/model")
    @documented(**api_docs.MODEL)
    def model():
        """The model the warm workers serve, and the versions served now."""
        warm = find_warm(fresh_heartbeats(store, keys))
        return jsonify(success=True, model=describe_model(warm[-1]),
                       versions=sorted({beat["version"] for beat in warm}))

    @app.get("/metrics")
    @documented(**api_docs.METRICS)
    def prometheus_metrics():
        """Prometheus metrics of every process of this web instance, and the queue's."""
        return Response(metrics.web_metrics(store, keys), mimetype=CONTENT_TYPE_LATEST)

    api_docs.register(app)
    inference_protocol.add_routes(app, store, keys, workers, budget)

    @app.before_request
    def start_clock():
        g.started = time.perf_counter()

    @app.errorhandler(ServiceError)
    def service_error(exc):
        return error_answer(exc.message, exc.status, exc.headers, exc.body)

    def redis_error(exc):
        # Unreachable, out of memory, read-only after a failover, an ACL denial, a cluster
        # re-sharding: all are 503.
        log.warning("Redis failed on %s %s: %s", request.method, request.path, exc)
        return error_answer(f"the job queue (Redis) failed: {exc}", 503, {"Retry-After": "1"})

    for kind in REDIS_ERRORS:
        app.register_error_handler(kind, redis_error)

    @app.errorhandler(HTTPException)
    def http_error(exc):
        if isinstance(exc, RequestEntityTooLarge) and (
                (request.content_length or 0) > settings.MAX_UPLOAD_BYTES):
            return error_answer(f"the upload is larger than the {settings.MAX_UPLOAD_BYTES} "
                                "bytes allowed", 413)
        return error_answer(exc.description, exc.code)

    @app.errorhandler(Exception)
    def unexpected_error(exc):
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_answer("internal server error", 500)

    @app.after_request
    def name_instance_and_count(response):
        response.headers["X-Served-By"] = settings.INSTANCE_NAME
        if request.endpoint == "infer":  # (PredictEndpoint counts /predict's)
            metrics.REQUESTS.labels(str(response.status_code)).inc()
            metrics.REQUEST_SECONDS.observe(time.perf_counter() - g.started)
        return response

    return app


def error_answer(message, status, headers=None, body=None):
    """An error in the shape of the route's protocol: the tutorial's, or under /v2 the Open
    Inference Protocol's."""
    if request.path == "/v2" or request.path.startswith("/v2/"):
        return jsonify(error=message), status, headers or {}
    return jsonify(success=False, error=message, **(body or {})), status, headers or {}


def describe_model(beat):
    """GET /model's description of the model one worker serves, from its heartbeat."""
    return {"name": beat["model"], "version": beat["version"], "weights": beat["weights"],
            "input_shape": list(input_shape_of(beat)),
            "labels": int(beat["labels"]), "preprocess": beat["preprocess"],
            "batch_size": beat["batch_size"], "device": beat["device"],
            "runtime": beat.get("runtime", "keras"), "precision": beat.get("precision", "fp32"),
            "precision_check": json.loads(beat.get("precision_check", "null"))}
