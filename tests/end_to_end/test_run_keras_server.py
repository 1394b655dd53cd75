"""The core path: /predict -> Redis list -> batching model worker -> result, with real processes."""
import json
import os
import re
import signal
import time

import numpy as np
import pytest
import requests

from serving.wire import jobqueue
from conftest import (LASTING_HEARTBEAT, QUEUE, ROOT, assert_own_answers, children_of,
                      distinct_images, frozen_workers, image_bytes, is_running, post_concurrently,
                      post_image, process_name, tiny_direct, tiny_settings, wait_until,
                      worker_stats)
from serving.images import prepare_image

RESNET_SEED = 1234


@pytest.fixture(scope="module")
def resnet50_service(redis_server, tmp_path_factory):
    """ResNet50 (random weights, fixed seed) behind one worker and one web instance."""
    from conftest import Processes

    processes = Processes(redis_server["url"], tmp_path_factory.mktemp("resnet50"), "resnet50")
    processes.worker(MODEL_SEED=RESNET_SEED, BATCH_SIZE=8)
    yield processes.web()
    processes.stop_all()


@pytest.fixture(scope="module")
def resnet50_direct():
    """The same model built in this process, to call directly."""
    import keras

    keras.utils.set_random_seed(RESNET_SEED)
    return keras.applications.ResNet50(weights=None)


def assert_imagenet_top_k(predictions, expected):
    """The answer is the top-k of the expected probabilities: labels, order and values."""
    labels = json.loads((ROOT / "data" / "imagenet_class_index.json").read_text())
    for prediction, index in zip(predictions, np.argsort(expected)[::-1]):
        assert prediction["label"] == labels[str(index)][1]
        assert prediction["probability"] == pytest.approx(expected[index], abs=1e-5)


def direct_probabilities(model, data, preprocess):
    height, width, channels = model.input_shape[1:]
    pixels = prepare_image(data, (width, height), channels)
    return np.asarray(model.predict_on_batch(preprocess(pixels[None].astype(np.float32))))[0]


@pytest.mark.parametrize("mode, fmt", [("RGB", "JPEG"), ("RGB", "PNG"), ("L", "JPEG"),
                                       ("RGBA", "PNG")])
def test_predictions_equal_a_direct_model_call(resnet50_service, resnet50_direct, mode, fmt):
    from keras.applications.resnet50 import preprocess_input

    data = image_bytes(mode, fmt=fmt, seed=3)
    response = post_image(resnet50_service.url, data)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True
    assert len(body["predictions"]) == 5
    assert_imagenet_top_k(body["predictions"],
                          direct_probabilities(resnet50_direct, data, preprocess_input))


def test_top_k_parameter(resnet50_service):
    response = post_image(resnet50_service.url, image_bytes(), top_k=3)
    assert response.status_code == 200
    assert len(response.json()["predictions"]) == 3
    probabilities = [p["probability"] for p in response.json()["predictions"]]
    assert probabilities == sorted(probabilities, reverse=True)


@pytest.mark.parametrize("top_k", ["0", "-1", "many", "²", "٣", "3.0"])
def test_bad_top_k_is_400(resnet50_service, top_k):
    response = post_image(resnet50_service.url, image_bytes(), top_k=top_k)
    assert response.status_code == 400
    assert response.json()["success"] is False


