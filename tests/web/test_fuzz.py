"""Property-based fuzzing of /predict and /v2 infer: whatever the body, never a 5xx, a hang or a
dead worker."""
import base64
import json
import struct
import zlib

import pytest
import requests
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import Processes, image_bytes, post_image, tiny_settings

FORMATS = ["JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP"]
SAMPLES = {fmt: image_bytes("RGB", size=(48, 40), fmt=fmt) for fmt in FORMATS}
REQUEST_TIMEOUT_S = 5


@pytest.fixture(scope="module")
def fuzzed_service(redis_server, tmp_path_factory, tiny_model):
    processes = Processes(redis_server["url"], tmp_path_factory.mktemp("fuzz"), "fuzz")
    worker = processes.worker(**tiny_settings(tiny_model))
    web = processes.web(REQUEST_TIMEOUT_S=REQUEST_TIMEOUT_S, MAX_UPLOAD_BYTES=200_000,
                        MAX_IMAGE_PIXELS=4_000_000)
    yield worker, web
    processes.stop_all()


def png_header(width, height, mode_byte):
    """A PNG that declares any size and colour type; its pixel data is empty or garbage."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, mode_byte, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)))


@st.composite
def corrupted_image(draw):
    data = bytearray(SAMPLES[draw(st.sampled_from(FORMATS))])
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(0, len(data)))])


huge_png = st.builds(png_header, st.integers(1, 2**31 - 1), st.integers(1, 2**31 - 1),
                     st.sampled_from([0, 2, 3, 4, 6, 7])).map(lambda header: header + b"\0" * 64)
payloads = st.one_of(st.binary(max_size=4096), corrupted_image(), huge_png,
                     st.sampled_from(list(SAMPLES.values())))
multipart = st.tuples(st.just("multipart"), st.sampled_from(["image", "image", "file", "img", ""]),
                      payloads, st.sampled_from(["a.jpg", "", "x" * 300, "../../etc/passwd"]))
raw = st.tuples(st.just("raw"), st.sampled_from([
    "application/octet-stream", "image/jpeg", "multipart/form-data",
    "multipart/form-data; boundary=xyz", "text/plain", "application/x-www-form-urlencoded",
    "application/json"]), payloads, st.none())
query = st.sampled_from([{}, {"top_k": "3"}, {"top_k": "0"}, {"top_k": "9" * 30},
                         {"top_k": "-1"}, {"top_k": "x"}, {"top_k": "²"}])


@settings(max_examples=2000, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(body=st.one_of(multipart, raw), params=query)
def test_no_body_gets_a_5xx_or_hangs(fuzzed_service, body, params):
    _, web = fuzzed_service
    kind, name, data, filename = body
    if kind == "multipart":
        response = post_image(web.url, data, filename, field=name, timeout=REQUEST_TIMEOUT_S + 5,
                              **params)
    else:
        response = requests.post(f"{web.url}/predict", data=data, params=params,
                                 headers={"Content-Type": name}, timeout=REQUEST_TIMEOUT_S + 5)

    assert response.status_code < 500, (response.status_code, response.text)
    body = response.json()
    assert body["success"] is (response.status_code == 200)
    assert "predictions" in body if body["success"] else body["error"]


def test_service_is_whole_after_fuzzing(fuzzed_service):
    worker, web = fuzzed_service
    assert worker.poll() is None and web.poll() is None
    assert post_image(web.url, image_bytes()).status_code == 200


# --- The Open Inference Protocol's infer: hostile JSON headers and binary data ---------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                               max_size=3), max_leaves=12)
pixel_data = st.one_of(st.just([7] * (32 * 32 * 3)), st.lists(st.integers(-300, 300), max_size=40),
                       json_values)
shapes = st.one_of(st.just([1, 32, 32, 3]), st.just([2]), st.just([1]),
                   st.lists(st.integers(-2, 2**40) | st.booleans(), max_size=5), json_values)
tensors = st.fixed_dictionaries({
    "name": st.sampled_from(["pixels", "image", "input", ""]) | json_values,
    "datatype": st.sampled_from(["UINT8", "BYTES", "FP32"]) | json_values,
    "shape": shapes,
    "data": pixel_data | st.lists(st.binary(max_size=64).map(
        lambda b: base64.b64encode(b).decode()), max_size=3),
}, optional={"parameters": st.fixed_dictionaries({}, optional={
    "binary_data_size": st.integers(-5, 10**6) | json_values}) | json_values})
outputs = st.one_of(st.none(), st.just([{"name": "probabilities"}]), st.lists(
    st.fixed_dictionaries({"name": st.sampled_from(["probabilities", "x"]) | json_values},
                          optional={"parameters": json_values | st.fixed_dictionaries({
                              "classification": st.integers(-3, 10**9) | json_values,
                              "binary_data": json_values})}), max_size=2))
headers = st.fixed_dictionaries({"inputs": st.lists(tensors, max_size=2) | json_values},
                                optional={"outputs": outputs, "id": json_values,
                                          "parameters": json_values})


@settings(max_examples=600, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(header=headers | json_values, tail=st.binary(max_size=64) | st.sampled_from(
    list(SAMPLES.values())), length=st.sampled_from([None, "exact", "0", "-1", "x", "99999"]))
def test_no_infer_request_gets_a_5xx_or_hangs(fuzzed_service, header, tail, length):
    _, web = fuzzed_service
    text = json.dumps(header).encode()
    if length is None:
        body, extra = text, {}
    else:
        body = text + tail
        extra = {"Inference-Header-Content-Length": str(len(text)) if length == "exact" else length}
    response = requests.post(f"{web.url}/v2/models/tiny/infer", data=body, headers=extra,
                             timeout=REQUEST_TIMEOUT_S + 5)
    assert response.status_code < 500, (response.status_code, response.text)
    if response.status_code != 200:
        assert set(response.json()) == {"error"}, response.text
