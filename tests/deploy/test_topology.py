"""The production topology on one machine: `deploy/topology.py` starts nginx in front of gunicorn
web instances and model workers, the same command a user runs; every request goes through nginx.
"""
import os
import re
import signal
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from conftest import (LASTING_HEARTBEAT, assert_own_answers, distinct_images,
                      frozen_workers, image_bytes, is_running, post_concurrently, post_image, stop,
                      tiny_settings, wait_until, warm_workers, worker_stats)


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory):
    """A seeded CNN whose forward pass of 16 images takes about a second on one core, so a test
    can act while a worker has a batch in hand. Same input and labels as the tiny model."""
    import keras

    keras.utils.set_random_seed(11)
    model = keras.Sequential(
        [keras.Input((32, 32, 3)), keras.layers.UpSampling2D(5)]
        + [keras.layers.Conv2D(64, 3, padding="same", activation="relu") for _ in range(8)]
        + [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10, activation="softmax")])
    folder = tmp_path_factory.mktemp("slow_model")
    model.save(folder / "slow.keras")
    (folder / "labels.txt").write_text("".join(f"class_{i}\n" for i in range(10)))
    return {"MODEL": str(folder / "slow.keras"), "LABELS": str(folder / "labels.txt"),
            "PREPROCESS": "scale_0_1", "MODEL_THREADS": "1", "BATCH_SIZE": "16",
            "BATCH_TIMEOUT_MS": "50"}


def post_in_background(url, images):
    """Send every image at once from its own thread; returns (pool, futures)."""
    pool = ThreadPoolExecutor(len(images))
    futures = [pool.submit(post_image, url, data, filename="i.png") for data in images]
    return pool, futures


def processing_jobs(redis_client, keys, worker_id):
    """Ids of the jobs a worker has claimed and not yet answered."""
    return [entry.split(":")[0] for entry in redis_client.lrange(keys.processing(worker_id), 0, -1)]


# --- Load through nginx ---------------------------------------------------------------------

def test_requests_through_nginx_are_answered_once_and_spread_over_both_tiers(
        topology, tiny_model, redis_client, keys):
    front = topology(models=2, webs=2, BATCH_SIZE=4, BATCH_TIMEOUT_MS=20,
                     **tiny_settings(tiny_model))
    warm_workers(redis_client, keys, 2)
    images = distinct_images(64)

    responses = post_concurrently(front.url, images, 16)

    assert_own_answers(responses, images, tiny_model)
    assert len({r.headers["X-Request-ID"] for r in responses}) == 64
    served_by = Counter(r.headers["X-Served-By"] for r in responses)
    assert set(served_by) == {"web-1", "web-2"}, served_by
    assert len({r.headers["X-Model-Worker"] for r in responses}) == 2

    def counted():
        beats = worker_stats(redis_client, keys).values()
        return sum(int(b["jobs"]) for b in beats) == 64 and beats

    beats = wait_until(counted, what="the heartbeats to count all 64 jobs")
    # Exactly once: 64 jobs classified in all, by both workers, and nothing left behind.
    assert all(int(b["batches"]) > 0 for b in beats)
    assert redis_client.llen(keys.queue) == 0
    assert not redis_client.keys(keys.processing("*"))


def test_nginx_limits_match_the_apps(topology, tiny_model, redis_client, keys):
    front = topology(models=1, webs=1, REQUEST_TIMEOUT_S=2, MAX_UPLOAD_BYTES=200_000,
                     **LASTING_HEARTBEAT, **tiny_settings(tiny_model))

    too_large = post_image(front.url, b"\xff" * 300_000)

    assert too_large.status_code == 413
    assert too_large.json() == {"success": False,
                                "error": "the upload is larger than the 200000 bytes allowed"}
    assert "X-Served-By" not in too_large.headers  # refused by nginx, before any web instance

    warm_workers(redis_client, keys, 1)
    with frozen_workers(redis_client, keys):  # admitted, and never answered
        started = time.monotonic()
        unanswered = post_image(front.url, image_bytes())
        elapsed = time.monotonic() - started

    # nginx waits longer than REQUEST_TIMEOUT_S, so the app's own 504 is what the client gets.
    assert unanswered.status_code == 504
    assert unanswered.headers["X-Served-By"] == "web-1"
    assert "timeout" in unanswered.json()["error"]
    assert 2 <= elapsed < 6


# --- Health ---------------------------------------------------------------------------------

def readyz(front):
    response = requests.get(f"{front.url}/readyz", timeout=5)
    return response.status_code, response.json()


