"""The model worker: claims batches from the queue, one forward pass per batch, answers every job.

- `process_batch`: a claimed batch in, every job's answer out. Pure: no Redis, no clock of its own.
- `ModelWorker`: the lanes that claim a batch, process it and store the results, until SIGTERM.
Its parts live beside it: heartbeat.py (alive, and how it does), reader.py (uploads into the batch
buffer), meters.py (drain and arrival rates for the fill window), loader_pause.py. Loading a model
is loader.py's, choosing the batch size batch_size.py's; switching between model versions is
serving.rollout's (each version runs in a process of its own)."""
import logging
import os
import threading
import time
from typing import NamedTuple

import numpy as np

import settings
from serving import metrics
from serving.model.claims import Claims
from serving.model.heartbeat import Heartbeat, model_fields
from serving.model.loader_pause import LoaderPause
from serving.model.meters import Backoff, FillWindow
from serving.model.reader import ImageReader
from serving.text import model_name
from serving.wire import job_format, jobqueue
from serving.wire.connection import CLOCK, REDIS_ERRORS
from serving.wire.job_format import encode_array
from serving.wire.keys import Keys

log = logging.getLogger("keras_server.worker")


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
    """What a job asked for beyond its predictions (see job_format.new_job): the probabilities as
    base64 float32 (exact, and a fifth of JSON's size), the classification strings."""
    outputs = {}
    if job.get("probabilities"):
        outputs["probabilities"] = encode_array(row, np.float32)
    if job.get("classification"):
        outputs["classification"] = classifier.classification(row, int(job["classification"]))
    return outputs


class ModelWorker:
    """Claims batches from the queue, runs one forward pass per batch, answers every job.

    The classifier comes warm, with its batch size chosen. `identity` holds the heartbeat fields
    that name this worker and its model (id, pid, spec, ...).
    """

    def __init__(self, store, classifier, batch_size, identity):
        self.store = store
        self.keys = Keys(settings.IMAGE_QUEUE)
        self.classifier = classifier
        self.model_fields = model_fields(classifier)
        self.batch_size = batch_size
        self.identity = identity
        self.id = identity["id"]
        self.tally = Tally()
        self.fill = FillWindow(settings.BATCH_TIMEOUT_MS / 1000.0)
        self.claims = Claims(store, self.keys, self.id, batch_size, self.fill)
        self.loader_pause = LoaderPause()  # the supervisor names a process loading beside it
        self.stopping = threading.Event()  # SIGTERM: claim no more, finish the batches in hand
        self.finished = threading.Event()  # every lane has finished its last batch
        self.drained = threading.Event()  # ... and the worker leaves: stop beating
        self.handing_over = False  # stopping for a warm successor (see stop)
        self.beating = None
        self.heartbeat = Heartbeat(store, self.keys, self.id, self.heartbeat_fields)
        self.images = ImageReader(classifier.input_shape, settings.DECODE_THREADS or len(
            os.sched_getaffinity(0)), settings.DECODE_BUDGET_BYTES)

    def heartbeat_fields(self):
        warm = self.handing_over or not self.stopping.is_set()
        return {**self.identity, **self.model_fields, "batch_size": self.batch_size,
                "warm": int(warm), "rate": f"{self.fill.drain.rate():.2f}",
                "batch_s": f"{self.fill.drain.batch_s():.3f}",
                "clock_offset": f"{CLOCK.offset:.3f}",
                job_format.JOB_FORMAT_FIELD: job_format.JOB_FORMAT, **self.tally.snapshot()}

    def start_beating(self):
        """Publish the first heartbeat, then beat in a thread until leave()."""
        warn_if_redis_may_evict(self.store)
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
        self.finished.set()
        log.info("worker %s stopped after %d batches", self.id, self.tally.snapshot()["batches"])

    def stop(self, successor=False):
        """Claim no more jobs; the lanes finish their batches. For a warm successor, the heartbeat
        keeps saying warm, and this returns once the lanes have finished: the successor may claim,
        and its first passes do not share the cores with this worker's last ones."""
        self.handing_over = successor
        self.loader_pause.follow(None)  # the successor must run now
        self.stopping.set()
        if successor:
            self.finished.wait()

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
            claimed = self.claims.claim(self.stopping)
            if claimed:
                self.answer(claimed)
            failed = False
        except Exception as exc:
            log.warning("batch lane: %s: %s", type(exc).__name__, exc,
                        exc_info=not isinstance(exc, REDIS_ERRORS))
        finally:
            self.claims.release([entry for entry, _ in claimed], failed)
        return not failed

    def answer(self, claimed):
        """Process one claimed batch and store every job's result (see store_answers)."""
        jobs, gone = parse_jobs(claimed)
        metered, answered = self.fill.drain.start(), 0
        try:  # a pass that raises must end too: a meter left running holds every partial batch
            with self.loader_pause:
                outcome = process_batch(self.classifier, self.images, jobs, CLOCK.now(),
                                        self.fill.drain.batch_s())
            answered = len(jobs) - len(outcome.expired)
        finally:
            self.fill.drain.finish(metered, answered)
        self.tally.add(outcome._replace(expired=outcome.expired + gone), answered)
        passed = pass_on(self.store, self.keys, self.id, outcome.elsewhere, claimed)
        if passed and len(passed) == len(claimed):  # they may come back at once: not a spin
            self.stopping.wait(PASS_ON_PAUSE_S)
        store_answers(self.store, self.keys, self.id, claimed, jobs, outcome.results, passed)


