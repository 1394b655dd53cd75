"""The Redis protocol between handlers and workers, against the real test redis-server."""
import json
import threading
import time

import pytest

from serving.wire import job_format
from serving.wire import jobqueue
from serving.wire import records
from serving.errors import ServiceError
from conftest import QUEUE, image_bytes, post_image, tiny_settings, wait_until


def push(store, keys, count, deadline_s=30):
    jobs = [job_format.new_job(b"AAAA", time.time() + deadline_s, 5) for _ in range(count)]
    for job in jobs:
        jobqueue.enqueue_jobs(store, keys, [job], 1000, 10**9)
    return jobs


def claimed_ids(claimed):
    return [job_format.read_job(entry, body)["id"] for entry, body in claimed]


def window(seconds):
    """A claim_batch time_to_fill that waits out a fixed fill window from its first job on."""
    end = None

    def time_to_fill(claimed):
        nonlocal end
        end = end or time.monotonic() + seconds
        return end - time.monotonic()
    return time_to_fill


def test_claims_are_atomic_and_never_shared(store, redis_client, keys):
    push(store, keys, 40)
    claimed = {}

    def claim(name):
        claimed[name] = []
        while batch := jobqueue.claim_batch(store, keys, name, 3, 0.2, 60, window(0.002)):
            claimed[name] += claimed_ids(batch)
            redis_client.delete(keys.processing(name))

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    ids = [job_id for batch in claimed.values() for job_id in batch]
    assert len(ids) == 40 and len(set(ids)) == 40


def test_a_fill_window_under_a_millisecond_does_not_block(store, redis_client, keys):
    # Redis reads a blocking timeout under 1 ms as 0, "block forever".
    push(store, keys, 1)
    started = time.monotonic()
    batch = jobqueue.claim_batch(store, keys, "w", 8, 1.0, 60, window(0.0009))
    assert len(batch) == 1 and time.monotonic() - started < 0.5


def test_enqueue_refuses_past_the_length_and_byte_bounds(store, redis_client, keys):
    def job():
        return job_format.new_job(b"A" * 1000, time.time() + 30, 5)  # a body of 1000 bytes and more

    for _ in range(3):
        jobqueue.enqueue_jobs(store, keys, [job()], 3, 10**9)
    with pytest.raises(jobqueue.QueueFull) as full:
        jobqueue.enqueue_jobs(store, keys, [job()], 3, 10**9)
    assert full.value.depth == 3
    queued = int(redis_client.get(keys.queued_bytes))
    assert 3000 < queued < 3500
    with pytest.raises(jobqueue.QueueFull):
        jobqueue.enqueue_jobs(store, keys, [job()], 100, 3500)  # 4 bodies > 3500 bytes
    assert redis_client.llen(QUEUE) == 3
    # Claimed jobs leave the count; a dead worker's, re-queued, come back into it.
    jobqueue.publish_heartbeat(store, keys, "w", {"id": "w"}, 0.2, 60)
    jobqueue.claim_batch(store, keys, "w", 2, 0.2, 60, window(0))
    left = redis_client.lindex(QUEUE, 0)  # "<id>:<bytes of its body>"
    assert int(redis_client.get(keys.queued_bytes)) == int(left.split(":")[1])
    wait_until(lambda: jobqueue.requeue_orphans(store, keys) == 2,
               what="the heartbeat to expire and the claims to come back")
    assert int(redis_client.get(keys.queued_bytes)) == queued


def test_no_body_passes_through_a_script_and_a_refused_one_is_deleted(store, redis_client, keys):
    # Redis 7 hashes every byte of each string a script takes or returns: bodies go by SET and
    # MGET, never through a script (SLOWLOG, at 0 us, logs every command with its arguments).
    pixels = b"\xee" * 40_000
    kept = redis_client.config_get("slowlog-*")
    redis_client.config_set("slowlog-log-slower-than", 0)
    redis_client.config_set("slowlog-max-len", 10_000)  # (128 by default: the first would go)
    redis_client.slowlog_reset()
    try:
        jobs = [job_format.new_job(pixels, time.time() + 30, 5) for _ in range(3)]
        jobqueue.enqueue_jobs(store, keys, jobs[:2], 2, 10**9)
        with pytest.raises(jobqueue.QueueFull):
            jobqueue.enqueue_jobs(store, keys, jobs[2:], 2, 10**9)
        claimed = jobqueue.claim_batch(store, keys, "w", 2, 0.2, 60, window(0))
        jobqueue.store_results(store, keys, "w", {job.id: {"answer": 1} for job in jobs[:2]},
                               [entry for entry, _ in claimed], 60)
        log = [entry["command"] for entry in redis_client.slowlog_get(10_000)]
    finally:
        for name, value in kept.items():
            redis_client.config_set(name, value)
    assert [body[-len(pixels):] for _, body in claimed] == [pixels, pixels]
    scripts = [command for command in log if command.split(b" ")[0] in (b"EVALSHA", b"EVAL")]
    assert len(scripts) >= 4 and not any(b"\xee" in command for command in scripts)
    assert sum(command.startswith(b"SET") and b"\xee" in command for command in log) == 3
    assert not redis_client.exists(keys.job(jobs[2].id))  # refused: its body went with it
    assert not redis_client.keys(keys.job("*"))  # answered: theirs too


