"""The web tier's part of classifying images, shared by /predict and the Open Inference
Protocol's /v2 infer: a request's deadline, its admission against the queue, reading and checking
uploads, and submitting a request's images as jobs, all or none, then collecting their results in
order.

The web tier decodes no image: it reads each upload's header (format, size, what decoding it
would cost) and enqueues the upload as it came; the model worker decodes it (worker.ImageReader).
What the web tier knows of the model workers (their input shape, their measured rate, the job
format they read) comes from their heartbeats (WorkerView)."""
import logging
import math
import threading
import time

import settings
from serving import metrics
from serving.errors import ServiceError
from serving.images import decoding_bytes, open_image
from serving.text import is_whole_number
from serving.web.gevent_worker import ClientGone, client_watch
from serving.wire import job_format, jobqueue
from serving.wire.connection import CLOCK, REDIS_ERRORS

log = logging.getLogger("keras_server.web")
# A job is admitted only if the work queued ahead of it, at the workers' measured rate, ends within
# this share of its time left: the rest absorbs the noise in that rate, so an admitted request is
# answered, not timed out (see WorkerView.depth_bound_at_enqueue).
ADMISSION_SHARE = 0.8
# The check before an upload is decoded leaves this many seconds of the workers' work free below
# the bound the enqueue applies, for requests admitted at about the same moment: in a sustained
# overload the queue stays at that bound, and a request that passed the check a job short of it
# would be refused at the enqueue, its upload decoded for nothing. Taken from the time left, before
# the MAX_QUEUE_LENGTH cap, so a queue bounded by the cap is not shortened.
ADMISSION_MARGIN_S = 1.0
# While no model worker is warm (none has reported its model's input yet: a cold start, workers
# scaled to zero, the last one gone), a request is refused at once, with a Retry-After of an
# autoscaler's polling interval (KEDA's, in deploy/k8s): no worker comes sooner than it sees the
# need. The refusal leaves keys.wake for WAKE_TTL_S after its last write, many such intervals, and
# a web process writes it at most every WAKE_EVERY_S.
NO_WORKER_RETRY_S, WAKE_TTL_S, WAKE_EVERY_S = 5, 60, 1.0


def submit(store, keys, workers, jobs, deadline, connection):
    """Classify a request's images: its jobs (job_format.new_job), enqueued all or none, answered
    in order.

    The jobs in the list lose their bodies once queued. Returns one item per job, its result
    record or the ServiceError it got (504: no result in time; a worker's 4xx or 5xx). Raises 499
    if the client hung up first (its jobs withdrawn if still queued), and OVERLOAD_STATUS,
    enqueuing nothing, if the queue has no room for all of them.
    """
    workers.check_job_format()
    try:
        workers.depth_seen = jobqueue.enqueue_jobs(
            store, keys, jobs, workers.depth_bound_at_enqueue(deadline - time.time()),
            settings.MAX_QUEUE_BYTES)
    except jobqueue.QueueFull as full:
        workers.depth_seen = full.depth
        metrics.OVERLOAD_REFUSALS.labels("enqueue").inc()
        raise overload(full, full.depth, workers, len(jobs)) from full
    # Queued: only the ids are needed now. Replaced in the caller's list too, so a waiting request
    # holds no upload (a few kB each, however large its images were).
    jobs[:] = [job._replace(body=None) for job in jobs]
    results = []
    try:
        with client_watch(connection):
            for job in jobs:
                results.append(collect(store, keys, job, deadline))
    except ClientGone:
        withdrawn = jobqueue.withdraw_jobs(store, keys, jobs[len(results):])
        log.info("job %s: its client hung up; %d of %d jobs withdrawn from the queue", jobs[0].id,
                 withdrawn, len(jobs) - len(results))
        raise ServiceError("the client closed its connection", 499) from None
    return results


def collect(store, keys, job, deadline):
    """One job's result record, or the ServiceError it ended with."""
    try:
        result = jobqueue.wait_for_result(store, keys, job, deadline)
    except ServiceError as refusal:
        return refusal
    if "error" in result:
        return ServiceError(result["error"], result.get("status", 500))
    metrics.QUEUE_WAIT_SECONDS.observe(result["queue_wait_ms"] / 1000)
    return {**result, "id": job.id}


