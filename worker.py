"""The model worker: claims batches from the queue, one forward pass per batch, answers every job.

The loop reads as a sentence: claim a batch, decode, predict, store the results. Everything it
touches (Redis, the classifier) is handed in, so tests run the real loop against a real Redis.
"""
import binascii
import collections
import json
import logging
import os
import socket
import statistics
import sys
import threading
import time
import uuid

import numpy as np

import jobqueue
import metrics
import settings
from helpers import Keys, decode_array
from jobqueue import REDIS_ERRORS

log = logging.getLogger("keras_server.worker")


class ModelWorker:
    """Claims batches from the queue, runs one forward pass per batch, answers every job."""

    def __init__(self, store, classifier):
        self.store = store
        self.keys = Keys(settings.IMAGE_QUEUE)
        self.classifier = classifier
        self.batch_size = settings.BATCH_SIZE  # "auto" until warm_up measures it
        self.batch_timeout_s = settings.BATCH_TIMEOUT_MS / 1000.0
        self.id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.input_shape = input_shape(classifier)
        self.stats = {"batches": 0, "jobs": 0, "expired": 0, "failed": 0, "requeued": 0}
        self.meter = DrainMeter()
        self.arrivals = ArrivalRate()
        self.warm = False
        self.next_classifier, self.loading_version = None, None
        self.lock = threading.Lock()
        self.stopping = threading.Event()  # SIGTERM: claim no more, finish the batches in hand
        self.drained = threading.Event()  # every lane has finished: stop beating
        # One lane claims at a time, so a backlog is taken as full batches and a lane can tell
        # which claimed jobs no lane holds (left by a claim whose reply was lost).
        self.claim_lock = threading.Lock()
        self.held = set()  # payloads of the batches the lanes hold
        self.claims_unsure = False  # a lane failed: the processing list may hold jobs no lane has
        self.claim_ttl_s = settings.REQUEST_TIMEOUT_S + settings.RESULT_TTL_S

    def heartbeat_fields(self):
        return {"id": self.id, "pid": os.getpid(), "model": self.classifier.name,
                "version": self.classifier.version, "weights": self.classifier.weights,
                "labels": len(self.classifier.labels),
                "preprocess": self.classifier.preprocess_name, "batch_size": self.batch_size,
                "device": self.device, "runtime": self.classifier.runtime,
                "warm": int(self.warm and not self.stopping.is_set()),
                "input_shape": ",".join(map(str, self.input_shape)),
                "rate": f"{self.meter.rate():.2f}", "batch_s": f"{self.meter.batch_s():.3f}",
                **self.stats}

    def beat(self):
        """Publish a heartbeat and re-queue the jobs of workers that stopped beating.

        Any error is logged and raised: keep_beating backs off and tries again.
        """
        jobqueue.publish_heartbeat(self.store, self.keys, self.id, self.heartbeat_fields(),
                                   settings.HEARTBEAT_TTL_S, self.claim_ttl_s)
        requeued = jobqueue.requeue_orphans(self.store, self.keys)
        self.count(requeued=requeued)
        metrics.REQUEUED.inc(requeued)
        self.follow_reloads()

    def follow_reloads(self):
        """Start loading the model that `reload` asked for, if it is not the one served."""
        spec = jobqueue.wanted_model(self.store, self.keys)
        if not self.warm or not spec or spec["version"] in (self.classifier.version,
                                                           self.loading_version):
            return
        self.loading_version = spec["version"]
        threading.Thread(target=self.load_next, args=(spec,), name="reload", daemon=True).start()

    def load_next(self, spec):
        """Load and warm up the next model beside the one serving; the loop swaps between batches.

        A model with another input shape is refused: jobs already queued were resized for this
        one. Serve such a model on a queue of its own.
        """
        # Loading and tracing hold the CPU and the GIL for long stretches: this thread yields the
        # CPU to the serving lanes (Linux sets nice per thread) and the GIL changes hands every
        # 0.5 ms instead of 5, so a reload does not stall the requests being served.
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(0.0005)
        try:
            candidate = load_model(spec)
            shape = input_shape(candidate)
            if shape != self.input_shape:
                raise ValueError(f"its input {shape} differs from the served {self.input_shape}")
            for size in sorted({1, self.batch_size}):
                candidate.predict_batch(np.zeros((size, *shape), np.uint8))
        except Exception as exc:  # a bad model must never stop the one serving
            log.error("reload to version %s refused: %s", spec["version"], exc)
            return
        finally:
            sys.setswitchinterval(switch_interval)
        self.next_classifier = candidate
        log.info("version %s loaded and warm; switching after the batch in hand", spec["version"])

    def switch_model(self):
        """Serve the model load_next prepared, from the next batch on."""
        with self.lock:  # the first lane to see it switches
            if self.next_classifier is None:
                return
            old, self.classifier, self.next_classifier = (self.classifier, self.next_classifier,
                                                          None)
        log.info("worker %s now serves version %s (was %s)", self.id, self.classifier.version,
                 old.version)
        self.try_beat()

    def try_beat(self):
        """beat(), logging instead of raising; False if it failed."""
        try:
            self.beat()
            return True
        except Exception as exc:  # the thread that beats must outlive any error
            log.warning("heartbeat failed (%s: %s)", type(exc).__name__, exc,
                        exc_info=not isinstance(exc, REDIS_ERRORS))
            return False

    def keep_beating(self):
        """Beat every HEARTBEAT_INTERVAL_S until the lanes have drained, also while they finish
        their last batches after SIGTERM (a silent worker's claims would be re-queued and computed
        twice); after a failure, back off (capped)."""
        backoff = Backoff(first_s=settings.HEARTBEAT_INTERVAL_S, cap_s=max(
            settings.HEARTBEAT_INTERVAL_S, settings.HEARTBEAT_TTL_S / 2))
        delay = settings.HEARTBEAT_INTERVAL_S
        while not self.drained.wait(delay):
            if self.try_beat():
                backoff.reset()
                delay = settings.HEARTBEAT_INTERVAL_S
            else:
                delay = backoff.next_delay()

    def warm_up(self):
        """Forward passes at the batch sizes the loop will meet first (choosing the size when it
        is `auto`), before taking any job."""
        if self.batch_size == "auto":
            self.batch_size = choose_batch_size(self.classifier, self.input_shape,
                                                settings.REQUEST_TIMEOUT_S / 10)
        for size in sorted({1, self.batch_size}):
            self.classifier.predict_batch(np.zeros((size, *self.input_shape), np.uint8))
        self.warm = True
        log.info("worker %s warm: model %s, batch size %s, device %s", self.id,
                 self.classifier.name, self.batch_size, self.device)

    def run(self):
        """Serve until SIGTERM/SIGINT: each lane finishes the batch in hand."""
        from classifier import device_name

        self.device = device_name()
        self.check_redis()
        self.try_beat()
        beating = threading.Thread(target=self.keep_beating, name="heartbeat", daemon=True)
        beating.start()
        self.warm_up()
        self.try_beat()
        lanes = [threading.Thread(target=self.serve, name=f"lane-{n}")
                 for n in range(settings.BATCHES_IN_FLIGHT)]
        for lane in lanes:
            lane.start()
        for lane in lanes:
            lane.join()
        self.stopping.set()
        self.drained.set()
        beating.join()
        self.leave()

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
        if self.next_classifier is not None:
            self.switch_model()
        payloads = []
        try:
            payloads = self.claim()
            if payloads:
                self.answer(payloads)
            return True
        except Exception as exc:
            log.warning("batch lane: %s: %s", type(exc).__name__, exc,
                        exc_info=not isinstance(exc, REDIS_ERRORS))
            self.claims_unsure = True
            return False
        finally:
            self.release(payloads)

    def claim(self):
        """This lane's next batch: jobs that a failed claim left unheld, else new ones."""
        with self.claim_lock:
            if self.stopping.is_set():
                return []
            if self.claims_unsure:
                payloads = [p for p in jobqueue.claimed_jobs(self.store, self.keys, self.id)
                            if p not in self.held]
                self.claims_unsure = False
                if payloads:
                    log.warning("recovered %d claimed jobs that no lane held", len(payloads))
            else:
                payloads = jobqueue.claim_batch(self.store, self.keys, self.id, self.batch_size,
                                                1.0, self.claim_ttl_s, self.fill_timer())
                self.arrivals.note(len(payloads))
            self.held.update(payloads)
            return payloads

    def fill_timer(self):
        """claim_batch's time_to_fill: how long a partial batch should wait for more jobs.

        While another lane's forward pass runs, it waits for that pass to end (started beside it,
        it would take half the cores, and a backlog would be split into a full and a small batch).
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

    def release(self, payloads):
        """Forget a batch that was answered (or will be recovered from the processing list)."""
        if payloads:
            with self.claim_lock:
                self.held.difference_update(payloads)

    def answer(self, payloads):
        """Classify one claimed batch and store every job's result.

        While Redis is away the results are retried until the last job's deadline: after it
        nobody waits for them.
        """
        jobs = parse_jobs(payloads)
        results = self.process(jobs)
        give_up_at = max((job["deadline"] for job in jobs), default=0)
        backoff = Backoff()
        while True:
            try:
                return jobqueue.store_results(self.store, self.keys, self.id, results,
                                              payloads, settings.RESULT_TTL_S)
            except REDIS_ERRORS as exc:
                if time.time() > give_up_at:
                    raise  # the claims stay: the next claim takes them back, drops them as expired
                backoff.wait(f"cannot store results ({exc})", None)

    def process(self, jobs):
        """Results by job id for one batch: predictions, or an error record per failed job.

        Jobs that cannot be answered before their deadline (it passes before a forward pass would
        end) are dropped unanswered: their clients get 504 without the model spending time on them.
        """
        claimed_at = time.time()
        classifier = self.classifier  # one model for the whole batch, even if a reload lands
        valid, pixels, results = [], [], {}
        for job in jobs:
            if job["deadline"] <= claimed_at + self.meter.batch_s():
                self.count(expired=1)
                metrics.EXPIRED.inc()
                log.info("job %s dropped: it cannot be answered before its deadline", job["id"])
                continue
            try:
                pixels.append(self.decode(job))
            except (ValueError, TypeError, binascii.Error) as exc:
                results[job["id"]] = {"error": f"cannot decode the queued image: {exc}",
                                      "status": 400}
                continue
            valid.append(job)
        if valid:
            results.update(self.predict(classifier, valid, np.stack(pixels), claimed_at))
        return results

    def decode(self, job):
        pixels = decode_array(job["image"], job["shape"])
        if pixels.shape != self.input_shape:
            raise ValueError(f"shape {tuple(pixels.shape)} is not the model's {self.input_shape}")
        return pixels

    def predict(self, classifier, jobs, batch, claimed_at):
        """One forward pass for the whole batch; a failure answers every job with an error."""
        started = time.perf_counter()
        metered = self.meter.start()
        try:
            probabilities = classifier.predict_batch(batch)
        except Exception as exc:
            log.exception("forward pass failed for a batch of %d", len(jobs))
            self.count(failed=len(jobs))
            return {job["id"]: {"error": f"inference failed: {exc}", "status": 500} for job in jobs}
        finally:
            self.meter.finish(metered, len(jobs))
        inference_s = time.perf_counter() - started
        inference_ms = inference_s * 1000
        metrics.BATCH_SIZE.observe(len(jobs))
        metrics.FORWARD_SECONDS.observe(inference_s)
        self.count(batches=1, jobs=len(jobs))
        log.debug("batch of %d in %.1f ms", len(jobs), inference_ms)
        return {
            job["id"]: {
                "predictions": classifier.top_predictions(row, job["top_k"]),
                "batch_size": len(jobs),
                "inference_ms": inference_ms,
                "queue_wait_ms": max(0.0, claimed_at - job["enqueued_at"]) * 1000,
                "worker": self.id,
                "model_version": classifier.version,
            }
            for job, row in zip(jobs, probabilities)
        }

    def count(self, **increments):
        """Add to the counters the heartbeat reports; lanes and the heartbeat share them."""
        with self.lock:
            for name, n in increments.items():
                self.stats[name] += n

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

    def leave(self):
        try:
            jobqueue.remove_worker(self.store, self.keys, self.id)
        except REDIS_ERRORS as exc:
            log.warning("could not deregister (Redis unreachable): %s", exc)
        log.info("worker %s stopped after %d batches", self.id, self.stats["batches"])


def model_spec_from_settings():
    """The model the settings name; a `reload` recorded in Redis takes precedence over it."""
    return {"model": settings.MODEL, "weights": settings.MODEL_WEIGHTS, "labels": settings.LABELS,
            "preprocess": settings.PREPROCESS, "version": settings.MODEL_VERSION}


def load_model(spec):
    """Load the classifier a model spec describes (raises classifier.ModelLoadError)."""
    from classifier import load_classifier

    return load_classifier(spec["model"], spec["weights"], spec["labels"], spec["preprocess"],
                           settings.MODEL_SEED, settings.MODEL_THREADS, spec["version"],
                           settings.RUNTIME, settings.OPENVINO_CACHE_DIR)


def input_shape(classifier):
    """(height, width, channels) of a classifier's input."""
    return classifier.size[1], classifier.size[0], classifier.channels


