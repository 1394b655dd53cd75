"""The Open Inference Protocol (KServe v2 REST, as Triton and OpenVINO Model Server speak it), on
the same queue, batches, deadlines, admission and metrics as /predict.

The model takes one input tensor per request, either of:
- `image`: BYTES [N], encoded image files, checked, queued, decoded and resized as /predict's
  uploads are (in JSON, each element is the file in base64, since JSON strings cannot carry binary);
- `pixels`: UINT8 [N, height, width, channels] at the model's input size.
It has one output, `probabilities`: FP32 [N, classes]; or, with the classification extension's
parameter `classification: K`, BYTES [N, K] of "value:index:label", most probable first.

Binary tensor data extension: a body may be a JSON header of `Inference-Header-Content-Length`
bytes followed by the input's bytes (`binary_data_size` in its parameters): raw uint8 pixels, or
for BYTES each element as a 4-byte little-endian length and its bytes. Answers are binary the same
way when the request asks (`binary_data_output`, or `binary_data` on the output).
A model's name is the named model (`resnet50`), or its file's name without the extension."""
import json
import math
import re
import struct
import uuid

import numpy as np
from flask import Response, jsonify, request

import settings
from serving.errors import ServiceError
from serving.text import is_whole_number, model_name
from serving.web import api_docs
from serving.web.api_docs import documented
from serving.web.gevent_worker import off_loop, request_deadline
from serving.web.submit import (
    admit_or_refuse,
    check_upload,
    find_warm,
    fresh_heartbeats,
    input_shape_of,
    submit,
    timing_headers,
)
from serving.web.v2_tensors import (
    check_batch,
    check_pixels_shape,
    files_of,
    input_tensor,
    is_count,
    parameters,
    pixels_of,
    whole_numbers,
)
from serving.wire.job_format import decode_array, new_job

OUTPUT = "probabilities"
EXTENSIONS = ["binary_tensor_data", "classification"]
HEADER_LENGTH = "Inference-Header-Content-Length"
INLINE_PARSE_BYTES = 256 * 1024  # bodies parsed on the event loop; larger ones in a thread
# What parsing a body takes at its peak (held from the decoding budget, as an image's decoding
# is), counted in its raw bytes before it is parsed, measured with tracemalloc and set above the
# highest seen: each JSON value a list slot and then numpy's int64 (measured 17 bytes), each JSON
# list an object (measured 100-125), each byte of JSON text its share of strings (measured 5),
# each byte of binary data its copy as elements.
BYTES_PER_VALUE, BYTES_PER_LIST, BYTES_PER_JSON_BYTE = 24, 128, 6
# Values and lists that a request's fields besides its input's data may hold.
HEADER_ALLOWANCE = 64
DECLARED_SHAPE = re.compile(rb'"shape"\s*:\s*\[([\d\s,]*)\]')
DATA_LIST = re.compile(rb'"data"\s*:\s*\[')


def add_routes(app, store, keys, workers, budget):
    """The protocol's routes under /v2 (their errors get its shape: see run_keras_server)."""

    @app.get("/v2")
    @documented(**api_docs.V2_SERVER)
    def server_metadata():
        """The server's name, version and protocol extensions."""
        return jsonify(name="keras-redis-server", version="1", extensions=EXTENSIONS)

    @app.get("/v2/health/live")
    @documented(**api_docs.V2_LIVE)
    def server_live():
        """The web tier answers (as /healthz)."""
        return jsonify(live=True)

    @app.get("/v2/health/ready")
    @documented(**api_docs.V2_READY)
    def server_ready():
        """Some model worker is warm (as /readyz)."""
        find_warm(fresh_heartbeats(store, keys))
        return jsonify(ready=True)

    @app.get("/v2/models/<name>")
    @app.get("/v2/models/<name>/versions/<version>")
    @documented(**api_docs.V2_MODEL)
    def model_metadata_route(name, version=None):
        """A served model's inputs, output, versions and runtime (`platform`)."""
        return jsonify(model_metadata(fresh_heartbeats(store, keys), name, version))

    @app.get("/v2/models/<name>/ready")
    @app.get("/v2/models/<name>/versions/<version>/ready")
    @documented(**api_docs.V2_MODEL_READY)
    def model_ready(name, version=None):
        """A warm worker serves this model (at this version)."""
        find_model(fresh_heartbeats(store, keys), name, version)
        return jsonify(name=name, ready=True)

    @app.post("/v2/models/<name>/infer")
    @app.post("/v2/models/<name>/versions/<version>/infer")
    @documented(**api_docs.V2_INFER)
    def infer(name, version=None):
        """Classify a batch of images, each a job on the queue, batched with /predict's.

        One input: `image`, BYTES [N] of encoded files, or `pixels`, UINT8 [N, height, width,
        channels]. The output `probabilities` is FP32 [N, classes], or BYTES [N, K] of
        "value:index:label" with the parameter classification: K. A body may use the binary
        tensor data extension (header Inference-Header-Content-Length).
        """
        deadline = request_deadline(request.environ)
        beat = find_model(admit_or_refuse(store, keys, workers, deadline), name, version)
        height, width, channels = input_shape_of(beat)
        header, input_name, items = parse_body(budget, request, (height, width, channels),
                                               deadline)
        wants_binary, classification = requested_output(header, int(beat["labels"]))
        if input_name == "image":
            for n, file in enumerate(items):
                check_element(n, file)
        shape = (height, width, channels) if input_name == "pixels" else None
        outputs = {"probabilities": not classification, "classification": classification,
                   "model": name, **({"version": version} if version else {})}
        jobs = [new_job(item, deadline, 1, shape, **outputs) for item in items]
        del items
        results = submit(store, keys, workers, jobs, deadline,
                         request.environ.get("gunicorn.socket"))
        for result in results:
            if isinstance(result, ServiceError):
                raise result
        answer, headers = infer_answer(header, name, results, wants_binary, classification)
        return Response(answer, headers={**headers, **timing_headers(results[0])})