def timing_headers(result):
    """Where the time of one image's request went, for clients and operators."""
    return {
        "X-Request-ID": result["id"],
        "X-Queue-Wait-Ms": f"{result['queue_wait_ms']:.1f}",
        "X-Inference-Ms": f"{result['inference_ms']:.1f}",
        "X-Batch-Size": str(result["batch_size"]),
        "X-Model-Worker": result["worker"],
        "X-Model-Version": result["model_version"],
        "X-Model-Precision": result.get("precision", "fp32"),
    }


def fresh_heartbeats(store, keys):
    """The live workers' heartbeats; 503 when Redis cannot be asked."""
    try:
        return jobqueue.live_workers(store, keys)
    except REDIS_ERRORS as exc:
        raise ServiceError(f"Redis is unreachable: {exc}", 503, {"Retry-After": "1"}) from exc


def warm_beats(beats):
    """The heartbeats of the warm workers among `beats`."""
    return [beat for beat in beats if beat.get("warm") == "1"]


def find_warm(beats):
    """The heartbeats of the warm workers; 503 if none is."""
    warm = warm_beats(beats)
    if not warm:
        raise ServiceError("no warm model worker has sent a heartbeat recently", 503)
    return warm


def measure_clock(store):
    """Measure the offset to Redis's clock (CLOCK); 503 when Redis cannot be asked."""
    try:
        metrics.CLOCK_OFFSET.set(CLOCK.measure(store))
    except REDIS_ERRORS as exc:
        raise ServiceError(f"Redis is unreachable: {exc}", 503, {"Retry-After": "1"}) from exc


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


def admit_or_refuse(store, keys, workers, deadline):
    """Refuse a request that cannot be answered in time: 504 if its deadline has passed already
    (it waited in front of the service), 503 while no model worker is warm, OVERLOAD_STATUS if
    the queue ahead of it is too long.
    (Before its body is read, so as if it carried one image: submit checks them all.) Returns
    the warm workers' heartbeats."""
    time_left = deadline - time.time()
    if time_left <= 0:
        raise ServiceError("the request waited longer than its deadline before the service could "
                           "look at it", 504)
    warm = workers.warm()
    bound = workers.depth_bound_at_arrival(time_left)
    # The queue is read only when this process last saw it half-way to the bound: a round trip
    # saved on every request in normal operation. (The enqueue checks the bound atomically anyway;
    # this check saves decoding an upload that would be refused.)
    if workers.depth_seen * 2 >= bound:
        workers.depth_seen = jobqueue.queue_depth(store, keys)
        if workers.depth_seen >= bound:
            metrics.OVERLOAD_REFUSALS.labels("admission").inc()
            raise overload(f"the queue is full ({workers.depth_seen} jobs waiting)",
                           workers.depth_seen, workers)
    return warm


def overload(reason, depth, workers, count=1):
    """The refusal of a request of `count` images that the queue cannot take now, with when to
    retry."""
    retry_after = workers.seconds_until_admitted(depth, count)
    return ServiceError(f"{reason}; retry in {retry_after} s", settings.OVERLOAD_STATUS,
                        {"Retry-After": str(retry_after)})


def check_upload(data):
    """Refuse an upload the model worker would: not an image in ALLOWED_FORMATS (400), more than
    MAX_IMAGE_PIXELS (413), or decoding it would need more than DECODE_BUDGET_BYTES (413: the
    estimate at full size, the most it may cost). Only its header is read."""
    image = open_image(data, settings.MAX_IMAGE_PIXELS, settings.ALLOWED_FORMATS)
    cost = decoding_bytes(image)
    if cost > settings.DECODE_BUDGET_BYTES:
        raise ServiceError(f"decoding this image takes about {cost >> 20} MiB, more than the "
                           f"{settings.DECODE_BUDGET_BYTES >> 20} MiB a process may spend "
                           "(DECODE_BUDGET_BYTES)", 413)