def truncated_jpeg():
    data = image_bytes(size=(640, 480))
    return data[: len(data) // 2]


BAD_UPLOADS = {
    "missing field": dict(field="file", data=image_bytes()),
    "empty file": dict(data=b""),
    "random bytes": dict(data=np.random.default_rng(1).bytes(5000)),
    "text file": dict(data=b"hello, this is not an image\n" * 20, filename="notes.txt"),
    "truncated jpeg": dict(data=truncated_jpeg()),
    "over the upload limit": dict(data=b"\xff" * 300_000),
}


@pytest.fixture(scope="module")
def tiny_service(redis_server, tmp_path_factory, tiny_model):
    """The tiny model behind one worker and one web instance with a 200 kB upload limit."""
    from conftest import Processes

    processes = Processes(redis_server["url"], tmp_path_factory.mktemp("tiny"), "tiny")
    worker = processes.worker(**tiny_settings(tiny_model))
    web = processes.web(MAX_UPLOAD_BYTES=200_000)
    yield web, worker
    processes.stop_all()


@pytest.mark.parametrize("case", BAD_UPLOADS)
def test_bad_input_is_a_json_4xx_and_service_keeps_working(tiny_service, case):
    web, worker = tiny_service
    upload = dict(BAD_UPLOADS[case])

    response = post_image(web.url, upload.pop("data"), **upload)

    assert 400 <= response.status_code < 500, response.text
    body = response.json()
    assert body["success"] is False
    assert isinstance(body["error"], str) and len(body["error"]) > 10
    assert worker.poll() is None
    good = post_image(web.url, image_bytes())
    assert good.status_code == 200 and good.json()["success"] is True


def test_unknown_route_and_wrong_method_are_json(tiny_service):
    web, _ = tiny_service
    for response, status in ((requests.get(f"{web.url}/nope"), 404),
                             (requests.get(f"{web.url}/predict"), 405)):
        assert response.status_code == status
        assert response.json()["success"] is False and response.json()["error"]


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(
        service, tiny_model, redis_client, keys):
    # A window long enough that one job (1/s) makes another likely within it: it is waited out.
    worker = service.worker(BATCH_SIZE=8, BATCH_TIMEOUT_MS=1000, **tiny_settings(tiny_model))
    web = service.web()
    images = distinct_images(16)
    expected = [tiny_direct(tiny_model, data) for data in images]
    assert min(np.abs(a - b).max() for i, a in enumerate(expected) for b in expected[i + 1:]) > 1e-3

    responses = post_concurrently(web.url, images, 16)

    assert_own_answers(responses, images, tiny_model)
    assert len({r.headers["X-Request-ID"] for r in responses}) == 16
    stats = wait_until(lambda: (s := worker_stats(redis_client, keys)[str(worker.pid)])["jobs"]
                       == "16" and s, what="the worker's heartbeat to count 16 jobs")
    assert int(stats["batches"]) < 16
    assert max(int(r.headers["X-Batch-Size"]) for r in responses) > 1


def test_two_workers_share_one_queue_and_answer_each_request_once(
        service, tiny_model, redis_client, keys):
    workers = [service.worker(BATCH_SIZE=4, BATCH_TIMEOUT_MS=20, **tiny_settings(tiny_model))
               for _ in range(2)]
    web = service.web()
    images = distinct_images(48)

    responses = post_concurrently(web.url, images, 48)

    assert_own_answers(responses, images, tiny_model)
    served_by = {r.headers["X-Model-Worker"] for r in responses}

    def all_counted():
        stats = worker_stats(redis_client, keys)
        jobs = [int(stats[str(w.pid)]["jobs"]) for w in workers]
        return sum(jobs) == 48 and jobs

    jobs = wait_until(all_counted, what="the heartbeats to count all 48 jobs")
    assert len(served_by) == 2 and all(count > 0 for count in jobs)
    assert redis_client.llen(QUEUE) == 0
    assert not redis_client.keys(keys.processing("*"))


def test_a_request_unanswered_by_its_deadline_gets_504_and_leaves_nothing_in_redis(
        service, tiny_model, redis_client, keys):
    service.worker(**LASTING_HEARTBEAT, **tiny_settings(tiny_model))
    web = service.web(REQUEST_TIMEOUT_S=1.5, RESULT_TTL_S=1)

    with frozen_workers(redis_client, keys):  # warm to the web tier, and claiming nothing
        started = time.monotonic()
        response = post_image(web.url, image_bytes())
        elapsed = time.monotonic() - started

    assert response.status_code == 504
    assert response.json()["success"] is False and "timeout" in response.json()["error"]
    assert 1.5 <= elapsed < 6
    time.sleep(1.2)
    assert redis_client.llen(QUEUE) == 0
    assert redis_client.keys(keys.job("*")) + redis_client.keys(keys.result("*")) == []


def test_auto_batch_size_is_measured_logged_and_reported(service, tiny_model, redis_client, keys):
    worker = service.worker(BATCH_SIZE="auto", **tiny_settings(tiny_model))
    chosen = worker_stats(redis_client, keys)[str(worker.pid)]["batch_size"]
    log = worker.log_path.read_text()
    assert chosen.isdigit() and f"BATCH_SIZE=auto chose {chosen}; medians of 7 rounds" in log
    table = log.split("medians of 7 rounds:")[1]
    assert re.search(rf"^ +{chosen} images .* img/s .*<- chosen$", table, re.M)


@pytest.mark.parametrize("case", ["missing weights file", "corrupt weights file", "no such model"])
def test_unloadable_model_stops_the_worker_at_start_saying_how_to_fix_it(service, tmp_path, case):
    corrupt = tmp_path / "weights.h5"
    corrupt.write_bytes(b"not hdf5")
    overrides = {"missing weights file": {"MODEL_WEIGHTS": tmp_path / "absent.h5"},
                 "corrupt weights file": {"MODEL_WEIGHTS": corrupt},
                 "no such model": {"MODEL": tmp_path / "absent.keras"}}[case]

    worker = service.worker(wait=False, **overrides)

    assert worker.wait(120) == 2
    log = worker.log_path.read_text()
    assert "ERROR" in log and ("MODEL_WEIGHTS" in log or "MODEL=" in log or "weights from" in log)


def test_sigterm_while_the_first_version_loads_stops_its_process_and_exits_0(
        service, tiny_model, redis_client, keys):
    worker = service.worker(wait=False, **tiny_settings(tiny_model))
    model = wait_until(lambda: [pid for pid in children_of(worker.pid)
                                if process_name(pid) == "model-process"],
                       interval=0.01, what="the worker's first model process to start")[0]
    os.kill(model, signal.SIGSTOP)  # held before it serves, for as long as this takes
    loading = children_of(worker.pid)  # it, and the fork server it comes from
    assert not jobqueue.live_workers(redis_client, keys), "it was to be stopped while loading"
    worker.send_signal(signal.SIGTERM)

    assert worker.wait(60) == 0  # stopped as asked: neither "no model would load" (2) nor a crash
    assert not [pid for pid in loading if is_running(pid)]  # not left loading for nobody
    assert "refuses" not in worker.log_path.read_text()


def test_sigterm_over_and_over_to_a_serving_worker_still_exits_0(service, tiny_model):
    worker = service.worker(**tiny_settings(tiny_model))
    # An orchestrator that repeats its SIGTERM: it comes up to the worker's last instant, when
    # Python has given the handler back to the default, and must not turn a clean stop into a kill.
    storm_ends = time.monotonic() + 60
    while time.monotonic() < storm_ends and worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        time.sleep(0.001)

    assert worker.wait(1) == 0
    assert "stopped after" in worker.log_path.read_text()


def test_weights_file_is_loaded_into_the_named_model(service, tmp_path):
    import keras
    from keras.applications.mobilenet_v2 import preprocess_input

    keras.utils.set_random_seed(99)
    model = keras.applications.MobileNetV2(weights=None)
    weights = tmp_path / "mobilenet_v2.weights.h5"
    model.save_weights(weights)
    service.worker(MODEL="mobilenet_v2", MODEL_WEIGHTS=weights, BATCH_SIZE=4)
    web = service.web()
    data = image_bytes(seed=5)

    response = post_image(web.url, data)

    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == 5
    assert_imagenet_top_k(response.json()["predictions"],
                          direct_probabilities(model, data, preprocess_input))
