"""The serving path's own promises: the web tier decodes nothing on its event loop, a batch is
released without its payloads going back to Redis, the image may come as the raw body, and jobs of
the previous format left in the queue at an upgrade are answered, and before any worker is warm a
request is refused at once. Real processes throughout."""
import io
import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import psutil
import pytest
import requests
from PIL import Image

import settings
from serving.wire import job_format
from serving.wire import jobqueue
from conftest import (LASTING_HEARTBEAT, QUEUE, ROOT, assert_own_predictions, digits_settings,
                      distinct_images, frozen_workers, image_bytes, post_image, tiny_settings,
                      wait_until, warm_workers)
from serving.wire.job_format import encode_array
from serving.images import prepare_image


def noisy_jpeg(width, height, seed=0):
    """A JPEG whose entropy-coded data takes tens of milliseconds to decode even at 1/8 scale."""
    pixels = np.random.default_rng(seed).integers(0, 40, (height, width, 3), np.uint8) + 100
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=75)
    return buffer.getvalue()


def test_healthz_answers_at_once_while_a_30_megapixel_jpeg_is_classified(service, tiny_model):
    # One web process: a decode on its event loop would hold every other request of it.
    big = noisy_jpeg(6400, 4800)  # 30.7 MP, under 10 MB
    service.worker(**tiny_settings(tiny_model))
    web = service.web(WEB_WORKERS=1)
    classified, waits = threading.Event(), []

    def poll():
        with requests.Session() as session:
            while not classified.is_set():
                started = time.perf_counter()
                assert session.get(f"{web.url}/healthz", timeout=5).status_code == 200
                waits.append(time.perf_counter() - started)
                time.sleep(0.002)

    with ThreadPoolExecutor(1) as pool:
        polling = pool.submit(poll)
        wait_until(lambda: len(waits) >= 5, what="/healthz to answer")
        polled_before = len(waits)
        try:
            response = post_image(web.url, big, "big.jpg")
        finally:
            classified.set()
        polling.result()

    assert response.status_code == 200, response.text
    during = waits[polled_before:]
    assert len(during) >= 5, waits  # /healthz was asked all the while
    assert max(during) < 0.050, f"slowest /healthz {max(during) * 1000:.0f} ms"


def test_before_any_worker_is_warm_a_request_is_refused_at_once_and_wakes_the_workers(
        service, digits, redis_client, keys):
    # The web tier knows no model yet: it queues nothing (a job would wait for a worker that may
    # come after its deadline, or never), answers 503 with Retry-After, and leaves the sign that
    # KEDA's second trigger starts a worker on (deploy/k8s/base/model.yaml).
    web = service.web()
    started = time.monotonic()
    refusals = [post_image(web.url, digits["images"][0], "digit.png"),
                requests.post(f"{web.url}/v2/models/digits/infer", json={"inputs": []}, timeout=60)]
    assert time.monotonic() - started < settings.REQUEST_TIMEOUT_S / 2  # not at the deadline
    for refused in refusals:
        assert refused.status_code == 503, refused.text
        assert "no model worker" in refused.json()["error"]
        assert int(refused.headers["Retry-After"]) >= 1
    assert refusals[0].json()["success"] is False
    assert redis_client.llen(keys.queue) == 0 and not redis_client.keys(keys.job("*"))
    assert redis_client.llen(keys.wake) == 1 and 0 < redis_client.ttl(keys.wake) <= 60

    # Once the digits CNN's worker is warm, the same upload is decoded at its own 8 x 8 x 1.
    service.worker(**digits_settings(digits["v1"], "1"))
    response = post_image(web.url, digits["images"][0], "digit.png")
    assert response.status_code == 200, response.text
    assert {p["label"] for p in response.json()["predictions"]} <= set("0123456789")


def test_the_image_may_come_as_the_raw_body(service, tiny_model):
    service.worker(**tiny_settings(tiny_model))
    web = service.web()
    data = distinct_images(1)[0]
    form = post_image(web.url, data, top_k=3)
    raw = requests.post(f"{web.url}/predict?top_k=3", data=data,
                        headers={"Content-Type": "image/png"}, timeout=60)
    assert raw.status_code == 200, raw.text
    assert raw.json() == form.json()
    assert_own_predictions(raw.json()["predictions"], data, tiny_model)
    for header in ("X-Request-ID", "X-Batch-Size", "X-Model-Version", "X-Served-By"):
        assert header in raw.headers
    refused = requests.post(f"{web.url}/predict", data=b"not an image",
                            headers={"Content-Type": "image/jpeg"}, timeout=60)
    assert refused.status_code == 400 and refused.json()["success"] is False


