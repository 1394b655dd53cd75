"""The web tier's part of classifying images, shared by /predict and the Open Inference
Protocol's /v2 infer: a request's deadline, its admission against the queue, decoding uploads,
and submitting a request's images as jobs, all or none, then collecting their results in order.

What the web tier knows of the model workers (their input shape, their measured rate) comes from
their heartbeats (WorkerView).
"""
import logging
import math
import time

import jobqueue
import metrics
import settings
from helpers import (ServiceError, decode_image, decoding_bytes, encode_array, is_whole_number,
                     open_image)
from jobqueue import REDIS_ERRORS
from webserver import ARRIVED_AT, ClientGone, client_watch, off_loop

log = logging.getLogger("keras_server.web")
DEFAULT_INPUT = (224, 224, 3)  # (height, width, channels) until a worker reports its model's
# A job is admitted only if the work queued ahead of it, at the workers' measured rate, ends within
# this share of its time left: the rest absorbs the noise in that rate, so an admitted request is
# answered, not timed out (see WorkerView.admissible_depth).
ADMISSION_SHARE = 0.8
# The check before an upload is decoded leaves this many seconds of the workers' work free below
# the bound the enqueue applies, for requests admitted at about the same moment: in a sustained
# overload the queue stays at that bound, and a request that passed the check a job short of it
# would be refused at the enqueue, its upload decoded for nothing. Taken from the time left, before
# the MAX_QUEUE_LENGTH cap, so a queue bounded by the cap is not shortened.
ADMISSION_MARGIN_S = 1.0


def submit(store, keys, workers, images, deadline, top_k, connection, **job_fields):
    """Classify a request's images: one job each, enqueued all or none, answered in order.

    images: uint8 pixel arrays. job_fields: see jobqueue.new_job. Returns one item per image, its
    result record or the ServiceError it got (504: no result in time; a worker's 4xx or 5xx).
    Raises 499 if the client hung up first (its jobs withdrawn if still queued), and
    OVERLOAD_STATUS, enqueuing nothing, if the queue has no room for all of them.
    """
    jobs = [jobqueue.new_job(encode_array(pixels), pixels.shape, deadline, top_k, **job_fields)
            for pixels in images]
    try:
        payloads, workers.depth_seen = jobqueue.enqueue_jobs(
            store, keys, jobs, workers.admissible_depth(deadline - time.time()),
            settings.MAX_QUEUE_BYTES)
    except jobqueue.QueueFull as full:
        workers.depth_seen = full.depth
        metrics.OVERLOAD_REFUSALS.labels("enqueue").inc()
        raise overload(full, full.depth, workers, len(jobs)) from full
    ids = [job["id"] for job in jobs]
    del jobs  # their pixels, in base64, live on in the payloads (to withdraw a job by value)
    results = []
    try:
        with client_watch(connection):
            for job_id, payload in zip(ids, payloads):
                results.append(collect(store, keys, job_id, payload, deadline))
    except ClientGone:
        withdrawn = jobqueue.withdraw_jobs(store, keys, payloads[len(results):])
        log.info("job %s: its client hung up; %d of %d jobs withdrawn from the queue", ids[0],
                 withdrawn, len(ids) - len(results))
        raise ServiceError("the client closed its connection", 499) from None
    return results


def collect(store, keys, job_id, payload, deadline):
    """One job's result record, or the ServiceError it ended with."""
    try:
        result = jobqueue.wait_for_result(store, keys, job_id, payload, deadline)
    except ServiceError as refusal:
        return refusal
    if "error" in result:
        return ServiceError(result["error"], result.get("status", 500))
    metrics.QUEUE_WAIT_SECONDS.observe(result["queue_wait_ms"] / 1000)
    return {**result, "id": job_id}


def timing_headers(result):
    """Where the time of one image's request went, for clients and operators."""
    return {
        "X-Request-ID": result["id"],
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


def find_warm(beats):
    """The heartbeats of the warm workers; 503 if none is."""
    warm = [beat for beat in beats if beat.get("warm") == "1"]
    if not warm:
        raise ServiceError("no warm model worker has sent a heartbeat recently", 503)
    return warm


def input_shape_of(beat):
    """(height, width, channels) of the model a worker's heartbeat reports."""
    return tuple(int(n) for n in beat["input_shape"].split(","))


def parse_top_k(value):
    """The ?top_k= of a request (TOP_K when absent), checked: ASCII digits only."""
    if value is None:
        return settings.TOP_K
    if not is_whole_number(value) or int(value) < 1:
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
    (it waited in front of the service), OVERLOAD_STATUS if the queue ahead of it is too long.
    (Before its body is read, so as if it carried one image: submit checks them all.)"""
    time_left = deadline - time.time()
    if time_left <= 0:
        raise ServiceError("the request waited longer than its deadline before the service could "
                           "look at it", 504)
    bound = workers.admission_depth(time_left)
    # The queue is read only when this process last saw it half-way to the bound: a round trip
    # saved on every request in normal operation. (The enqueue checks the bound atomically anyway;
    # this check saves decoding an upload that would be refused.)
    if workers.depth_seen * 2 >= bound:
        workers.depth_seen = jobqueue.queue_depth(store, keys)
        if workers.depth_seen >= bound:
            metrics.OVERLOAD_REFUSALS.labels("admission").inc()
            raise overload(f"the queue is full ({workers.depth_seen} jobs waiting)",
                           workers.depth_seen, workers)


def overload(reason, depth, workers, count=1):
    """The refusal of a request of `count` images that the queue cannot take now, with when to
    retry."""
    retry_after = workers.seconds_until_admitted(depth, count)
    return ServiceError(f"{reason}; retry in {retry_after} s", settings.OVERLOAD_STATUS,
                        {"Retry-After": str(retry_after)})


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
        shapes = [input_shape_of(beat) for beat in self.heartbeats() if "input_shape" in beat]
        if shapes:
            self.shape = shapes[-1]
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

    def admission_depth(self, time_left):
        """The bound of the check before decoding: admissible_depth, ADMISSION_MARGIN_S of the
        workers' work shorter (taken from the time left, so before the MAX_QUEUE_LENGTH cap)."""
        return self.admissible_depth(time_left - ADMISSION_MARGIN_S / ADMISSION_SHARE)

    def seconds_until_admitted(self, depth, count=1):
        """Whole seconds until the workers have drained `depth` queued jobs down to what a new
        request of `count` images would pass the check before decoding behind (1 to
        REQUEST_TIMEOUT_S)."""
        rate, _ = self.capacity()
        if rate <= 0:
            return 1
        excess = depth - self.admission_depth(settings.REQUEST_TIMEOUT_S) + count
        return max(1, min(math.ceil(excess / rate), math.ceil(settings.REQUEST_TIMEOUT_S)))
