"""The model worker: claims batches from the queue, one forward pass per batch, answers every job.

Three parts, each readable alone:
- `process_batch`: a claimed batch in, every job's answer out. Pure: no Redis, no clock of its own.
- `Heartbeat`: tells the web tier and the other workers that this one is alive and how it does,
  and re-queues the jobs of workers that stopped beating.
- `ModelWorker`: the lanes that claim a batch, process it and store the results, until SIGTERM.
Loading a model, warming it up and choosing the batch size are classifier.py's; switching between
model versions is rollout.py's (each version runs in a process of its own).
"""
import collections
import json
import logging
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

import jobqueue
import metrics
import settings
from helpers import (Keys, MemoryBudget, ServiceError, decode_image, decode_reduced, encode_array,
                     model_name, open_image)
from jobqueue import REDIS_ERRORS

log = logging.getLogger("keras_server.worker")


# --- One batch ------------------------------------------------------------------------------

class BatchOutcome(NamedTuple):
    results: dict  # job id -> result record (predictions, or an error and its status)
    expired: list  # ids of jobs dropped unanswered: their deadline passes before the pass ends
    failed: int  # jobs answered with an error by a failed forward pass
    forward_s: float  # seconds of the forward pass (0 if none ran)
    elsewhere: dict = {}  # job id -> (model, version) it names, not this worker's (404 results)


def process_batch(classifier, images, jobs, now, pass_s=0.0, clock=time.perf_counter):
    """Every job's answer for one claimed batch, from one forward pass.

    images: the ImageReader that puts the jobs' images into this lane's batch buffer. now: the
    claim's time on Redis's clock, as deadlines are (queue waits are measured to it); pass_s: how
    long a forward pass takes lately. A job whose deadline falls before now + pass_s is dropped
    unanswered (its client gets 504 without the model spending time on it); a job whose image
    does not decode gets a 4xx record; a failed forward pass gets every job a 500 record.
    """
    results, elsewhere = {}, {}
    expired = [job["id"] for job in jobs if job["deadline"] <= now + pass_s]
    wanted = []
    for job in jobs:
        if job["id"] in expired:
            continue
        reason = served_elsewhere(classifier, job)
        if reason:
            results[job["id"]] = {"error": reason, "status": 404}
            elsewhere[job["id"]] = (job.get("model"), job.get("version"))
        else:
            wanted.append(job)
    pixels, valid, refusals = images.read(wanted)
    results.update(refusals)
    if not valid:
        return BatchOutcome(results, expired, 0, 0.0, elsewhere)
    started = clock()
    try:
        probabilities = classifier.predict_batch(pixels)
    except Exception as exc:
        log.exception("forward pass failed for a batch of %d", len(valid))
        results.update({job["id"]: {"error": f"inference failed: {exc}", "status": 500}
                        for job in valid})
        return BatchOutcome(results, expired, len(valid), clock() - started, elsewhere)
    forward_s = clock() - started
    for job, row in zip(valid, probabilities):
        if not np.isfinite(row).all():  # a broken model: NaN is no probability (nor JSON)
            results[job["id"]] = {"error": "the model's output for this image is not a number",
                                  "status": 500}
            continue
        try:
            results[job["id"]] = {
                "predictions": classifier.top_predictions(row, job["top_k"]),
                "batch_size": len(valid),
                "inference_ms": forward_s * 1000,
                "queue_wait_ms": max(0.0, now - job["enqueued_at"]) * 1000,
                "model_version": classifier.version,
                "precision": classifier.precision,
                **extra_outputs(classifier, job, row),
            }
        except (TypeError, ValueError) as exc:  # an output asked for in a form nothing here writes
            results[job["id"]] = {"error": f"the queued job is malformed: {exc}", "status": 400}
    return BatchOutcome(results, expired, 0, forward_s, elsewhere)


def served_elsewhere(classifier, job):
    """Why a job that names a model (or version) other than this worker's is not answered here;
    None if it may be (during a rollout, the job outlived the version it asked for)."""
    name, version, served = job.get("model"), job.get("version"), model_name(classifier.name)
    if name is not None and name != served:
        return f"model {name} is not served any more (now: {served})"
    if version is not None and version != classifier.version:
        return f"version {version} of {name} is not served any more (now: {classifier.version})"
    return None