# BATCH_SIZE=auto: sizes 1, 2, 4, ... are added while one round of them takes at most
# AUTO_ROUND_S; AUTO_ROUNDS interleaved rounds time them all. Start-up pays at most about
# (AUTO_ROUNDS + 2) x AUTO_ROUND_S (two untimed passes per size first).
AUTO_ROUNDS = 7
AUTO_ROUND_S = 2.0
AUTO_TOLERANCE = 0.03  # sizes this close to the best median throughput count as tied


def choose_batch_size(classifier, input_shape, time_limit_s, largest=256):
    """Time batch sizes in interleaved rounds; the largest size whose median images/s is within
    AUTO_TOLERANCE of the best wins.

    Rounds alternate their order, so a drift of the machine's speed touches every size alike, and
    medians over rounds ignore a stall in one of them. Medians still differ by a few per cent
    between sizes of equal speed, and the sizes that are truly slower are the small ones, where
    throughput still climbs steeply: taking the largest of the tied sizes keeps the choice on the
    plateau, where a noisy timing can only swap sizes of the same speed. Sizes stop at largest, at
    a batch slower than time_limit_s, or when a round would pass AUTO_ROUND_S.
    """
    rng = np.random.default_rng(0)
    batches, round_s = {}, 0.0
    size = 1
    while size <= largest:
        batch = rng.integers(0, 256, (size, *input_shape), np.uint8)
        classifier.predict_batch(batch)  # the first pass at a new shape builds kernels
        seconds = time_call(classifier.predict_batch, batch)
        if batches and (seconds > time_limit_s or round_s + seconds > AUTO_ROUND_S):
            break
        batches[size], round_s = batch, round_s + seconds
        size *= 2
    rates = {n: [] for n in batches}
    for number in range(AUTO_ROUNDS):
        for n in (batches if number % 2 == 0 else reversed(batches)):
            rates[n].append(n / time_call(classifier.predict_batch, batches[n]))
    medians = {n: statistics.median(r) for n, r in rates.items()}
    best = max(medians.values())
    chosen = max(n for n in medians if medians[n] >= (1 - AUTO_TOLERANCE) * best)
    log.info("BATCH_SIZE=auto chose %d; medians of %d rounds:\n%s", chosen, AUTO_ROUNDS,
             "\n".join(f"  {n:4d} images  {n / rate * 1000:8.1f} ms  {rate:8.1f} img/s  "
                       f"{rate / best:6.3f} of the best{'  <- chosen' if n == chosen else ''}"
                       for n, rate in medians.items()))
    return chosen


def time_call(function, *args):
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started


def parse_jobs(payloads):
    """The claimed payloads as job dicts; one that is not a job is logged and left out."""
    jobs = []
    for payload in payloads:
        try:
            job = json.loads(payload)
            if not {"id", "image", "shape", "deadline", "top_k"} <= job.keys():
                raise ValueError(f"missing fields: {sorted(job)}")
        except (ValueError, AttributeError) as exc:
            log.error("dropping a queued item that is not a job (%s): %.80r", exc, payload)
            continue
        jobs.append(job)
    return jobs


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
