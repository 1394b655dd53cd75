"""POST /predict, the classic tutorial's endpoint, as a plain WSGI handler in front of the Flask app.

Every classification passes here, so this path does what the request needs and no more: Flask's
request context, routing, hooks and response objects cost about as much CPU as all the rest of the
web tier's work for a request (bench/results/README.md). Flask serves every other route, and
documents this one (its view in app.py calls the same `answer`).

The image comes as the multipart/form-data field `image` (the classic tutorial's form, read by the
`multipart` library), or as the body itself (Content-Type image/... or application/octet-stream).
Answers and errors have the tutorial's shape, with the statuses and headers Flask's routes give."""
import json
import logging
import time
from http import HTTPStatus
from urllib.parse import parse_qs

import multipart

import settings
from serving import metrics
from serving.errors import ServiceError
from serving.text import is_whole_number
from serving.web.gevent_worker import request_deadline
from serving.web.submit import (
    admit_or_refuse,
    check_upload,
    parse_top_k,
    submit,
    timing_headers,
)
from serving.wire.connection import REDIS_ERRORS
from serving.wire.job_format import new_job

log = logging.getLogger("keras_server.web")
MULTIPART = "multipart/form-data"


class PredictEndpoint:
    """WSGI middleware: answers POST /predict, and hands every other request to `app`."""

    def __init__(self, app, store, keys, workers):
        self.app, self.store, self.keys, self.workers = app, store, keys, workers

    def __call__(self, environ, start_response):
        if environ.get("PATH_INFO") != "/predict" or environ.get("REQUEST_METHOD") != "POST":
            return self.app(environ, start_response)
        status, headers, body = self.answer(environ)
        start_response(status_line(status), headers)
        return [body]

    def answer(self, environ):
        """(status, headers, body) of a POST /predict, counted in the metrics; every failure in
        the service's JSON shape."""
        started = time.perf_counter()
        try:
            status, (headers, body) = 200, self.classify(environ)
        except ServiceError as refusal:
            status, headers = refusal.status, list(refusal.headers.items())
            body = error_json(refusal.message, refusal.body)
        except REDIS_ERRORS as exc:
            # Unreachable, out of memory, read-only after a failover, an ACL denial, a cluster
            # re-sharding: all are 503.
            log.warning("Redis failed on POST /predict: %s", exc)
            status, headers = 503, [("Retry-After", "1")]
            body = error_json(f"the job queue (Redis) failed: {exc}")
        except Exception:
            log.exception("unhandled error on POST /predict")
            status, headers, body = 500, [], error_json("internal server error")
        metrics.REQUESTS.labels(str(status)).inc()
        metrics.REQUEST_SECONDS.observe(time.perf_counter() - started)
        return status, [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                        ("X-Served-By", settings.INSTANCE_NAME), *headers], body

    def classify(self, environ):
        """(headers, body) classifying one image, or several (repeat the field `image`), each a
        job of its own.

        One image gets the classic tutorial's answer; several get one result each, in order,
        with its own error if it alone failed. The images of a request are enqueued all or none.
        """
        deadline = request_deadline(environ)
        top_k = parse_top_k(query_value(environ, "top_k"))
        admit_or_refuse(self.store, self.keys, self.workers, deadline)  # before reading the upload
        uploads = read_uploads(environ)
        refusals = [refusal_of(upload) for upload in uploads]
        jobs = [new_job(upload, deadline, top_k)
                for upload, refusal in zip(uploads, refusals) if refusal is None]
        del uploads  # the jobs hold them until they are queued
        answers = iter(submit(self.store, self.keys, self.workers, jobs, deadline,
                              environ.get("gunicorn.socket")) if jobs else [])
        outcomes = [refusal or next(answers) for refusal in refusals]
        if len(outcomes) == 1:
            if isinstance(outcomes[0], ServiceError):
                raise outcomes[0]
            return (list(timing_headers(outcomes[0]).items()),
                    answer_json(success=True, predictions=outcomes[0]["predictions"]))
        results = [image_result(outcome) for outcome in outcomes]
        if all(isinstance(outcome, ServiceError) for outcome in outcomes):
            # Nothing classified: the request fails with the first image's status.
            raise ServiceError(f"no image was classified; the first: {outcomes[0].message}",
                               outcomes[0].status, body={"results": results})
        return [], answer_json(success=all(result["success"] for result in results),
                               results=results)