def extra_outputs(classifier, job, row):
    """What a job asked for beyond its predictions (see jobqueue.new_job): the probabilities as
    base64 float32 (exact, and a fifth of JSON's size), the classification strings."""
    outputs = {}
    if job.get("probabilities"):
        outputs["probabilities"] = encode_array(row, np.float32)
    if job.get("classification"):
        outputs["classification"] = classifier.classification(row, int(job["classification"]))
    return outputs


class ImageReader:
    """Puts each job's image into a batch buffer, as the model takes it (uint8, its input shape):
    an upload decoded and resized, or raw pixels copied.

    Uploads are decoded here, beside the model, rather than in the web tier: only the upload (a
    fraction of its pixels' bytes) crosses Redis, and only images a batch takes are decoded, not
    those refused or withdrawn later. They decode in a pool of threads (Pillow and OpenCV let go
    of the GIL), within a memory budget (decoding_bytes, with what a progressive JPEG's
    coefficients hold). Each lane has a buffer of its own, made once.
    """

    def __init__(self, input_shape, threads, budget_bytes):
        self.shape = tuple(input_shape)  # (height, width, channels)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="decode")
        self.budget = MemoryBudget(budget_bytes)
        self.local = threading.local()

    def read(self, jobs):
        """(pixels of the jobs that could be read, in a view of this lane's buffer; those jobs;
        {job id: error record} of the others)."""
        buffer = self.buffer(len(jobs))[:len(jobs)]
        if len(jobs) > 1:
            errors = list(self.pool.map(self.read_one, jobs, buffer))
        else:  # a lone image is read here, without a hand-over to the pool and back
            errors = [self.read_one(job, row) for job, row in zip(jobs, buffer)]
        valid = [n for n, error in enumerate(errors) if error is None]
        pixels = buffer if len(valid) == len(jobs) else buffer[valid]
        refusals = {job["id"]: error for job, error in zip(jobs, errors) if error is not None}
        return pixels, [jobs[n] for n in valid], refusals

    def buffer(self, rows):
        """This lane's batch buffer, at least `rows` images long."""
        buffer = getattr(self.local, "buffer", None)
        if buffer is None or len(buffer) < rows:
            buffer = self.local.buffer = np.empty((max(rows, 1), *self.shape), np.uint8)
        return buffer

    def read_one(self, job, row):
        """Put one job's image into `row`; None, or its error record."""
        height, width, channels = self.shape
        try:
            if "shape" in job:
                pixels = np.frombuffer(job["data"], np.uint8)
                if tuple(job["shape"]) != self.shape or pixels.size != row.size:
                    raise ValueError(f"shape {tuple(job['shape'])} is not the model's {self.shape}")
                row[...] = pixels.reshape(self.shape)
                return None
            image = open_image(job["data"], settings.MAX_IMAGE_PIXELS, settings.ALLOWED_FORMATS)
            cost = decode_reduced(image, (width, height), channels)
            with self.budget.reserve(cost, job["deadline"] - jobqueue.CLOCK.offset):
                decode_image(image, job["data"], (width, height), channels, out=row)
            return None
        except ServiceError as refusal:
            return {"error": refusal.message, "status": refusal.status}
        except ValueError as exc:
            return {"error": f"cannot decode the queued image: {exc}", "status": 400}


# --- Heartbeats -----------------------------------------------------------------------------

class Heartbeat:
    """Publishes this worker's heartbeat every HEARTBEAT_INTERVAL_S and re-queues the claimed
    jobs of workers whose heartbeat expired (any live worker may: the first to see one does)."""

    def __init__(self, store, keys, worker_id, fields):
        self.store, self.keys, self.worker_id = store, keys, worker_id
        self.fields = fields  # callable: this worker's state, as heartbeat fields
        self.requeued = 0
        self.claim_ttl_s = settings.REQUEST_TIMEOUT_S + settings.RESULT_TTL_S

    def beat(self):
        """Measure the offset to Redis's clock, publish a heartbeat, then re-queue orphaned
        jobs; raises what Redis raises."""
        metrics.CLOCK_OFFSET.set(jobqueue.CLOCK.measure(self.store))
        jobqueue.publish_heartbeat(self.store, self.keys, self.worker_id,
                                   {**self.fields(), "requeued": self.requeued},
                                   settings.HEARTBEAT_TTL_S, self.claim_ttl_s)
        requeued = jobqueue.requeue_orphans(self.store, self.keys)
        self.requeued += requeued
        metrics.REQUEUED.inc(requeued)

    def try_beat(self):
        """beat(), logging instead of raising; False if it failed."""
        try:
            self.beat()
            return True
        except Exception as exc:  # the thread that beats must outlive any error
            log.warning("heartbeat failed (%s: %s)", type(exc).__name__, exc,
                        exc_info=not isinstance(exc, REDIS_ERRORS))
            return False

    def keep_beating(self, until):
        """Beat every HEARTBEAT_INTERVAL_S until the event `until` is set; after a failure, back
        off (capped)."""
        backoff = Backoff(first_s=settings.HEARTBEAT_INTERVAL_S, cap_s=max(
            settings.HEARTBEAT_INTERVAL_S, settings.HEARTBEAT_TTL_S / 2))
        delay = settings.HEARTBEAT_INTERVAL_S
        while not until.wait(delay):
            if self.try_beat():
                backoff.reset()
                delay = settings.HEARTBEAT_INTERVAL_S
            else:
                delay = backoff.next_delay()

    def stop(self):
        """Deregister: the heartbeat goes, and anything still claimed goes back on the queue."""
        try:
            jobqueue.remove_worker(self.store, self.keys, self.worker_id)
        except REDIS_ERRORS as exc:
            log.warning("could not deregister (Redis unreachable): %s", exc)


