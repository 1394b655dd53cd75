"""The Open Inference Protocol (KServe v2 REST) through its reference client, tritonclient[http]
from PyPI, against real processes: a model worker, gunicorn and redis-server.
"""
import base64
import json
import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
import tritonclient.http as triton

from conftest import (LASTING_HEARTBEAT, distinct_images, post_image, tiny_settings, wait_until,
                      worker_stats)
from serving.images import prepare_image


@pytest.fixture
def served(service, tiny_model):
    """A worker with the tiny model (batches of up to 8) and a web instance; the triton client.
    (A heartbeat outlives a held model process: see test_batched_with_predict_traffic.)"""
    worker = service.worker(BATCH_SIZE=8, **LASTING_HEARTBEAT, **tiny_settings(tiny_model))
    web = service.web(**LASTING_HEARTBEAT)
    client = triton.InferenceServerClient(url=web.url.removeprefix("http://"))
    yield {"web": web, "worker": worker, "client": client, "name": "tiny"}
    client.close()


def predict_probabilities(url, data):
    """The probabilities /predict gives one image, by class index (the tiny model has 10)."""
    response = post_image(url, data, filename="i.png", top_k=10)
    assert response.status_code == 200, response.text
    found = np.zeros(10, np.float32)
    for prediction in response.json()["predictions"]:
        found[int(prediction["label"].split("_")[1])] = prediction["probability"]
    return found


def pixels_input(images, binary):
    pixels = np.stack([prepare_image(data, (32, 32), 3) for data in images])
    tensor = triton.InferInput("pixels", list(pixels.shape), "UINT8")
    tensor.set_data_from_numpy(pixels, binary_data=binary)
    return tensor


def image_input(images, binary):
    # JSON strings cannot carry binary: in JSON each file travels in base64.
    files = np.array(images if binary else [base64.b64encode(d) for d in images], dtype=object)
    tensor = triton.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(files, binary_data=binary)
    return tensor