class WorkerView:
    """What the web tier knows of the model workers, from their heartbeats (re-read every 2 s,
    with the offset to Redis's clock): how many jobs they answer in a request's time (admission),
    when a refused client should retry, and which job format they read."""

    def __init__(self, store, keys, max_age_s=2.0):
        self.store, self.keys, self.max_age_s = store, keys, max_age_s
        self.beats, self.read_at = [], float("-inf")
        self.reading = threading.Lock()  # gevent's, once monkey-patched
        self.depth_seen = 0  # the queue's length when this process last enqueued or looked
        self.woke_at = float("-inf")

    def heartbeats(self):
        """The heartbeats, read again once they are max_age_s old, or when none was warm: by one
        request, while the others that come meanwhile go on with the ones read before (if any)."""
        if self.stale():
            if self.reading.acquire(blocking=self.read_at == float("-inf")):
                try:
                    if self.stale():  # (not read meanwhile by the request that held the lock)
                        self.beats = fresh_heartbeats(self.store, self.keys)
                        self.read_at = time.monotonic()
                        measure_clock(self.store)
                finally:
                    self.reading.release()
        return self.beats

    def stale(self):
        return time.monotonic() - self.read_at > self.max_age_s or not warm_beats(self.beats)

    def warm(self):
        """The warm workers' heartbeats. While there is none, 503 with Retry-After (a job queued
        now would wait for a worker that may take longer than its deadline to come, or never
        come), and the sign keys.wake for an autoscaler (jobqueue.wake_workers)."""
        warm = warm_beats(self.heartbeats())
        if not warm:
            if time.monotonic() - self.woke_at >= WAKE_EVERY_S:
                self.woke_at = time.monotonic()
                try:
                    jobqueue.wake_workers(self.store, self.keys, WAKE_TTL_S)
                except REDIS_ERRORS as exc:  # (the refusal stands: it says why)
                    log.warning("could not leave the sign to start a worker: %s", exc)
            raise ServiceError(f"no model worker is ready yet; retry in {NO_WORKER_RETRY_S} s",
                               503, {"Retry-After": str(NO_WORKER_RETRY_S)})
        return warm

    def check_job_format(self):
        """503 while a warm worker of an older version of the service runs: it cannot read the
        jobs this web tier writes (it would drop them, and their clients would wait for nothing).
        Upgrade the model workers first: they read the jobs of older web tiers too."""
        older = [beat.get("id", "?") for beat in warm_beats(self.heartbeats())
                 if job_format.JOB_FORMAT_FIELD not in beat]
        if older:
            raise ServiceError(f"model workers of an older version of the service are running "
                               f"({', '.join(older)}): upgrade the model workers before the web "
                               "tier", 503, {"Retry-After": "5"})

    def capacity(self):
        """(images per second, seconds of one batch) of the warm workers together, measured."""
        warm = warm_beats(self.heartbeats())
        rate = sum(float(beat.get("rate", 0)) for beat in warm)
        batch_s = max((float(beat.get("batch_s", 0)) for beat in warm), default=0.0)
        return rate, batch_s

    def depth_bound_at_enqueue(self, time_left):
        """The bound the enqueue script holds the queue to: the most jobs that may wait ahead of
        a new one that has time_left seconds, as many as the workers answer in ADMISSION_SHARE of
        it (after one batch of its own), at most MAX_QUEUE_LENGTH, and always at least 1 (an empty
        queue takes any job)."""
        rate, batch_s = self.capacity()
        if rate <= 0:
            return settings.MAX_QUEUE_LENGTH
        fits = math.floor((time_left * ADMISSION_SHARE - batch_s) * rate)
        return max(1, min(settings.MAX_QUEUE_LENGTH, fits))

    def depth_bound_at_arrival(self, time_left):
        """The bound of the check when a request arrives, before its upload is read:
        depth_bound_at_enqueue, ADMISSION_MARGIN_S of the workers' work shorter (taken from the
        time left, so before the MAX_QUEUE_LENGTH cap)."""
        return self.depth_bound_at_enqueue(time_left - ADMISSION_MARGIN_S / ADMISSION_SHARE)

    def seconds_until_admitted(self, depth, count=1):
        """Whole seconds until the workers have drained `depth` queued jobs down to what a new
        request of `count` images would pass the check before decoding behind (1 to
        REQUEST_TIMEOUT_S)."""
        rate, _ = self.capacity()
        if rate <= 0:
            return 1
        excess = depth - self.depth_bound_at_arrival(settings.REQUEST_TIMEOUT_S) + count
        return max(1, min(math.ceil(excess / rate), math.ceil(settings.REQUEST_TIMEOUT_S)))
