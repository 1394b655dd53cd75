"""Bad days, injected for real: killed workers, expired deadlines, overload, a Redis restart and
hostile uploads. Every accepted request must be answered or refused clearly, and nothing may be
left behind in Redis.
"""
import http.client
import io
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from PIL import Image

from serving.wire.keys import Keys
from conftest import (QUEUE, Processes, assert_own_answers, distinct_images, free_port,
                      image_bytes, post_image, start_redis, stop, tiny_settings, wait_until,
                      worker_stats)

RESULT_TTL_S = 2


def assert_nothing_left(redis_client, timeout=RESULT_TTL_S + 3):
    """No queued job, claim or result key may outlive the result TTL."""
    def clean():
        keys = Keys(QUEUE)
        return (redis_client.llen(QUEUE) == 0
                and not redis_client.keys(keys.result("*"))
                and not redis_client.keys(keys.processing("*")))

    wait_until(clean, timeout=timeout, what="Redis to hold no job, claim or result")


def worker_id(redis_client, keys, process):
    return worker_stats(redis_client, keys)[str(process.pid)]["id"]


@pytest.mark.parametrize("survivor_first", [True, False],
                         ids=["second worker running", "new worker after the kill"])
def test_sigkill_of_a_worker_holding_a_batch_loses_no_request(
        service, tiny_model, redis_client, keys, survivor_first):
    # A long batch window makes the victim hold its claimed jobs, unanswered, until it is killed.
    victim = service.worker(BATCH_SIZE=8, BATCH_TIMEOUT_MS=60_000, RESULT_TTL_S=RESULT_TTL_S,
                            **tiny_settings(tiny_model))
    web = service.web(RESULT_TTL_S=RESULT_TTL_S)
    images = distinct_images(6)
    claims = keys.processing(worker_id(redis_client, keys, victim))

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(post_image, web.url, data, "i.png", top_k=10) for data in images]
        wait_until(lambda: redis_client.llen(claims) == 6, what="the victim to claim all 6 jobs")
        if survivor_first:
            survivor = service.worker(RESULT_TTL_S=RESULT_TTL_S, **tiny_settings(tiny_model))
        victim.send_signal(signal.SIGKILL)
        if not survivor_first:
            survivor = service.worker(RESULT_TTL_S=RESULT_TTL_S, **tiny_settings(tiny_model))
        responses = [future.result() for future in futures]

    assert_own_answers(responses, images, tiny_model)
    assert {r.headers["X-Model-Worker"] for r in responses} == {
        worker_id(redis_client, keys, survivor)}
    wait_until(lambda: worker_stats(redis_client, keys)[str(survivor.pid)]["requeued"] == "6",
               what="the survivor's heartbeat to count 6 re-queued jobs")
    assert_nothing_left(redis_client)


def test_jobs_past_their_deadline_are_not_computed_and_clients_get_504(
        service, tiny_model, redis_client, keys):
    worker = service.worker(BATCH_SIZE=8, BATCH_TIMEOUT_MS=3000, RESULT_TTL_S=RESULT_TTL_S,
                            **tiny_settings(tiny_model))
    web = service.web(RESULT_TTL_S=RESULT_TTL_S)

    with ThreadPoolExecutor(5) as pool:
        responses = list(pool.map(
            lambda data: post_image(web.url, data, headers={"X-Request-Timeout-S": "1"}),
            [image_bytes(seed=i) for i in range(5)]))

    assert [r.status_code for r in responses] == [504] * 5
    assert all(r.json()["success"] is False for r in responses)
    stats = wait_until(lambda: (s := worker_stats(redis_client, keys)[str(worker.pid)])["expired"]
                       == "5" and s, what="the worker to count 5 expired jobs")
    assert stats["batches"] == "0" and stats["jobs"] == "0"
    assert post_image(web.url, image_bytes()).status_code == 200
    assert_nothing_left(redis_client)


