"""A worker's claims on the queue, shared by its lanes.

One lane claims at a time, so a backlog is taken as full batches and a lane can tell which claimed
jobs no lane holds: those left in the worker's processing list by a claim whose reply was lost, or
by a batch that failed. After any failure the next claim takes those back before new ones."""
import logging
import threading

import settings
from serving.wire import jobqueue

log = logging.getLogger("keras_server.worker")


class Claims:
    """Claims batches for the lanes of one worker, and recovers what no lane holds."""

    def __init__(self, store, keys, worker_id, batch_size, fill):
        self.store, self.keys, self.worker_id = store, keys, worker_id
        self.batch_size, self.fill = batch_size, fill
        self.lock = threading.Lock()
        self.held = set()  # entries of the batches the lanes hold
        self.unsure = False  # a lane failed: the processing list may hold jobs no lane has
        self.ttl_s = settings.REQUEST_TIMEOUT_S + settings.RESULT_TTL_S

    def claim(self, stopping):
        """A lane's next batch, as (entry, body) pairs: jobs that a failed claim left unheld,
        else new ones (none once `stopping` is set)."""
        with self.lock:
            if stopping.is_set():
                return []
            if self.unsure:
                entries = [entry for entry in jobqueue.claimed_jobs(self.store, self.keys,
                                                                    self.worker_id)
                           if entry not in self.held]
                # A batch at most: the rest is taken back by the next claim.
                self.unsure = len(entries) > self.batch_size
                entries = entries[:self.batch_size]
                claimed = jobqueue.take_claimed(self.store, self.keys, self.worker_id, entries,
                                                self.ttl_s) if entries else []
                if claimed:
                    log.warning("recovered %d claimed jobs that no lane held", len(claimed))
            else:
                claimed = jobqueue.claim_batch(self.store, self.keys, self.worker_id,
                                               self.batch_size, 1.0, self.ttl_s,
                                               self.fill.timer())
                self.fill.arrivals.note(len(claimed))
            self.held.update(entry for entry, _ in claimed)
            return claimed

    def release(self, entries, failed):
        """Forget a batch that was answered, or that failed: then the next claim recovers what
        the processing list holds and no lane has. Both in one step, or another lane's claim in
        between would see the failed batch still held and recover nothing."""
        with self.lock:
            self.held.difference_update(entries)
            self.unsure = self.unsure or failed