# --- The lanes ------------------------------------------------------------------------------

class ModelWorker:
    """Claims batches from the queue, runs one forward pass per batch, answers every job.

    The classifier comes warm, with its batch size chosen. `identity` holds the heartbeat fields
    that name this worker and its model (id, pid, spec, ...).
    """

    def __init__(self, store, classifier, batch_size, identity):
        self.store = store
        self.keys = Keys(settings.IMAGE_QUEUE)
        self.classifier = classifier
        self.batch_size = batch_size
        self.batch_timeout_s = settings.BATCH_TIMEOUT_MS / 1000.0
        self.identity = identity
        self.id = identity["id"]
        self.stats = {"batches": 0, "jobs": 0, "expired": 0, "failed": 0}
        self.meter = DrainMeter()
        self.arrivals = ArrivalRate()
        self.loader_pause = LoaderPause()  # the supervisor names a process loading beside it
        self.lock = threading.Lock()
        self.stopping = threading.Event()  # SIGTERM: claim no more, finish the batches in hand
        self.drained = threading.Event()  # every lane has finished: stop beating
        self.handing_over = False  # stopping for a warm successor (see stop)
        self.beating = None
        # One lane claims at a time, so a backlog is taken as full batches and a lane can tell
        # which claimed jobs no lane holds (left by a claim whose reply was lost).
        self.claim_lock = threading.Lock()
        self.held = set()  # entries of the batches the lanes hold
        self.claims_unsure = False  # a lane failed: the processing list may hold jobs no lane has
        self.claim_ttl_s = settings.REQUEST_TIMEOUT_S + settings.RESULT_TTL_S
        self.heartbeat = Heartbeat(store, self.keys, self.id, self.heartbeat_fields)
        self.images = ImageReader(classifier.input_shape, settings.DECODE_THREADS or len(
            os.sched_getaffinity(0)), settings.DECODE_BUDGET_BYTES)

    def heartbeat_fields(self):
        classifier = self.classifier
        with self.lock:
            stats = dict(self.stats)
        warm = self.handing_over or not self.stopping.is_set()
        return {**self.identity, "model": classifier.name, "version": classifier.version,
                "weights": classifier.weights, "labels": len(classifier.labels),
                "preprocess": classifier.preprocess_name, "batch_size": self.batch_size,
                "runtime": classifier.runtime, "precision": classifier.precision,
                "precision_check": json.dumps(classifier.precision_check), "warm": int(warm),
                "input_shape": ",".join(map(str, classifier.input_shape)),
                "rate": f"{self.meter.rate():.2f}", "batch_s": f"{self.meter.batch_s():.3f}",
                "clock_offset": f"{jobqueue.CLOCK.offset:.3f}",
                jobqueue.JOB_FORMAT_FIELD: jobqueue.JOB_FORMAT, **stats}

    def start_beating(self):
        """Publish the first heartbeat, then beat in a thread until leave()."""
        self.check_redis()
        self.heartbeat.try_beat()
        self.beating = threading.Thread(target=self.heartbeat.keep_beating, args=(self.drained,),
                                        name="heartbeat", daemon=True)
        self.beating.start()

    def run(self):
        """Serve until stop() (SIGTERM, or a hand-over): each lane finishes the batch in hand."""
        log.info("worker %s serving: model %s version %s, batch size %s, %s", self.id,
                 self.classifier.name, self.classifier.version, self.batch_size,
                 self.identity.get("device"))
        lanes = [threading.Thread(target=self.serve, name=f"lane-{n}")
                 for n in range(settings.BATCHES_IN_FLIGHT)]
        for lane in lanes:
            lane.start()
        for lane in lanes:
            lane.join()
        log.info("worker %s stopped after %d batches", self.id, self.stats["batches"])

    def stop(self, successor=False):
        """Claim no more jobs; the lanes finish their batches. With a warm successor about to
        take over, the heartbeat keeps saying warm: the service stays ready throughout."""
        self.handing_over = successor
        self.loader_pause.follow(None)  # the successor must run now
        self.stopping.set()

    def leave(self):
        """Stop beating and deregister (anything still claimed goes back on the queue)."""
        self.drained.set()
        if self.beating:
            self.beating.join()
        self.heartbeat.stop()

    def serve(self):
        """One lane of the worker: claim a batch, answer it, again, until told to stop.

        Lanes share the model. With two, one batch's forward pass overlaps the other's Redis
        round trips and decoding, and when a neighbour (the web tier, say) takes a core from one
        forward pass the other keeps computing; one batch at a time would stall instead.
        """
        backoff = Backoff()
        while not self.stopping.is_set():
            if self.serve_once():
                backoff.reset()
            else:
                backoff.wait("batch lane failed", self.stopping)

    def serve_once(self):
        """Claim one batch (if any comes within a second) and answer it; False if anything failed.

        A lane must outlive any error: it is logged, and the next claim takes back what the
        processing list holds and no lane has (a failed claim may have moved jobs; a failed
        batch left its jobs there).
        """
        claimed, failed = [], True
        try:
            claimed = self.claim()
            if claimed:
                self.answer(claimed)
            failed = False
        except Exception as exc:
            log.warning("batch lane: %s: %s", type(exc).__name__, exc,
                        exc_info=not isinstance(exc, REDIS_ERRORS))
        finally:
            self.release([entry for entry, _ in claimed], failed)
        return not failed

    def claim(self):
        """This lane's next batch, as (entry, body) pairs: jobs that a failed claim left unheld,
        else new ones."""
        with self.claim_lock:
            if self.stopping.is_set():
                return []
            if self.claims_unsure:
                entries = [entry for entry in jobqueue.claimed_jobs(self.store, self.keys, self.id)
                           if entry not in self.held]
                # A batch at most: the rest is taken back by the next claim.
                self.claims_unsure = len(entries) > self.batch_size
                entries = entries[:self.batch_size]
                claimed = jobqueue.take_claimed(self.store, self.keys, self.id, entries,
                                                self.claim_ttl_s) if entries else []
                if claimed:
                    log.warning("recovered %d claimed jobs that no lane held", len(claimed))
            else:
                claimed = jobqueue.claim_batch(self.store, self.keys, self.id, self.batch_size,
                                               1.0, self.claim_ttl_s, self.fill_timer())
                self.arrivals.note(len(claimed))
            self.held.update(entry for entry, _ in claimed)
            return claimed

    def fill_timer(self):
        """claim_batch's time_to_fill: how long a partial batch should wait for more jobs.

        While another lane's forward pass runs, it waits for that pass to end (started beside it,
        it would share the cores with that pass, and a backlog would be split into a full and a
        small batch).
        With the model idle, it waits out BATCH_TIMEOUT_MS only if the recent arrival rate makes
        another job likely within it: at light load a request never waits for company.
        """
        window_end = None

        def time_to_fill(claimed):
            nonlocal window_end
            if not self.meter.wait_idle(0.01):
                return 0.0001  # claim what came meanwhile, then ask again
            if window_end is None:
                expected = self.arrivals.per_second(claimed) * self.batch_timeout_s
                window_end = time.monotonic() + (self.batch_timeout_s if expected >= 1 else 0)
            return window_end - time.monotonic()
        return time_to_fill

    def release(self, entries, failed):
        """Forget a batch that was answered, or that failed: then the next claim recovers what
        the processing list holds and no lane has. Both in one step, or another lane's claim in
        between would see the failed batch still held and recover nothing."""
        with self.claim_lock:
            self.held.difference_update(entries)
            self.claims_unsure = self.claims_unsure or failed

    def answer(self, claimed):
        """Process one claimed batch and store every job's result.

        While Redis is away the results are retried until the last job's deadline: after it
        nobody waits for them.
        """
        jobs = parse_jobs(claimed)
        metered, answered = self.meter.start(), 0
        try:  # a pass that raises must end too: a meter left running holds every partial batch
            with self.loader_pause:
                outcome = process_batch(self.classifier, self.images, jobs, jobqueue.CLOCK.now(),
                                        self.meter.batch_s())
            answered = len(jobs) - len(outcome.expired)
        finally:
            self.meter.finish(metered, answered)
        self.account(outcome, answered)
        passed = self.pass_on(outcome.elsewhere, claimed)
        results = {job_id: {**result, "worker": self.id}
                   for job_id, result in outcome.results.items() if job_id not in passed}
        give_up_at = max((job["deadline"] for job in jobs), default=0)
        backoff = Backoff()
        while True:
            try:
                return jobqueue.store_results(self.store, self.keys, self.id, results,
                                              [entry for entry, _ in claimed
                                               if job_id_of(entry) not in passed],
                                              settings.RESULT_TTL_S)
            except REDIS_ERRORS as exc:
                if jobqueue.CLOCK.now() > give_up_at:
                    raise  # the claims stay: the next claim takes them back, drops them as expired
                backoff.wait(f"cannot store results ({exc})", None)

    def pass_on(self, elsewhere, claimed):
        """Put back on the queue the jobs that name a model version this worker does not serve
        and another live worker does (during a rollout, a job pinned to the version being
        replaced); returns their ids. The others get their 404."""
        if not elsewhere:
            return set()
        served = {(model_name(beat["model"]), beat["version"])
                  for beat in jobqueue.live_workers(self.store, self.keys)
                  if beat.get("warm") == "1" and beat.get("id") != self.id and "model" in beat}
        passed = {job_id for job_id, (model, version) in elsewhere.items()
                  if any(model in (None, name) and version in (None, served_version)
                         for name, served_version in served)}
        if passed:
            jobqueue.requeue_jobs(self.store, self.keys, self.id,
                                  [entry for entry, _ in claimed if job_id_of(entry) in passed])
            log.info("passed %d jobs on to the workers of the version they name", len(passed))
            if len(passed) == len(claimed):  # they may come back at once: not a spin meanwhile
                self.stopping.wait(PASS_ON_PAUSE_S)
        return passed

    def account(self, outcome, answered):
        """Count a processed batch in the heartbeat's figures and the Prometheus metrics."""
        for job_id in outcome.expired:
            log.info("job %s dropped: it cannot be answered before its deadline", job_id)
        metrics.EXPIRED.inc(len(outcome.expired))
        if outcome.forward_s and not outcome.failed:
            metrics.BATCH_SIZE.observe(answered)
            metrics.FORWARD_SECONDS.observe(outcome.forward_s)
        with self.lock:
            self.stats["expired"] += len(outcome.expired)
            self.stats["failed"] += outcome.failed
            if outcome.forward_s and not outcome.failed:
                self.stats["batches"] += 1
                self.stats["jobs"] += answered

    def check_redis(self):
        """Warn when Redis may evict keys: an evicted job or result is a request lost silently."""
        try:
            policy = self.store.info("memory").get("maxmemory_policy", "noeviction")
        except REDIS_ERRORS as exc:
            log.warning("cannot read Redis' maxmemory-policy: %s", exc)
            return
        if policy != "noeviction":
            log.warning("Redis' maxmemory-policy is %s: set noeviction, or jobs and results may be "
                        "evicted under memory pressure and their requests lost", policy)