def test_a_web_instance_stops_at_once_while_a_kept_alive_connection_waits(service):
    """SIGTERM: gunicorn finishes the requests in progress, and closes a connection that waits for
    its next request at once, not when its keep-alive runs out (set to 120 s here, past gunicorn's
    35 s graceful timeout, so a wait for it would show)."""
    web = service.web(GUNICORN_CMD_ARGS="--keep-alive 120")
    connection = http.client.HTTPConnection("127.0.0.1", int(web.url.rsplit(":", 1)[1]))
    connection.request("GET", "/healthz")
    answer = connection.getresponse()
    assert answer.status == 200 and answer.read()  # the whole answer: nothing more is due
    idle = connection.sock  # kept alive, waiting for its next request
    started = time.monotonic()

    web.send_signal(signal.SIGTERM)
    web.wait(timeout=60)

    assert web.returncode == 0 and time.monotonic() - started < 20, time.monotonic() - started
    idle.settimeout(5)
    assert idle.recv(1) == b""  # closed by the server
    idle.close()


@pytest.mark.parametrize("value", ["0", "-3", "soon", "inf", "nan"])
def test_bad_deadline_header_is_400(service, value):
    web = service.web()
    response = post_image(web.url, image_bytes(), headers={"X-Request-Timeout-S": value})
    assert response.status_code == 400 and "X-Request-Timeout-S" in response.json()["error"]


def test_overload_is_refused_at_once_with_retry_after_and_memory_stays_bounded(
        service, redis_client, keys):
    max_queue, batch, clients = 8, 4, 24
    service.worker(BATCH_SIZE=batch, BATCH_TIMEOUT_MS=5, RESULT_TTL_S=RESULT_TTL_S)  # ResNet50
    web = service.web(MAX_QUEUE_LENGTH=max_queue, OVERLOAD_STATUS=429, RESULT_TTL_S=RESULT_TTL_S)
    baseline = redis_client.info("memory")["used_memory"]
    peaks = {"memory": baseline, "queue": 0}
    done = threading.Event()

    def watch():
        while not done.wait(0.01):
            peaks["memory"] = max(peaks["memory"], redis_client.info("memory")["used_memory"])
            peaks["queue"] = max(peaks["queue"], redis_client.llen(QUEUE))

    def client(seed):
        answers = []
        for i in range(3):  # closed loop: the next request once the last is answered
            image = image_bytes(seed=seed * 10 + i)
            started = time.monotonic()
            response = post_image(web.url, image)
            answers.append((response, time.monotonic() - started))
        return answers

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(clients) as pool:
            answers = [a for client_answers in pool.map(client, range(clients))
                       for a in client_answers]
    finally:
        done.set()
        watcher.join()

    refused = [(r, seconds) for r, seconds in answers if r.status_code == 429]
    served = [r for r, _ in answers if r.status_code == 200]
    assert len(served) + len(refused) == len(answers)
    assert refused and served
    for response, seconds in refused:
        assert response.json()["success"] is False and "queue is full" in response.json()["error"]
        assert int(response.headers["Retry-After"]) >= 1
        assert seconds < 1.0
    assert all(len(r.json()["predictions"]) == 5 for r in served)
    assert peaks["queue"] <= max_queue
    # Jobs queued, claimed by the worker, and in flight in the clients' sockets, twice over.
    job_bytes = 224 * 224 * 3 * 4 // 3 + 500
    assert peaks["memory"] - baseline < (max_queue + batch + clients) * job_bytes * 2
    assert post_image(web.url, image_bytes()).status_code == 200
    assert_nothing_left(redis_client)


@pytest.fixture
def own_redis(tmp_path):
    """A redis-server of this test's own, which the test may stop and start again."""
    port = free_port()
    server = {"port": port, "url": f"redis://127.0.0.1:{port}/0", "dir": tmp_path,
              "process": start_redis(port, tmp_path)}
    yield server
    stop(server["process"])