def test_health_and_metadata(served):
    client, name = served["client"], served["name"]
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(name)
    assert not client.is_model_ready("resnet50")
    server = client.get_server_metadata()
    assert {"binary_tensor_data", "classification"} <= set(server["extensions"])
    metadata = client.get_model_metadata(name)
    assert metadata["name"] == name and metadata["versions"] == ["1"]
    assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in metadata["inputs"]} == {
        ("image", "BYTES", (-1,)), ("pixels", "UINT8", (-1, 32, 32, 3))}
    assert metadata["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    assert client.get_model_metadata(name, model_version="1")["versions"] == ["1"]
    assert not client.is_model_ready(name, model_version="2")
    pixels = pixels_input(distinct_images(1), True)
    assert client.infer(name, [pixels], model_version="1").as_numpy("probabilities").shape == (
        1, 10)
    with pytest.raises(triton.InferenceServerException, match="no model tiny version 2"):
        client.infer(name, [pixels], model_version="2")


def test_infer_equals_predict(served):
    """UINT8 pixels and BYTES files, each sent as binary data and as JSON."""
    images = distinct_images(3)
    expected = [predict_probabilities(served["web"].url, data) for data in images]
    for make_input in (pixels_input, image_input):
        for binary in (True, False):
            outputs = [triton.InferRequestedOutput("probabilities", binary_data=binary)]
            result = served["client"].infer(served["name"], [make_input(images, binary)],
                                            outputs=outputs, request_id="req-1")
            probabilities = result.as_numpy("probabilities")
            assert probabilities.dtype == np.float32 and probabilities.shape == (3, 10)
            assert result.get_response()["id"] == "req-1"
            np.testing.assert_allclose(probabilities, expected, atol=1e-6,
                                       err_msg=f"{make_input.__name__}, binary={binary}")


def test_default_outputs_are_binary(served):
    # With no outputs named, tritonclient asks for every output in binary.
    images = distinct_images(2)
    result = served["client"].infer(served["name"], [pixels_input(images, True)])
    assert result.get_output("probabilities")["parameters"]["binary_data_size"] == 2 * 10 * 4
    np.testing.assert_allclose(result.as_numpy("probabilities")[1],
                               predict_probabilities(served["web"].url, images[1]), atol=1e-6)


def test_classification_extension(served):
    images = distinct_images(2)
    for binary in (True, False):
        outputs = [triton.InferRequestedOutput("probabilities", binary_data=binary,
                                               class_count=3)]
        result = served["client"].infer(served["name"], [image_input(images, binary)],
                                        outputs=outputs)
        top = result.as_numpy("probabilities")
        assert top.shape == (2, 3)
        for row, data in zip(top, images):
            expected = predict_probabilities(served["web"].url, data)
            order = np.argsort(expected)[::-1][:3]
            parts = [(item.decode() if isinstance(item, bytes) else item).split(":")
                     for item in row]
            assert [int(index) for _, index, _ in parts] == list(order)
            assert [label for _, _, label in parts] == [f"class_{i}" for i in order]
            np.testing.assert_allclose([float(value) for value, _, _ in parts],
                                       expected[order], rtol=1e-6)


def test_batched_with_predict_traffic(served, redis_client, keys):
    """A /predict job and an infer job waiting together run in one forward pass."""
    beat = next(iter(worker_stats(redis_client, keys).values()))
    model_pid = int(beat["model_pid"])
    images = distinct_images(3)
    answers = {}

    def predict(name, image):
        answers[name] = post_image(served["web"].url, image, filename="a.png")

    def infer():
        try:
            answers["infer"] = served["client"].infer(served["name"],
                                                      [image_input(images[2:], True)])
        except Exception as exc:
            answers["infer"] = exc

    def jobs_in_redis():
        claimed = sum(redis_client.llen(key) for key in redis_client.scan_iter(
            keys.processing("*")))
        return redis_client.llen(keys.queue) + claimed

    # The model process is held while the jobs arrive. A lane blocked on the queue still gets
    # the first one from Redis meanwhile (with whatever is queued at that moment): a filler goes
    # first, so the two jobs under test, sent after it, wait on the queue together and are
    # claimed together when the process goes on (with the filler, or without it).
    os.kill(model_pid, signal.SIGSTOP)
    try:
        threads = [threading.Thread(target=predict, args=("filler", images[0]))]
        threads[0].start()
        wait_until(lambda: jobs_in_redis() == 1, timeout=10, what="the filler in Redis")
        threads += [threading.Thread(target=predict, args=("predict", images[1])),
                    threading.Thread(target=infer)]
        for thread in threads[1:]:
            thread.start()
        wait_until(lambda: jobs_in_redis() == 3, timeout=10, what="every job in Redis")
    finally:
        os.kill(model_pid, signal.SIGCONT)
    for thread in threads:
        thread.join(30)
    assert answers["filler"].status_code == 200, answers["filler"].text
    assert answers["predict"].status_code == 200, answers["predict"].text
    assert not isinstance(answers["infer"], Exception), answers["infer"]
    # Of three jobs, two that each ran in a batch of two or more ran in the same one.
    assert int(answers["predict"].headers["X-Batch-Size"]) >= 2
    assert answers["infer"].get_response()["parameters"]["batch_size"] >= 2


def test_errors_in_the_protocols_shape(served, redis_client, keys):
    url, name = served["web"].url, served["name"]
    pixels = {"name": "pixels", "datatype": "UINT8", "shape": [1, 32, 32, 3],
              "data": [0] * (32 * 32 * 3)}
    cases = [
        (requests.get(f"{url}/v2/models/resnet50"), 404, "no model resnet50"),
        (requests.post(f"{url}/v2/models/resnet50/infer", json={"inputs": [pixels]}), 404,
         "no model resnet50"),
        (requests.post(f"{url}/v2/models/{name}/infer", data=b"{not json"), 400, "not valid JSON"),
        (requests.post(f"{url}/v2/models/{name}/infer",
                       json={"inputs": [{**pixels, "shape": [1, 16, 16, 3]}]}), 400,
         "must have shape [N, 32, 32, 3]"),
        (requests.post(f"{url}/v2/models/{name}/infer",
                       json={"inputs": [{**pixels, "data": [300] * (32 * 32 * 3)}]}), 400,
         "from 0 to 255"),
        (requests.post(f"{url}/v2/models/{name}/infer",
                       json={"inputs": [{**pixels, "shape": [33, 32, 32, 3]}]}), 413,
         "MAX_IMAGES_PER_REQUEST"),
        (requests.post(f"{url}/v2/models/{name}/infer", json={"inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1],
             "data": [base64.b64encode(b"not an image").decode()]}]}), 400,
         "input 'image' element 0: the upload is not an image"),
        (requests.post(f"{url}/v2/models/{name}/infer", json={"inputs": [pixels], "outputs": [
            {"name": "logits"}]}), 400, "one output, 'probabilities'"),
        (requests.post(f"{url}/v2/models/{name}/infer",
                       data=b'{"inputs": []}' + b"\0" * 8,
                       headers={"Inference-Header-Content-Length": "14"}), 400, "send one input"),
        (requests.post(f"{url}/v2/models/{name}/infer", data=b'{"inputs": []}',
                       headers={"Inference-Header-Content-Length": "9" * 5000}), 400,
         "must be a byte count"),
        (requests.get(f"{url}/v2/nowhere"), 404, "not found"),
        # Refused before parsing: more lists than any input of this model has room for, or than
        # the declared shape has (the parser would build about 60 bytes for each byte of it).
        (requests.post(f"{url}/v2/models/{name}/infer", data=b"[" * 100_000), 400,
         "more values or lists than its input's shape [32, 32, 32, 3] has room for"),
        (requests.post(f"{url}/v2/models/{name}/infer", data=json.dumps({"inputs": [
            {**pixels, "data": [[]] * 300_000}]})), 400,
         "more values or lists than its input's shape [1, 32, 32, 3] has room for"),
        (requests.post(f"{url}/v2/models/{name}/infer", json={"inputs": [
            {"name": "image", "datatype": "BYTES", "shape": [1],
             "parameters": {"binary_data_size": 16}}]}), 400, "16"),
    ]
    for response, status, message in cases:
        assert response.status_code == status, response.text
        assert set(response.json()) == {"error"} and message in response.json()["error"]
    assert redis_client.llen(keys.queue) == 0