def test_a_batch_is_released_without_its_payloads_going_back_to_redis(
        service, tiny_model, redis_client, keys):
    # Every byte of an upload is sent to Redis once, by the web tier's enqueue: the worker gets it
    # with its claim, and releases the batch by its jobs' ids.
    service.worker(BATCH_SIZE=8, BATCH_TIMEOUT_MS=200, **tiny_settings(tiny_model))
    web = service.web()
    uploads = [image_bytes(size=(400, 300), seed=i) for i in range(8)]
    assert min(map(len, uploads)) > 20_000
    assert post_image(web.url, uploads[0]).status_code == 200  # scripts loaded, connections made
    seen, listening = [], threading.Event()

    def watch(monitor):
        listening.set()
        for command in monitor.listen():
            seen.append(command)
            if command["command"] == "ECHO done":
                return

    with redis_client.monitor() as monitor:
        watcher = threading.Thread(target=watch, args=(monitor,))
        watcher.start()
        listening.wait(5)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda data: post_image(web.url, data), uploads))
        redis_client.echo("done")  # the last thing the monitor sees
        watcher.join(30)
    assert [r.status_code for r in answers] == [200] * 8
    commands = [c["command"] for c in seen]
    carrying = [command[:40] for command in commands if len(command) > 20_000]
    # Each upload appears once, in the SET of its body (commands that scripts run show in
    # MONITOR too: no script takes it), and in nothing else: nothing the worker sends carries it
    # back.
    assert [command.split()[0] for command in carrying] == ["SET"] * 8, carrying
    releases = [command for command in commands if command.startswith("LREM")]
    assert len(releases) == 8 and max(map(len, releases)) < 200, releases


def previous_version_job(pixels, deadline):
    """A job as the web tier of the previous version enqueued it: the whole job on the queue, as
    JSON with its pixels in base64, and a marker key that lives to its deadline."""
    job = {"id": str(uuid.uuid4()), "shape": list(pixels.shape), "enqueued_at": time.time(),
           "deadline": deadline, "top_k": 3}
    return job, json.dumps({**job, "image": encode_array(pixels)})


def test_jobs_of_the_previous_format_left_in_the_queue_at_an_upgrade_are_answered(
        service, tiny_model, redis_client, keys):
    # The previous version's web processes enqueued these before its workers were replaced; its
    # handlers wait on each job's result list, and read the result as JSON.
    images = distinct_images(3)
    deadline = time.time() + 60
    jobs = []
    for data in images:
        job, payload = previous_version_job(prepare_image(data, (32, 32)), deadline)
        redis_client.set(keys.job(job["id"]), 1, px=60_000)
        redis_client.rpush(keys.queue, payload)
        jobs.append(job)
    service.worker(**tiny_settings(tiny_model))  # a worker of this version takes the queue over
    for job, data in zip(jobs, images):
        key = keys.result(job["id"])
        reply = redis_client.blmove(key, key, 30, "LEFT", "RIGHT")  # as the previous handler
        assert reply is not None, "the job was stranded"
        result = json.loads(reply)
        assert result["batch_size"] >= 1 and result["model_version"]
        assert_own_predictions(result["predictions"], data, tiny_model)
    wait_until(lambda: redis_client.llen(keys.queue) == 0, what="the queue to empty")
    assert not redis_client.keys(keys.processing("*"))


def test_a_web_tier_refuses_while_a_worker_of_the_previous_version_serves(
        service, tiny_model, redis_client, keys):
    # A worker of the previous version cannot read this version's jobs (it would drop them, and
    # their clients would wait for nothing): upgrade the workers first, as the README says.
    service.worker(**tiny_settings(tiny_model))
    web = service.web()
    warm_workers(redis_client, keys, 1)
    # The heartbeat of a previous version's worker: the same fields, but no job format.
    old = {name: value for name, value in next(iter(jobqueue.live_workers(
        redis_client, keys))).items() if name != job_format.JOB_FORMAT_FIELD}
    old["id"] = "previous-version-worker"
    jobqueue.publish_heartbeat(redis_client, keys, old["id"], old, 30, 60)
    refused = wait_until(lambda: [r for r in [post_image(web.url, image_bytes())]
                                  if r.status_code == 503], what="the web tier to see the old worker")[0]
    assert "upgrade the model workers before the web tier" in refused.json()["error"]
    assert refused.headers["Retry-After"]
    assert redis_client.llen(keys.queue) == 0  # nothing was enqueued for it to drop
    redis_client.delete(keys.heartbeat(old["id"]))
    redis_client.srem(keys.workers, old["id"])
    wait_until(lambda: post_image(web.url, image_bytes()).status_code == 200,
               what="the web tier to serve once the old worker is gone")


