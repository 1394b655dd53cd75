"""The Redis protocol between handlers and workers, against the real test redis-server."""
import json
import threading
import time

import pytest

import jobqueue
from helpers import ServiceError, encode_array, prepare_image
from conftest import QUEUE, image_bytes, post_image, tiny_settings, wait_until


def push(redis_client, keys, count, deadline_s=30):
    jobs = [jobqueue.new_job("AAAA", (1, 1, 3), time.time() + deadline_s, 5) for _ in range(count)]
    for job in jobs:
        jobqueue.enqueue_job(redis_client, keys, job, 1000, 10**9)
    return jobs


def window(seconds):
    """A claim_batch time_to_fill that waits out a fixed fill window from its first job on."""
    end = None

    def time_to_fill(claimed):
        nonlocal end
        end = end or time.monotonic() + seconds
        return end - time.monotonic()
    return time_to_fill


def test_claims_are_atomic_and_never_shared(redis_client, keys):
    push(redis_client, keys, 40)
    claimed = {}

    def claim(name):
        claimed[name] = []
        while batch := jobqueue.claim_batch(redis_client, keys, name, 3, 0.2, 60, window(0.002)):
            claimed[name] += [json.loads(p)["id"] for p in batch]
            redis_client.delete(keys.processing(name))

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    ids = [job_id for batch in claimed.values() for job_id in batch]
    assert len(ids) == 40 and len(set(ids)) == 40


def test_a_fill_window_under_a_millisecond_does_not_block(redis_client, keys):
    # Redis reads a blocking timeout under 1 ms as 0, "block forever".
    push(redis_client, keys, 1)
    started = time.monotonic()
    batch = jobqueue.claim_batch(redis_client, keys, "w", 8, 1.0, 60, window(0.0009))
    assert len(batch) == 1 and time.monotonic() - started < 0.5


def test_enqueue_refuses_past_the_length_and_byte_bounds(redis_client, keys):
    job = jobqueue.new_job("A" * 1000, (1, 1, 3), time.time() + 30, 5)
    for _ in range(3):
        jobqueue.enqueue_job(redis_client, keys, dict(job), 3, 10**9)
    with pytest.raises(jobqueue.QueueFull) as full:
        jobqueue.enqueue_job(redis_client, keys, dict(job), 3, 10**9)
    assert full.value.depth == 3
    with pytest.raises(jobqueue.QueueFull):
        jobqueue.enqueue_job(redis_client, keys, dict(job), 100, 3500)  # 4 jobs > 3500 bytes
    assert redis_client.llen(QUEUE) == 3


def test_orphans_of_a_silent_worker_go_back_to_the_head_of_the_queue(redis_client, keys):
    jobs = push(redis_client, keys, 3)
    jobqueue.publish_heartbeat(redis_client, keys, "dead", {"id": "dead"}, 0.2, 60)
    claimed = jobqueue.claim_batch(redis_client, keys, "dead", 2, 0.2, 60, window(0))
    alive_claims = jobqueue.requeue_orphans(redis_client, keys)
    wait_until(lambda: not redis_client.exists(keys.heartbeat("dead")),
               what="the heartbeat to expire")
    requeued = jobqueue.requeue_orphans(redis_client, keys)

    assert alive_claims == 0 and requeued == 2
    assert [json.loads(p)["id"] for p in redis_client.lrange(QUEUE, 0, -1)] == [
        json.loads(p)["id"] for p in claimed] + [jobs[2]["id"]]
    assert not redis_client.exists(keys.processing("dead"))


def test_a_result_that_takes_longer_than_redis_default_socket_timeout_arrives(
        service, tiny_model):
    # The worker holds the only job for 7 s waiting to fill its batch; the handler's blocking
    # wait must outlast redis-py's default 5 s socket timeout.
    service.worker(BATCH_SIZE=8, BATCH_TIMEOUT_MS=7000, **tiny_settings(tiny_model))
    web = service.web()
    started = time.monotonic()
    response = post_image(web.url, image_bytes())
    assert response.status_code == 200, response.text
    assert time.monotonic() - started > 6.5


@pytest.mark.parametrize("damage", [{"enqueued_at": None}, {"top_k": "5"}, {"deadline": "soon"},
                                    {"shape": None}])
def test_a_malformed_job_is_dropped_and_the_worker_answers_the_next_request_at_once(
        service, tiny_model, redis_client, keys, damage):
    # A job that another program wrote with a field missing or of the wrong type is logged and
    # dropped: it must not fail its batch over and over until its deadline, nor leave the worker's
    # forward pass counted as running (then every later batch would wait to be full).
    worker = service.worker(**tiny_settings(tiny_model))
    web = service.web()
    pixels = encode_array(prepare_image(image_bytes(), (32, 32)))
    job = {**jobqueue.new_job(pixels, (32, 32, 3), time.time() + 30, 5), **damage}
    redis_client.rpush(keys.queue, json.dumps({k: v for k, v in job.items() if v is not None}))
    wait_until(lambda: "not a job" in worker.log_path.read_text(), timeout=10,
               what="the worker to drop the malformed job")
    response = post_image(web.url, image_bytes(), headers={"X-Request-Timeout-S": "10"})
    assert response.status_code == 200, response.text
    assert redis_client.llen(keys.queue) == 0


def test_workers_starting_together_record_the_first_accepted_model_once(redis_client, keys):
    ready = threading.Barrier(16)

    def start(n):
        ready.wait()
        jobqueue.accept_first_model(redis_client, keys, {"model": "m", "version": str(n)})
    threads = [threading.Thread(target=start, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(jobqueue.accepted_models(redis_client, keys)) == 1


def test_a_job_lost_by_a_failover_gets_503_not_a_wait_to_its_deadline(redis_client, keys):
    """A failover can lose a job (replication is asynchronous): its marker, written with it, is
    lost with it. Simulated here by deleting both; the waiting handler answers within a slice."""
    job = jobqueue.new_job("AAAA", (1, 1, 3), time.time() + 30, 1)
    payload, _ = jobqueue.enqueue_job(redis_client, keys, job, 100, 10**9)
    assert redis_client.pttl(keys.job(job["id"])) > 29_000
    redis_client.delete(keys.job(job["id"]), keys.queue)
    started = time.monotonic()
    with pytest.raises(ServiceError) as refused:
        jobqueue.wait_for_result(redis_client, keys, job["id"], payload, time.time() + 30)
    assert refused.value.status == 503 and "lost" in refused.value.message
    assert time.monotonic() - started < 10