def test_orphans_of_a_silent_worker_go_back_to_the_head_of_the_queue(store, redis_client, keys):
    jobs = push(store, keys, 3)
    jobqueue.publish_heartbeat(store, keys, "dead", {"id": "dead"}, 60, 60)
    claimed = jobqueue.claim_batch(store, keys, "dead", 2, 0.2, 60, window(0))
    alive_claims = jobqueue.requeue_orphans(store, keys)
    redis_client.pexpire(keys.heartbeat("dead"), 1)  # it falls silent: its heartbeat runs out
    wait_until(lambda: not redis_client.exists(keys.heartbeat("dead")),
               what="the heartbeat to expire")
    requeued = jobqueue.requeue_orphans(store, keys)

    assert alive_claims == 0 and requeued == 2
    assert sorted(claimed_ids(claimed)) == sorted(job.id for job in jobs[:2])
    assert [entry.split(":")[0] for entry in redis_client.lrange(QUEUE, 0, -1)] == [
        job.id for job in jobs]  # back at the head, in their order
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


def damaged_job(header):
    """A job another program wrote, with `header` as its first line, and its entry."""
    job_id = "feed" * 8
    body = json.dumps(header).encode() + b"\n" + image_bytes()
    return job_id, f"{job_id}:{len(body)}", body


GOOD_HEADER = {"deadline": time.time() + 3600, "enqueued_at": time.time(), "top_k": 5}


@pytest.mark.parametrize("damage", [{"enqueued_at": None}, {"top_k": "5"}, {"deadline": "soon"},
                                    {"shape": [32, 32]}, {"top_k": 0}, "not json"])
def test_a_malformed_job_is_dropped_and_the_worker_answers_the_next_request_at_once(
        service, tiny_model, redis_client, keys, damage):
    # A job that another program wrote with a field missing or of the wrong type is logged and
    # dropped: it must not fail its batch over and over until its deadline, nor leave the worker's
    # forward pass counted as running (then every later batch would wait to be full).
    worker = service.worker(**tiny_settings(tiny_model))
    web = service.web()
    header = {name: value for name, value in {**GOOD_HEADER, **damage}.items()
              if value is not None} if isinstance(damage, dict) else damage
    job_id, entry, body = damaged_job(header)
    redis_client.set(keys.job(job_id), body)
    redis_client.rpush(keys.queue, entry)
    wait_until(lambda: "not a job" in worker.log_path.read_text(), timeout=10,
               what="the worker to drop the malformed job")
    response = post_image(web.url, image_bytes(), headers={"X-Request-Timeout-S": "10"})
    assert response.status_code == 200, response.text
    assert redis_client.llen(keys.queue) == 0
    assert not redis_client.exists(keys.job(job_id))  # released with its batch


def test_workers_starting_together_record_the_first_accepted_model_once(redis_client, keys):
    ready = threading.Barrier(16)

    def start(n):
        ready.wait()
        records.accept_first_model(redis_client, keys, {"model": "m", "version": str(n)})
    threads = [threading.Thread(target=start, args=(n,)) for n in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(records.accepted_models(redis_client, keys)) == 1


def test_a_job_lost_by_a_failover_gets_503_not_a_wait_to_its_deadline(store, redis_client, keys):
    """A failover can lose a job (replication is asynchronous): its body, written with its entry,
    is lost with it. Simulated here by deleting both; the waiting handler answers within a
    slice."""
    job = job_format.new_job(b"AAAA", time.time() + 30, 1)
    jobqueue.enqueue_jobs(store, keys, [job], 100, 10**9)
    assert redis_client.pttl(keys.job(job.id)) > 29_000
    redis_client.delete(keys.job(job.id), keys.queue)
    started = time.monotonic()
    with pytest.raises(ServiceError) as refused:
        jobqueue.wait_for_result(store, keys, job, time.time() + 30)
    assert refused.value.status == 503 and "lost" in refused.value.message
    assert time.monotonic() - started < 10


def test_a_job_answered_as_its_wait_checks_its_body_is_not_taken_for_lost(store, redis_client, keys):
    # The answer deletes the body: a handler whose slice ended just before it looks for the
    # result once more before it calls the job lost.
    job = job_format.new_job(b"AAAA", time.time() + 30, 1)
    jobqueue.enqueue_jobs(store, keys, [job], 100, 10**9)
    claimed = jobqueue.claim_batch(store, keys, "w", 1, 0.2, 60, window(0))
    real_exists = store.exists

    def answered_meanwhile(*names):  # the worker answers between the slice and the look
        jobqueue.store_results(store, keys, "w", {job.id: {"answer": 7}},
                               [entry for entry, _ in claimed], 60)
        return real_exists(*names)

    store.exists = answered_meanwhile
    real_blmove = store.blmove
    store.blmove = lambda *args: None  # the slice ends without the result
    try:
        assert jobqueue.wait_for_result(store, keys, job, time.time() + 30) == {
            "answer": 7}
    finally:
        store.exists, store.blmove = real_exists, real_blmove