# A lane that passed its whole batch on waits this long before it claims again.
PASS_ON_PAUSE_S = 0.05


def job_id_of(entry):
    """The id of a job from its entry (the whole job for the format before this one)."""
    return jobqueue.read_job(entry, None)["id"] if entry.startswith(b"{") else \
        entry.split(b":", 1)[0].decode()


def parse_jobs(claimed):
    """The claimed (entry, body) pairs as job dicts (see jobqueue.read_job). One that is not a job
    is logged and left out, as is one whose body has gone with its deadline; both are released
    with the batch."""
    jobs = []
    for entry, body in claimed:
        try:
            job = jobqueue.read_job(entry, body)
        except (ValueError, AttributeError) as exc:
            log.error("dropping a queued item that is not a job (%s): %.80r", exc, entry)
            continue
        if job is None:
            log.info("job %s dropped: its deadline passed before it was claimed", entry)
        else:
            jobs.append(job)
    return jobs


class LoaderPause:
    """Holds a process that loads a new model version (SIGSTOP) while this worker's forward
    passes run, and lets it go on (SIGCONT) between them.

    Even at the lowest CPU priority, a process computing beside a forward pass slows it through
    the shared caches and memory, filling every moment a core waits inside the pass: measured
    here, a loop at SCHED_IDLE raised a bare pass's median by 20-60%; held during passes, by 5%.
    """

    def __init__(self):
        self.lock, self.pid, self.running = threading.Lock(), None, 0

    def follow(self, pid):
        """Hold `pid` from now on (None: nobody); one held at this moment goes on at once."""
        with self.lock:
            if self.running:
                self.signal(signal.SIGCONT)
            self.pid = pid or None

    def __enter__(self):
        with self.lock:
            self.running += 1
            if self.running == 1:
                self.signal(signal.SIGSTOP)

    def __exit__(self, *_):
        with self.lock:
            self.running -= 1
            if self.running == 0:
                self.signal(signal.SIGCONT)

    def signal(self, signum):
        if self.pid:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:  # it ended (refused, or superseded)
                self.pid = None