# A lane that passed its whole batch on waits this long before it claims again.
PASS_ON_PAUSE_S = 0.05


def job_id_of(entry):
    """The id of a job from its entry (the whole job for the format before this one)."""
    return jobqueue.body_id(entry) or job_format.read_job(entry, None)["id"]


def parse_jobs(claimed):
    """The claimed (entry, body) pairs as job dicts (see job_format.read_job), and the ids of those
    whose body has gone with their deadline (expired: a body lives to its job's deadline). One
    that is not a job is logged and left out. All are released with the batch."""
    jobs, gone = [], []
    for entry, body in claimed:
        try:
            job = job_format.read_job(entry, body)
        except (ValueError, AttributeError) as exc:
            log.error("dropping a queued item that is not a job (%s): %.80r", exc, entry)
            continue
        if job is None:
            gone.append(job_id_of(entry))
        else:
            jobs.append(job)
    return jobs, gone



class Tally:
    """A worker's counts for its heartbeat (batches, jobs, expired, failed), and the Prometheus
    metrics of each processed batch."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {"batches": 0, "jobs": 0, "expired": 0, "failed": 0}

    def add(self, outcome, answered):
        for job_id in outcome.expired:
            log.info("job %s dropped: it cannot be answered before its deadline", job_id)
        metrics.EXPIRED.inc(len(outcome.expired))
        if outcome.forward_s and not outcome.failed:
            metrics.BATCH_SIZE.observe(answered)
            metrics.FORWARD_SECONDS.observe(outcome.forward_s)
        with self.lock:
            self.counts["expired"] += len(outcome.expired)
            self.counts["failed"] += outcome.failed
            if outcome.forward_s and not outcome.failed:
                self.counts["batches"] += 1
                self.counts["jobs"] += answered

    def snapshot(self):
        with self.lock:
            return dict(self.counts)


def store_answers(store, keys, worker_id, claimed, jobs, results, passed):
    """Store the results of a batch's jobs and release their entries, all but those passed on to
    another worker. While Redis is away they are retried until the last job's deadline: after it
    nobody waits for them (the claims stay: the next claim takes them back and drops them as
    expired)."""
    results = {job_id: {**result, "worker": worker_id}
               for job_id, result in results.items() if job_id not in passed}
    entries = [entry for entry, _ in claimed if job_id_of(entry) not in passed]
    give_up_at = max((job["deadline"] for job in jobs), default=0)
    backoff = Backoff()
    while True:
        try:
            return jobqueue.store_results(store, keys, worker_id, results, entries,
                                          settings.RESULT_TTL_S)
        except REDIS_ERRORS as exc:
            if CLOCK.now() > give_up_at:
                raise
            backoff.wait(f"cannot store results ({exc})", None)


def pass_on(store, keys, worker_id, elsewhere, claimed):
    """Put back on the queue the jobs that name a model version this worker does not serve and
    another live worker does (during a rollout, a job pinned to the version being replaced);
    returns their ids. The others get their 404."""
    if not elsewhere:
        return set()
    served = {(model_name(beat["model"]), beat["version"])
              for beat in jobqueue.live_workers(store, keys)
              if beat.get("warm") == "1" and beat.get("id") != worker_id and "model" in beat}
    passed = {job_id for job_id, (model, version) in elsewhere.items()
              if any(model in (None, name) and version in (None, served_version)
                     for name, served_version in served)}
    if passed:
        jobqueue.requeue_jobs(store, keys, worker_id,
                              [entry for entry, _ in claimed if job_id_of(entry) in passed])
        log.info("passed %d jobs on to the workers of the version they name", len(passed))
    return passed


def warn_if_redis_may_evict(store):
    """Warn when Redis may evict keys: an evicted job or result is a request lost silently."""
    try:
        policy = store.info("memory").get("maxmemory_policy", "noeviction")
    except REDIS_ERRORS as exc:
        log.warning("cannot read Redis' maxmemory-policy: %s", exc)
        return
    if policy != "noeviction":
        log.warning("Redis' maxmemory-policy is %s: set noeviction, or jobs and results may be "
                    "evicted under memory pressure and their requests lost", policy)