@pytest.mark.parametrize("progressive", [True, False], ids=["progressive", "baseline"])
def test_a_40_megapixel_jpeg_decodes_within_its_estimate(tmp_path, progressive):
    """What decoding a JPEG holds, measured in a process of its own: a progressive one keeps
    every DCT coefficient of the full-size image, however small the scale it decodes at."""
    import subprocess
    import sys

    buffer = io.BytesIO()
    Image.new("RGB", (7300, 5480), (90, 140, 200)).save(buffer, "JPEG", quality=90,
                                                         progressive=progressive)
    path = tmp_path / "big.jpg"
    path.write_bytes(buffer.getvalue())
    assert len(buffer.getvalue()) < 1_000_000  # a few hundred kB
    small_path = tmp_path / "small.jpg"
    Image.new("RGB", (640, 480), (90, 140, 200)).save(small_path, "JPEG", progressive=progressive)
    # The peak of this process's memory (VmHWM: ru_maxrss would count the parent's, kept across
    # fork and exec) grown from where it stood before decoding.
    measure = f"""
import sys
sys.path.insert(0, {str(ROOT)!r})
from serving import images

def memory(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith(field))

def decode(data):
    image = images.open_image(data)
    estimate = images.decode_reduced(image, (224, 224), 3)
    return image, estimate

# Once first, small: what the libraries set up on first use (thread pools, arenas) is not the
# image's.
small = open({str(small_path)!r}, "rb").read()
images.decode_image(decode(small)[0], small, (224, 224), 3)
data = open({str(path)!r}, "rb").read()
image, estimate = decode(data)
before = memory("VmRSS:")
images.decode_image(image, data, (224, 224), 3)
print(estimate, memory("VmHWM:") - before)
"""
    estimate, growth = map(int, subprocess.run([sys.executable, "-c", measure], check=True,
                                               capture_output=True, text=True).stdout.split())
    print(f"estimate {estimate >> 20} MiB, peak growth {growth >> 20} MiB")
    assert growth <= estimate
    if progressive:  # the coefficients of 40 MP: 2 bytes each, at least one per pixel
        assert estimate >= 2 * 7300 * 5480


def test_waiting_requests_hold_no_uploads(service, tiny_model, redis_client, keys):
    """150 requests of 1.4 MB images wait (the worker is frozen): the web process holds the jobs'
    ids, not their images, so its memory grows by far less than the 200 MB they sent."""
    service.worker(**LASTING_HEARTBEAT, **tiny_settings(tiny_model))
    # glibc's malloc at a fixed mmap threshold: a freed upload leaves the resident memory at once
    # (by default the threshold rises to the size of the last one freed, and later ones stay
    # resident after they are freed), so what is resident is what the process holds.
    web = service.web(MALLOC_MMAP_THRESHOLD_=2**16)
    gunicorn_worker = next(child for child in psutil.Process(web.pid).children())
    pixels = np.random.default_rng(0).integers(0, 256, (1000, 1200, 3), np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    image = buffer.getvalue()
    assert len(image) > 1_300_000

    def rss():
        return gunicorn_worker.memory_info().rss

    def wait_with(upload, count):
        """`count` requests of `upload` wait in the queue; (RSS grown meanwhile) once all are."""
        before = rss()
        with ThreadPoolExecutor(count) as pool:
            waiting = [pool.submit(post_image, web.url, upload, timeout=60,
                                   headers={"X-Request-Timeout-S": "20"}) for _ in range(count)]
            # Every handler waiting on its result (blocked in BLMOVE): each has had its enqueue's
            # reply and dropped its upload. (The queue's length alone is reached while the web
            # process has yet to read some of those replies.)
            wait_until(lambda: redis_client.llen(QUEUE) == count and sum(
                client["cmd"] == "blmove" and "b" in client["flags"]
                for client in redis_client.client_list()) == count, timeout=60,
                what="every request to be queued and waiting")
            grown = rss() - before
            # Their jobs gone from Redis, their clients get 503 within seconds.
            redis_client.delete(QUEUE, *redis_client.keys(f"{{{QUEUE}}}:job:*"))
            assert all(answer.result().status_code in (503, 504) for answer in waiting)
        return grown

    # As many requests of a small image first: what any waiting request costs the process (a
    # greenlet, a Redis connection in the pool, lazily built parts) is in place before measuring.
    count = 150
    with frozen_workers(redis_client, keys):
        wait_with(image_bytes(size=(64, 64)), count)
        grown = wait_with(image, count)
    assert grown < 40 * 2**20, f"the web process grew {grown / 2**20:.1f} MB"
