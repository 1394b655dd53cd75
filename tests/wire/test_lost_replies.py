"""Replies lost on the way back from Redis: a real redis-server behind a TCP proxy that lets one
command run and then cuts the connection instead of passing its reply on. No step may then run
twice, strand a job or drop a result.
"""
import json
import socket
import threading
import time

import numpy as np
import pytest
import redis

from serving.wire import job_format
from serving.wire import jobqueue
from serving.wire.connection import connect_redis
import settings
from conftest import distinct_images, tiny_direct
from serving.wire.keys import Keys


class LossyProxy:
    """TCP proxy to Redis; after lose_next_reply(), the next reply from Redis is not passed on:
    the client's connection is cut instead (the command has run)."""

    def __init__(self, port):
        self.upstream_port = port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.armed = threading.Event()
        self.lost = threading.Event()
        threading.Thread(target=self.accept, daemon=True).start()

    def lose_next_reply(self):
        self.lost.clear()
        self.armed.set()

    def accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self.pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self.pump, args=(server, client, True), daemon=True).start()

    def pump(self, source, target, replies):
        try:
            while data := source.recv(65536):
                if replies and self.armed.is_set():
                    self.armed.clear()
                    self.lost.set()
                    break
                target.sendall(data)
        except OSError:
            pass
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def close(self):
        self.listener.close()


@pytest.fixture
def lossy(redis_server, redis_client):
    proxy = LossyProxy(redis_server["port"])
    client = connect_redis(f"redis://127.0.0.1:{proxy.port}/0")
    client.ping()  # connected: the reply lost next is a command's, not the handshake's
    yield client, proxy
    proxy.close()


def load_scripts(store):
    """Have Redis know the queue's scripts, so the reply lost is the command's, not NOSCRIPT's."""
    for script in (jobqueue.ENQUEUE, jobqueue.TAKE, jobqueue.ANSWER, jobqueue.WITHDRAW):
        store.script_load(script.source)


def new_job(deadline_s=30):
    return job_format.new_job(np.zeros((32, 32, 3), np.uint8), time.time() + deadline_s, 3,
                            (32, 32, 3))


def test_a_push_whose_reply_is_lost_is_withdrawn_before_the_error_goes_on(
        lossy, store, redis_client, keys):
    client, proxy = lossy
    load_scripts(store)
    redis_client.config_resetstat()
    proxy.lose_next_reply()
    with pytest.raises(redis.ConnectionError):
        jobqueue.enqueue_jobs(client, keys, [new_job()], 100, 10**9)
    assert proxy.lost.is_set()
    stats = redis_client.info("commandstats")
    assert stats["cmdstat_rpush"]["calls"] == 1 and stats["cmdstat_lrem"]["calls"] == 1
    assert redis_client.llen(keys.queue) == 0  # the client was told it failed: no job is left
    assert not redis_client.keys(keys.job("*")) or all(
        redis_client.ttl(key) > 0 for key in redis_client.keys(keys.job("*")))
    assert int(redis_client.get(keys.queued_bytes) or 0) == 0


def test_a_result_whose_reply_is_lost_can_be_read_again(lossy, store, keys):
    client, proxy = lossy
    job = new_job()
    jobqueue.enqueue_jobs(store, keys, [job], 100, 10**9)
    jobqueue.store_results(store, keys, "w", {job.id: {"answer": 42}}, [], 60)

    proxy.lose_next_reply()
    with pytest.raises(redis.ConnectionError):
        jobqueue.wait_for_result(client, keys, job, time.time() + 5)
    assert proxy.lost.is_set()
    assert jobqueue.wait_for_result(client, keys, job, time.time() + 5) == {"answer": 42}


def test_results_stored_again_after_a_lost_reply_are_not_doubled(lossy, redis_client, keys):
    client, proxy = lossy
    job = new_job()
    proxy.lose_next_reply()
    with pytest.raises(redis.ConnectionError):
        jobqueue.store_results(client, keys, "w", {job.id: {"answer": 1}}, [], 60)
    jobqueue.store_results(client, keys, "w", {job.id: {"answer": 1}}, [], 60)
    assert redis_client.lrange(keys.result(job.id), 0, -1) == [json.dumps({"answer": 1})]


def test_jobs_whose_claim_reply_is_lost_are_answered_once_by_the_next_claim(
        lossy, store, redis_client, tiny_model):
    from serving.model.loader import load_classifier
    from serving.model.worker import ModelWorker

    client, proxy = lossy
    keys = Keys(settings.IMAGE_QUEUE)
    classifier = load_classifier(tiny_model["MODEL"], "none", tiny_model["LABELS"], "scale_0_1")
    worker = ModelWorker(client, classifier, 8, {"id": "lossy-worker"})
    images = distinct_images(3)
    jobs = [job_format.new_job(data, time.time() + 30, 10) for data in images]
    for job in jobs:
        jobqueue.enqueue_jobs(store, keys, [job], 100, 10**9)
    load_scripts(store)

    proxy.lose_next_reply()  # the claim moves a job into the processing list; its reply is lost
    assert worker.serve_once() is False
    assert proxy.lost.is_set() and redis_client.llen(keys.queue) < 3
    assert worker.serve_once() and worker.serve_once()  # the one taken back, then the rest

    assert redis_client.llen(keys.queue) == 0
    assert redis_client.llen(keys.processing(worker.id)) == 0 and not worker.claims.held
    assert not redis_client.keys(keys.job("*"))  # every body released with its answer
    for job, data in zip(jobs, images):
        results = redis_client.lrange(keys.result(job.id), 0, -1)
        assert len(results) == 1
        got = {p["label"]: p["probability"] for p in json.loads(results[0])["predictions"]}
        expected = tiny_direct(tiny_model, data)
        assert all(abs(p - expected[int(label.split("_")[1])]) < 1e-5 for label, p in got.items())


def test_claims_taken_back_come_a_batch_at_a_time(store, redis_client, tiny_model):
    # Claims whose replies were lost pile up in the processing list: taken back, they make
    # batches of BATCH_SIZE at most (a larger one would be a batch size the model never warmed up
    # for), and the rest comes with the next claim.
    from serving.model.loader import load_classifier
    from serving.model.worker import ModelWorker

    keys = Keys(settings.IMAGE_QUEUE)
    classifier = load_classifier(tiny_model["MODEL"], "none", tiny_model["LABELS"], "scale_0_1")
    worker = ModelWorker(store, classifier, 4, {"id": "recovering"})
    jobs = [job_format.new_job(data, time.time() + 30, 3) for data in distinct_images(6)]
    jobqueue.enqueue_jobs(store, keys, jobs, 100, 10**9)
    while redis_client.lmove(keys.queue, keys.processing(worker.id)):  # claimed, replies lost
        pass
    worker.claims.unsure = True

    sizes = []
    for _ in range(2):
        assert worker.serve_once()
        sizes.append(worker.tally.snapshot()["jobs"] - sum(sizes))
    assert sizes == [4, 2]
    assert redis_client.llen(keys.processing(worker.id)) == 0
    assert all(redis_client.exists(keys.result(job.id)) for job in jobs)