def test_readyz_is_200_only_while_a_warm_worker_beats(topology, service, tiny_model,
                                                       redis_client, keys):
    front = topology(models=0, webs=1)
    status, body = readyz(front)
    assert status == 503 and body["success"] is False
    assert "no model worker" in body["error"]

    workers = [service.worker(wait=False, **tiny_settings(tiny_model)) for _ in range(2)]
    samples = []
    while not samples or samples[-1][0] != 200:
        assert len(samples) < 2000, "readyz never turned 200"
        status, _ = readyz(front)
        # Read after the answer: a worker that is warm now was maybe not warm then, but one that
        # is not warm now was not warm then either, so readyz must have said 503.
        warm_now = any(b["warm"] == "1" for b in worker_stats(redis_client, keys).values())
        samples.append((status, warm_now))
        time.sleep(0.05)
    assert all(status == 503 for status, warm_now in samples if not warm_now)

    warm_workers(redis_client, keys, 2)
    stop(workers[0])  # SIGTERM: it deregisters; the other worker still serves
    assert readyz(front)[0] == 200

    stop(workers[1], signal.SIGKILL)  # no goodbye: its heartbeat must expire (HEARTBEAT_TTL_S=2)
    wait_until(lambda: readyz(front)[0] == 503, timeout=10, what="readyz to turn 503")
    assert "no model worker" in readyz(front)[1]["error"]


# --- Graceful shutdown ----------------------------------------------------------------------

def test_sigterm_to_a_worker_mid_batch_answers_the_batch_and_loses_nothing(
        topology, slow_model, redis_client, keys):
    front = topology(models=2, webs=2, **slow_model)
    beats = warm_workers(redis_client, keys, 2)
    pool, futures = post_in_background(front.url, distinct_images(48))

    def a_batch_in_hand():
        for beat in beats.values():
            held = processing_jobs(redis_client, keys, beat["id"])
            if held:
                return beat, held

    victim, held = wait_until(a_batch_in_hand, timeout=60, interval=0.005,
                              what="a worker to claim a batch")
    os.kill(int(victim["pid"]), signal.SIGTERM)
    responses = [future.result() for future in futures]
    pool.shutdown()

    assert [r.status_code for r in responses] == [200] * 48
    answered_by = {r.headers["X-Request-ID"]: r.headers["X-Model-Worker"] for r in responses}
    # The jobs it held were answered by it, before it exited: not re-queued to the other worker.
    assert {answered_by[job_id] for job_id in held} == {victim["id"]}
    assert exit_code_logged(front, victim["pid"]) == 0
    assert front.poll() is None and readyz(front)[0] == 200  # the other worker carries on
    # It beat until it had finished: nothing of its was re-queued and computed twice.
    survivor = next(beat for pid, beat in worker_stats(redis_client, keys).items()
                    if pid != victim["pid"])
    assert survivor["requeued"] == "0", front.log_path.read_text()[-2000:]
    assert redis_client.llen(keys.queue) == 0
    assert not redis_client.keys(keys.processing("*"))


def exit_code_logged(front, pid):
    """The exit code the topology logged for one of its processes, once it has. (It logs an exit
    after reaping the process: wait for the line, not for the reaping.)"""
    found = wait_until(lambda: re.search(rf"\(pid {pid}\) exited with code (-?\d+)",
                                         front.log_path.read_text()),
                       what=f"process {pid} to exit")
    return int(found.group(1))


def wait_all_accepted_and_some_waiting(redis_client, keys, futures):
    """Wait until every request has reached Redis while a batch is in hand and more are queued."""
    def check():
        # Read in the order a job moves (answered <- claimed <- queued) so none is counted twice:
        # a total of all requests means every one has been accepted by nginx and a web instance.
        answered = sum(future.done() for future in futures)
        claimed = sum(redis_client.llen(key) for key in redis_client.keys(keys.processing("*")))
        queued = redis_client.llen(keys.queue)
        return claimed and queued and answered + claimed + queued == len(futures)

    wait_until(check, timeout=60, interval=0.005,
               what="all requests in, a batch in hand and more queued")


def test_sigterm_to_a_web_instance_finishes_its_requests_and_nginx_routes_around_it(
        topology, slow_model, redis_client, keys):
    front = topology(models=1, webs=2, **slow_model)
    warm_workers(redis_client, keys, 1)
    web_1 = int(re.search(r"web-1: pid (\d+)", front.log_path.read_text()).group(1))
    pool, futures = post_in_background(front.url, distinct_images(40))
    wait_all_accepted_and_some_waiting(redis_client, keys, futures)

    os.kill(web_1, signal.SIGTERM)  # gunicorn's graceful stop
    responses = [future.result() for future in futures]
    pool.shutdown()

    assert [r.status_code for r in responses] == [200] * 40
    assert any(r.headers["X-Served-By"] == "web-1" for r in responses)
    assert exit_code_logged(front, web_1) == 0
    after = post_concurrently(front.url, distinct_images(4), 4)
    assert [(r.status_code, r.headers["X-Served-By"]) for r in after] == [(200, "web-2")] * 4


def test_sigterm_to_the_topology_answers_requests_in_flight_then_stops_everything(
        topology, slow_model, redis_client, keys):
    front = topology(models=1, webs=2, **slow_model)
    warm_workers(redis_client, keys, 1)
    pool, futures = post_in_background(front.url, distinct_images(40))
    wait_all_accepted_and_some_waiting(redis_client, keys, futures)

    front.send_signal(signal.SIGTERM)
    responses = [future.result() for future in futures]
    pool.shutdown()

    assert [r.status_code for r in responses] == [200] * 40
    assert front.wait(60) == 0
    assert [pid for pid in front.children if is_running(pid)] == []
    assert worker_stats(redis_client, keys) == {}  # the worker deregistered on its way out
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{front.url}/healthz", timeout=2)