def parse_body(budget, request, input_shape, deadline):
    """read_images of the request's body, within the decoding budget once its cost is known
    (parsing_cost); a large body is parsed off the event loop, as a large image is decoded. The
    body is not kept."""
    body = request.get_data(cache=False)
    split = header_split(body, request.headers.get(HEADER_LENGTH))
    declared, cost = parsing_cost(body, split, input_shape)
    with budget.reserve(cost, deadline):
        if len(body) > INLINE_PARSE_BYTES:
            return off_loop(read_images, body, split, input_shape, declared)
        return read_images(body, split, input_shape, declared)


def header_split(body, header_length):
    """Where a body's JSON header ends: Inference-Header-Content-Length, else the body's end."""
    if header_length is None:
        return len(body)
    split = int(header_length) if is_whole_number(header_length) else -1
    if not 0 <= split <= len(body):
        raise ServiceError(f"{HEADER_LENGTH} must be a byte count within the body's "
                           f"{len(body)} bytes", 400)
    return split


def parsing_cost(body, split, input_shape):
    """(the shape the body declares, None if it declares none, and the bytes parsing it takes),
    before it is parsed: its JSON's values and lists, counted in its bytes, must fit that shape
    (its data in nested lists, or flat), or without one the largest the model takes, else 400. So
    no body makes the parser build far more than an input holds."""
    found = DECLARED_SHAPE.search(body, 0, split)
    parts = found[1].split(b",") if found else []
    declared = ([int(part) for part in parts] if parts and all(part.strip() for part in parts)
                else None)
    if declared:  # what is wrong with the shape itself is said first
        check_batch(declared)
        if len(declared) == 4:
            check_pixels_shape(declared, input_shape)
    shape = declared or [settings.MAX_IMAGES_PER_REQUEST, *input_shape]
    values, lists = body.count(b",", 0, split) + 1, body.count(b"[", 0, split)
    most_values = math.prod(shape) if split == len(body) else 0
    most_lists = 1 + sum(math.prod(shape[:k]) for k in range(1, len(shape)))
    if values > most_values + HEADER_ALLOWANCE or lists > most_lists + HEADER_ALLOWANCE:
        raise ServiceError(f"the request holds more values or lists than its input's shape "
                           f"{shape} has room for", 400)
    cost = (BYTES_PER_VALUE * values + BYTES_PER_LIST * lists + BYTES_PER_JSON_BYTE * split
            + len(body) - split)
    return declared, cost


def check_element(n, data):
    """Refuse element n of an `image` input as /predict refuses an upload (check_upload)."""
    try:
        check_upload(data)
    except ServiceError as refusal:
        raise ServiceError(f"input 'image' element {n}: {refusal.message}", refusal.status,
                           refusal.headers) from refusal


def served_name(beat):
    """The protocol's name of the model a worker serves (see serving.text.model_name)."""
    return model_name(beat["model"])


def find_model(beats, name, version=None):
    """The heartbeat of a warm worker serving model `name` (at `version`, if given): 404 if none
    does, 503 if no worker is warm."""
    warm = find_warm(beats)
    serving = [beat for beat in warm
               if served_name(beat) == name and version in (None, beat["version"])]
    if not serving:
        served = sorted({f"{served_name(beat)} version {beat['version']}" for beat in warm})
        wanted = name if version is None else f"{name} version {version}"
        raise ServiceError(f"no model {wanted} here; served: {', '.join(served)}", 404)
    return serving[-1]


def model_metadata(beats, name, version=None):
    """The protocol's model metadata of model `name`."""
    beat = find_model(beats, name, version)
    height, width, channels = input_shape_of(beat)
    versions = sorted({b["version"] for b in find_warm(beats) if served_name(b) == name})
    return {"name": name, "versions": versions if version is None else [version],
            "platform": beat.get("runtime", "keras"), "precision": beat.get("precision", "fp32"),
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]},
                       {"name": "pixels", "datatype": "UINT8",
                        "shape": [-1, height, width, channels]}],
            "outputs": [{"name": OUTPUT, "datatype": "FP32", "shape": [-1, int(beat["labels"])]}]}