def test_service_recovers_by_itself_after_a_redis_restart(own_redis, tiny_model, tmp_path):
    processes = Processes(own_redis["url"], tmp_path)
    try:
        worker = processes.worker(**tiny_settings(tiny_model))
        web = processes.web()
        log, stop_load = [], threading.Event()
        began = time.monotonic()

        def load():
            while not stop_load.is_set() and time.monotonic() - began < 60:
                started = time.monotonic() - began
                try:
                    status = post_image(web.url, image_bytes(), timeout=10).status_code
                except requests.RequestException as exc:
                    status = repr(exc)
                log.append((started, time.monotonic() - began, status))

        def answered_after(moment, status, count=1):
            return len([e for e in log if e[0] > moment and e[2] == status]) >= count

        with ThreadPoolExecutor(4) as pool:
            loads = [pool.submit(load) for _ in range(4)]
            wait_until(lambda: answered_after(0, 200, 8), what="8 answers before the outage")
            stop(own_redis["process"])
            down_at = time.monotonic() - began
            wait_until(lambda: answered_after(down_at, 503, 4), what="503s during the outage")
            ready = requests.get(f"{web.url}/readyz", timeout=5)
            own_redis["process"] = start_redis(own_redis["port"], own_redis["dir"])
            up_at = time.monotonic() - began
            # Recovered: the first 200 sent after the restart; then 20 more requests, all 200.
            first_ok = wait_until(lambda: min((e[0] for e in log if e[0] > up_at and e[2] == 200),
                                              default=None), what="an answer after the restart")
            wait_until(lambda: len([e for e in log if e[0] > first_ok]) >= 20,
                       what="20 requests after recovery")
            stop_load.set()
            for future in loads:
                future.result()

        assert ready.status_code == 503 and "Redis" in ready.json()["error"]
        unexpected = [entry for entry in log if entry[2] not in (200, 503)]
        assert not unexpected, (down_at, up_at, unexpected, worker.log_path.read_text()[-3000:])
        # While Redis is down, requests fail fast (the connect timeout is 2 s), never hang.
        outage = [(start, end) for start, end, status in log if status == 503]
        assert all(down_at - 1 <= start and end - start < 3 for start, end in outage), outage
        assert {status for start, _, status in log if start > first_ok} == {200}
        assert worker.poll() is None and web.poll() is None
    finally:
        processes.stop_all()


def test_formats_outside_allowed_formats_are_refused(service, tiny_model):
    service.worker(**tiny_settings(tiny_model))
    web = service.web(ALLOWED_FORMATS="PNG")
    assert post_image(web.url, image_bytes(fmt="PNG"), "a.png").status_code == 200
    response = post_image(web.url, image_bytes(fmt="JPEG"))
    assert response.status_code == 400 and "PNG" in response.json()["error"]


def test_decompression_bomb_is_refused_before_decoding(service, tiny_model):
    service.worker(**tiny_settings(tiny_model))
    web = service.web(MAX_IMAGE_PIXELS=1_000_000)
    started = time.monotonic()
    bomb = io.BytesIO()
    Image.new("RGB", (3000, 3000)).save(bomb, "PNG")  # 9 megapixels in a few kilobytes
    response = post_image(web.url, bomb.getvalue(), "bomb.png")
    assert response.status_code == 413 and "pixels" in response.json()["error"]
    assert time.monotonic() - started < 2


def test_no_request_keys_survive_a_load_run(service, tiny_model, redis_client):
    service.worker(RESULT_TTL_S=RESULT_TTL_S, **tiny_settings(tiny_model))
    web = service.web(RESULT_TTL_S=RESULT_TTL_S)
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda i: post_image(web.url, image_bytes(seed=i)).status_code,
                                 range(40)))
    assert statuses == [200] * 40
    time.sleep(RESULT_TTL_S)
    assert_nothing_left(redis_client)
    keys = Keys(QUEUE)
    leftover = [key for key in redis_client.keys("*") if key.startswith((QUEUE, keys.tag))
                and key != keys.model_history]  # configuration: the accepted model versions
    assert all(redis_client.ttl(key) > 0 for key in leftover), leftover  # heartbeats only
    assert not any(":result:" in key or ":processing:" in key for key in leftover)


def test_redis_down_at_start_is_503_not_500(tmp_path, tiny_model):
    port = free_port()  # nothing listens here
    processes = Processes(f"redis://127.0.0.1:{port}/0", tmp_path)
    try:
        web = processes.web()
        started = time.monotonic()
        response = post_image(web.url, image_bytes())
        assert response.status_code == 503 and response.json()["success"] is False
        assert time.monotonic() - started < 3
        assert requests.get(f"{web.url}/readyz").status_code == 503
    finally:
        processes.stop_all()