def read_uploads(environ):
    """The images of a /predict request: each multipart/form-data field `image`, or the body
    itself. 400 if there is none, 413 past MAX_IMAGES_PER_REQUEST."""
    kind, options = multipart.parse_options_header(environ.get("CONTENT_TYPE", ""))
    if kind == MULTIPART:
        uploads = form_files(read_body(environ), options.get("boundary", ""), "image")
    elif kind.startswith("image/") or kind == "application/octet-stream":
        uploads = [read_body(environ)]
    else:
        uploads = []
    if not uploads:
        raise ServiceError("send the image as multipart/form-data field 'image', or as the body "
                           "with Content-Type image/...", 400)
    too_many(len(uploads))
    return uploads


def read_body(environ):
    """The request's body; 413 past MAX_UPLOAD_BYTES (before reading it when its length says
    so), 400 if the client stops sending it."""
    length, limit = environ.get("CONTENT_LENGTH") or "", settings.MAX_UPLOAD_BYTES
    if is_whole_number(length) and int(length) > limit:
        raise ServiceError(f"the upload is larger than the {limit} bytes allowed", 413)
    try:
        body = environ["wsgi.input"].read(int(length) if is_whole_number(length) else limit + 1)
    except (OSError, ValueError) as exc:  # gunicorn's NoMoreData, a chunk that does not parse
        raise ServiceError(f"the upload was cut short: {exc}", 400) from exc
    if len(body) > limit:
        raise ServiceError(f"the upload is larger than the {limit} bytes allowed", 413)
    return body


def form_files(body, boundary, name):
    """The contents of every part named `name` of a multipart/form-data body (400 if it is not
    one; 413 past MAX_IMAGES_PER_REQUEST of them)."""
    files, current = [], None
    try:
        with multipart.PushMultipartParser(
                boundary, len(body), max_segment_count=4 * settings.MAX_IMAGES_PER_REQUEST) as parser:
            for event in parser.parse(body):
                if isinstance(event, multipart.MultipartSegment):
                    current = [] if event.name == name else None
                elif event is None:
                    if current is not None:
                        files.append(b"".join(current))
                        too_many(len(files))
                    current = None
                elif current is not None:
                    current.append(event)
    except multipart.MultipartError as exc:
        raise ServiceError(f"the multipart/form-data body cannot be read: {exc}", 400) from exc
    return files


def too_many(count):
    """413 if a request carries more than MAX_IMAGES_PER_REQUEST images."""
    if count > settings.MAX_IMAGES_PER_REQUEST:
        raise ServiceError(f"{count} images in one request; at most "
                           f"{settings.MAX_IMAGES_PER_REQUEST} (MAX_IMAGES_PER_REQUEST)", 413)


def refusal_of(upload):
    """The ServiceError that refuses an upload (check_upload), or None (one image of several fails
    alone)."""
    try:
        check_upload(upload)
    except ServiceError as refusal:
        return refusal
    return None


def image_result(outcome):
    """One image's entry in the answer for several images."""
    if isinstance(outcome, ServiceError):
        return {"success": False, "error": outcome.message, "status": outcome.status}
    return {"success": True, "predictions": outcome["predictions"],
            **{name: outcome[name] for name in ("queue_wait_ms", "inference_ms", "batch_size",
                                                "model_version", "precision")}}


def query_value(environ, name):
    """The first value of a query parameter (None if absent)."""
    values = parse_qs(environ.get("QUERY_STRING", ""), keep_blank_values=True).get(name)
    return values[0] if values else None


def answer_json(**fields):
    """A JSON body as Flask's jsonify writes it (sorted keys, compact)."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def error_json(message, more=None):
    """The body of an error: {"success": false, "error": message, ...more}."""
    return answer_json(success=False, error=message, **(more or {}))


def status_line(status):
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:  # 499, a client that hung up: nginx's, not the standard's
        return f"{status} Client Closed Request"