def read_images(body, split, input_shape, declared):
    """An infer request's JSON header (less its inputs), its input's name, and its images: uint8
    pixel arrays (`pixels`) or encoded files (`image`). The input's shape must be the one found
    before parsing (`declared`, see parsing_cost)."""
    header, binary = read_request(body, split, declared)
    name, shape, data = input_tensor(header, binary)
    if declared is not None and shape != declared:
        raise ServiceError(f"the request declares the shape {declared} before its input's "
                           f"{shape}: send the input's shape first", 400)
    del header["inputs"]  # its data, parsed: not kept while the request waits
    if name == "pixels":
        return header, name, pixels_of(shape, data, input_shape)
    return header, name, files_of(shape, data)


def read_request(body, split, declared=None):
    """The JSON header of an infer request (its first `split` bytes), and the binary data
    after it. An input's data of whole numbers, flat or nested as the shape `declared` before
    parsing, is read by numpy (see whole_numbers)."""
    text, numbers, marker = body[:split], None, None
    found = DATA_LIST.search(text)
    if found:
        shape = declared or []
        lists = {1, 1 + sum(math.prod(shape[:k]) for k in range(1, len(shape)))}
        read = whole_numbers(text, found.end() - 1, lists)
        if read:
            numbers, end = read
            marker = f'"{uuid.uuid4().hex}"'.encode()  # where they were: no request holds it
            text = text[:found.end() - 1] + marker + text[end:]
    header = load_header(text)
    if marker:
        tensor = header["inputs"][0] if header["inputs"] else None
        if not isinstance(tensor, dict) or tensor.get("data") != marker[1:-1].decode():
            return load_header(body[:split]), body[split:]  # the list was another "data"
        tensor["data"] = numbers
    return header, body[split:]


def load_header(text):
    """An infer request's JSON header: an object with a list of inputs, else 400."""
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as exc:  # (UnicodeDecodeError is a ValueError)
        raise ServiceError(f"the request is not valid JSON: {exc}", 400) from exc
    if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
        raise ServiceError("the request must be a JSON object with a list of inputs", 400)
    return header


def requested_output(header, classes):
    """How the request wants `probabilities`: (binary?, classification K; 0 for all of them)."""
    binary = parameters(header).get("binary_data_output") is True
    outputs = header.get("outputs") or []
    if not isinstance(outputs, list) or len(outputs) > 1 or any(
            not isinstance(output, dict) or output.get("name") != OUTPUT for output in outputs):
        raise ServiceError(f"this model has one output, {OUTPUT!r}", 400)
    if not outputs:
        return binary, 0
    wanted = parameters(outputs[0])
    top = wanted.get("classification", 0)
    if not is_count(top):
        raise ServiceError("classification must be a whole number of classes", 400)
    return wanted.get("binary_data", binary) is True, min(top, classes)


def infer_answer(header, name, results, binary, classification):
    """The body and headers of an infer answer, from the jobs' results in order."""
    wanted = "classification" if classification else "probabilities"
    if any(wanted not in result for result in results):
        raise ServiceError(f"a model worker answered without {wanted}: it runs an older "
                           "version of the service; retry", 503, {"Retry-After": "1"})
    if classification:
        rows = [result["classification"] for result in results]
        tensor = {"name": OUTPUT, "datatype": "BYTES", "shape": [len(rows), classification]}
        values = [text for row in rows for text in row]
        blob = (b"".join(struct.pack("<I", len(v)) + v for v in (t.encode() for t in values))
                if binary else None)
    else:
        probabilities = np.stack([decode_array(result["probabilities"], (-1,), np.float32)
                                  for result in results])
        tensor = {"name": OUTPUT, "datatype": "FP32", "shape": list(probabilities.shape)}
        values = None if binary else probabilities.ravel().tolist()
        blob = probabilities.astype("<f4").tobytes() if binary else None
    first = results[0]
    answer = {"model_name": name, "model_version": first["model_version"], "outputs": [tensor],
              # Where the time went, as /predict's headers say it (the first image's batch).
              "parameters": {"queue_wait_ms": round(first["queue_wait_ms"], 1),
                             "inference_ms": round(first["inference_ms"], 1),
                             "batch_size": first["batch_size"],
                             "precision": first.get("precision", "fp32")}}
    if isinstance(header.get("id"), str):
        answer["id"] = header["id"]
    if not binary:
        tensor["data"] = values
        return json.dumps(answer), {"Content-Type": "application/json"}
    tensor["parameters"] = {"binary_data_size": len(blob)}
    head = json.dumps(answer).encode()
    return head + blob, {"Content-Type": "application/octet-stream",
                         HEADER_LENGTH: str(len(head))}
