"""Reading an infer request's JSON: whole numbers are read by numpy, without holding the event
loop, and equal what json.loads reads; anything else still gets json.loads' answer."""
import gc
import json
import threading
import time

import numpy as np
import pytest

import settings
from serving.errors import ServiceError
from serving.web.inference_protocol import read_images, read_request

SHAPE = [2, 8, 8, 3]


def body_of(data, shape=SHAPE, before="", after=""):
    return json.dumps({**json.loads("{" + before + "}"), "inputs": [
        {"name": "pixels", "datatype": "UINT8", "shape": shape, "data": data}],
        **json.loads("{" + after + "}")}).encode()


@pytest.mark.parametrize("nested", [False, True], ids=["flat", "nested"])
def test_whole_numbers_read_by_numpy_equal_what_json_reads(nested):
    pixels = np.random.default_rng(0).integers(0, 256, SHAPE)
    data = pixels.tolist() if nested else pixels.ravel().tolist()
    body = body_of(data, before='"id": "a \\"data\\": [1]"',
                   after='"outputs": [{"name": "probabilities"}], "parameters": {"data": [7]}')
    header, binary = read_request(body, len(body), SHAPE)
    assert isinstance(header["inputs"][0]["data"], np.ndarray)  # numpy read it
    assert header["inputs"][0]["data"].tolist() == pixels.ravel().tolist()
    assert {key: value for key, value in header.items() if key != "inputs"} == {
        "id": 'a "data": [1]', "outputs": [{"name": "probabilities"}],
        "parameters": {"data": [7]}}
    assert binary == b""
    _, _, images = read_images(body, len(body), SHAPE[1:], SHAPE)
    assert np.array_equal(np.stack(images), pixels.astype(np.uint8))
    # Another "data" list before the input's: json.loads reads it all, to the same images.
    body = body_of(data, before='"parameters": {"data": [7, 8]}')
    _, _, images = read_images(body, len(body), SHAPE[1:], SHAPE)
    assert np.array_equal(np.stack(images), pixels.astype(np.uint8))


@pytest.mark.parametrize("data, reason", [
    ([-1] * 384, "whole numbers from 0 to 255"),
    ([0.5] * 384, "whole numbers from 0 to 255"),
    ([300] * 384, "whole numbers from 0 to 255"),
    ([1] * 383, "needs 384 values, not 383"),
    ([], "needs 384 values, not 0"),
    ([[1, 2], []], "input 'pixels'"),  # ragged
    ("not a list", "carries no data"),
])
def test_other_data_gets_the_answers_json_gave(data, reason):
    body = body_of(data)
    with pytest.raises(ServiceError, match=reason) as refused:
        read_images(body, len(body), SHAPE[1:], SHAPE)
    assert refused.value.status == 400


@pytest.mark.parametrize("text", [b"[1,,2]", b"[1 2]", b"[1,2,]", b"[[1],[2]", b"[1][2]",
                                  b"[1, 2] x"])
def test_malformed_lists_are_not_valid_json(text):
    body = b'{"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 2], "data": ' + \
        text + b"}]}"
    with pytest.raises(ServiceError, match="not valid JSON"):
        read_request(body, len(body), [1, 2])


def test_reading_the_largest_json_body_leaves_the_event_loop_running():
    """The largest batch of pixels a request may carry (MAX_IMAGES_PER_REQUEST at ResNet50's
    input), nested: while it is read, another thread (the event loop, for the thread that parses
    off it) is held for a small part of the time json.loads would hold it."""
    shape = [settings.MAX_IMAGES_PER_REQUEST, 224, 224, 3]
    body = body_of(np.random.default_rng(1).integers(0, 256, shape).tolist(), shape)

    def longest_hold(parse):
        stop, gaps = threading.Event(), [0.0]

        def loop():
            last = time.perf_counter()
            while not stop.is_set():
                time.sleep(0.001)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now
        ticking = threading.Thread(target=loop)
        ticking.start()
        time.sleep(0.05)
        started = time.perf_counter()
        parse()
        took = time.perf_counter() - started
        stop.set()
        ticking.join()
        return max(gaps), took

    gc.disable()  # (a collection may run other threads' finalizers, which lets them run too)
    try:
        held, took = longest_hold(lambda: read_request(body, len(body), shape))
        json_held, json_took = longest_hold(lambda: json.loads(body))
    finally:
        gc.enable()
    assert json_held > 0.5 * json_took, (json_held, json_took)  # json.loads holds it throughout
    assert held < 0.2 * took, (held, took)