class DrainMeter:
    """Images per second of busy time and the mean forward pass, over the last batches.

    Lanes overlap: busy time is the time at least one forward pass runs, so two lanes at once
    count once (adding up each pass's own time would halve the rate).
    """

    def __init__(self, window=20, clock=time.monotonic):
        self.lock, self.clock = threading.Lock(), clock
        self.idle = threading.Condition(self.lock)  # notified when the last running pass ends
        self.running, self.busy_since = 0, 0.0
        self.images, self.busy_s = 0, 0.0
        self.marks = collections.deque([(0, 0.0)], maxlen=window + 1)  # (images, busy_s) totals
        self.passes = collections.deque(maxlen=window)  # seconds of the last forward passes

    def start(self):
        """A forward pass begins; returns what finish() needs."""
        with self.lock:
            now = self.clock()
            self.account(now)
            self.running += 1
            return now

    def finish(self, started, images):
        """The forward pass that start() returned `started` for has answered `images` images."""
        with self.lock:
            now = self.clock()
            self.account(now)
            self.running -= 1
            self.passes.append(now - started)
            self.images += images
            self.marks.append((self.images, self.busy_s))
            if not self.running:
                self.idle.notify_all()

    def wait_idle(self, timeout_s):
        """Wait until no forward pass runs, at most timeout_s; True if none runs."""
        with self.lock:
            return self.idle.wait_for(lambda: not self.running, timeout_s)

    def account(self, now):
        if self.running:
            self.busy_s += now - self.busy_since
        self.busy_since = now

    def rate(self):
        """Images per busy second over the window; 0 before any batch."""
        with self.lock:
            (images0, busy0), (images1, busy1) = self.marks[0], self.marks[-1]
        return (images1 - images0) / (busy1 - busy0) if busy1 > busy0 else 0.0

    def batch_s(self):
        """Mean seconds of the last forward passes; 0 before any."""
        with self.lock:
            return sum(self.passes) / len(self.passes) if self.passes else 0.0