def test_a_request_pinned_to_a_version_is_answered_by_it_while_two_versions_serve(
        service, tiny_model, redis_client, keys):
    # Mid-rollout, one worker serves version 1 and another version 2 of the same model, on one
    # queue: a request pinned to a version is answered by that version, whichever worker claims
    # its jobs first, and never with 404 while the version still serves.
    service.worker(MODEL_VERSION="1", BATCH_SIZE=4, **tiny_settings(tiny_model))
    redis_client.delete(keys.model_history)  # (else the second would start at the first's)
    service.worker(MODEL_VERSION="2", BATCH_SIZE=4, **tiny_settings(tiny_model))
    web = service.web()
    wait_until(lambda: requests.get(f"{web.url}/v2/models/tiny").json().get("versions")
               == ["1", "2"], what="both versions to serve")
    images = distinct_images(4)

    def infer(version):  # (a client each: tritonclient's is not for several threads at once)
        client = triton.InferenceServerClient(url=web.url.removeprefix("http://"))
        try:
            result = client.infer("tiny", [image_input(images, binary=True)],
                                  model_version=version)
        finally:
            client.close()
        return version, result.get_response()["model_version"]

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(infer, ["1", "2"] * 12))
    assert all(asked == answered for asked, answered in answers), answers
    assert redis_client.llen(keys.queue) == 0
