"""A worker's heartbeat: what it serves and how fast, refreshed in Redis while it lives."""
import json
import logging

import settings
from serving import metrics
from serving.wire import jobqueue
from serving.wire.connection import CLOCK, REDIS_ERRORS

log = logging.getLogger("keras_server.worker")


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
        metrics.CLOCK_OFFSET.set(CLOCK.measure(self.store))
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
        """Beat every HEARTBEAT_INTERVAL_S until the event `until` is set, after failures too:
        when Redis answers again (after a restart that lost every heartbeat), the web tier, which
        admits requests only while a worker is warm, sees this one within an interval."""
        while not until.wait(settings.HEARTBEAT_INTERVAL_S):
            self.try_beat()

    def stop(self):
        """Deregister: the heartbeat goes, and anything still claimed goes back on the queue."""
        try:
            jobqueue.remove_worker(self.store, self.keys, self.worker_id)
        except REDIS_ERRORS as exc:
            log.warning("could not deregister (Redis unreachable): %s", exc)


def model_fields(classifier):
    """What a heartbeat says of the model a worker serves (GET /model and /readyz show it)."""
    return {"model": classifier.name, "version": classifier.version,
            "weights": classifier.weights, "labels": len(classifier.labels),
            "preprocess": classifier.preprocess_name, "runtime": classifier.runtime,
            "precision": classifier.precision,
            "precision_check": json.dumps(classifier.precision_check),
            "input_shape": ",".join(map(str, classifier.input_shape))}