class ArrivalRate:
    """Jobs claimed per second over the last horizon_s: how busy the queue has been lately."""

    def __init__(self, horizon_s=1.0, clock=time.monotonic):
        self.horizon_s, self.clock = horizon_s, clock
        self.lock, self.times = threading.Lock(), collections.deque()

    def note(self, jobs):
        with self.lock:
            now = self.clock()
            self.times.extend([now] * jobs)
            self.forget(now)

    def per_second(self, extra=0):
        """The rate, counting `extra` jobs claimed just now (a batch being filled) too."""
        with self.lock:
            self.forget(self.clock())
            return (len(self.times) + extra) / self.horizon_s

    def forget(self, now):
        while self.times and self.times[0] <= now - self.horizon_s:
            self.times.popleft()


class Backoff:
    """Capped, growing waits between retries of a failing Redis call, each one logged."""

    def __init__(self, first_s=0.1, cap_s=2.0):
        self.first_s, self.cap_s, self.delay_s = first_s, cap_s, first_s

    def reset(self):
        self.delay_s = self.first_s

    def next_delay(self):
        """The delay to wait now; the one after it is twice as long, up to the cap."""
        delay, self.delay_s = self.delay_s, min(self.delay_s * 2, self.cap_s)
        return delay

    def wait(self, reason, stop_event):
        log.warning("%s; retrying in %.1f s", reason, self.delay_s)
        delay = self.next_delay()
        if stop_event is not None:
            stop_event.wait(delay)
        else:
            time.sleep(delay)
