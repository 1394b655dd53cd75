"""A job and its result as they cross Redis: fields, bodies, arrays as base64."""
import base64
import json
import os
from typing import NamedTuple

import pybase64

from serving.wire.connection import CLOCK


def encode_array(array, dtype="uint8"):
    """Serialize an array as base64 text of its little-endian bytes (JSON-safe)."""
    # numpy only where arrays cross: the light processes (`reload`, a supervisor) never load it.
    import numpy as np

    little = np.dtype(dtype).newbyteorder("<")
    return pybase64.b64encode_as_string(np.ascontiguousarray(array, dtype=little))


def decode_array(text, shape, dtype="uint8"):
    """Inverse of encode_array: base64 text and a shape back to an array."""
    import numpy as np

    array = np.frombuffer(pybase64.b64decode(text, validate=True),
                          dtype=np.dtype(dtype).newbyteorder("<"))
    return array.reshape(shape)


# The version of the job format that workers announce in their heartbeats (JOB_FORMAT_FIELD): a
# web tier enqueues jobs only where every warm worker reads them (see web/submit.py's WorkerView).
JOB_FORMAT = 2
JOB_FORMAT_FIELD = "job_format"


def text(value):
    """A reply as str (the client reads bytes)."""
    return value.decode() if isinstance(value, bytes) else value


def text_hash(record):
    """A hash's reply as {str: str}."""
    return {text(name): text(value) for name, value in record.items()}


class Job(NamedTuple):
    id: str
    entry: bytes  # what the queue holds: b"<id>:<bytes of the body>"
    body: bytes  # the header line, b"\n", the image
    deadline: float  # time.time() of this process (the header holds it on Redis's clock)


def new_job(data, deadline, top_k, shape=None, **outputs):
    """A job for one image: `data` is the uploaded file, or with `shape` (height, width, channels)
    raw uint8 pixels (any object with the buffer protocol, e.g. a numpy array).

    outputs: what the answer carries beyond the top_k predictions (see worker.process_batch):
    probabilities=True, the whole probability vector; classification=K, the top K as the Open
    Inference Protocol's "value:index:label" strings. model=NAME (and version=V): only a worker
    serving that model (at that version) may answer it.
    """
    job_id = os.urandom(16).hex()
    header = {"deadline": deadline + CLOCK.offset, "enqueued_at": CLOCK.now(), "top_k": top_k,
              **outputs}
    if shape is not None:
        header["shape"] = list(shape)
    body = b"".join((json.dumps(header, separators=(",", ":")).encode(), b"\n", data))
    return Job(job_id, f"{job_id}:{len(body)}".encode(), body, deadline)


# What every job's header holds (new_job writes them), and their JSON types; "shape", when there,
# is a list of three whole numbers.
JOB_FIELDS = {"deadline": (int, float), "enqueued_at": (int, float), "top_k": int}


def read_job(entry, body):
    """A claimed job as a dict: its header's fields, "id", and "data" (the file, or with "shape"
    the pixels). None if its body is gone (its deadline has passed); ValueError if it is not a job
    this worker can read."""
    if entry.startswith(b"{"):
        return read_old_job(entry)
    if body is None:
        return None
    line = body.find(b"\n")
    job = json.loads(body[:line]) if line > 0 else None
    check_fields(job)
    job["id"] = entry.split(b":", 1)[0].decode()
    job["data"] = memoryview(body)[line + 1:]
    return job


def read_old_job(payload):
    """A job of the format before this one (the whole job on the queue, JSON, with its pixels in
    base64), as read_job returns jobs: during an upgrade, old web processes still enqueue them."""
    job = json.loads(payload)
    check_fields(job)
    if not isinstance(job.get("id"), str) or not isinstance(job.get("image"), str):
        raise ValueError("missing or malformed fields: ['id', 'image']")
    job["data"] = base64.b64decode(job.pop("image"), validate=True)
    return job


def check_fields(job):
    """ValueError unless `job` is a dict with every header field of the right type."""
    if not isinstance(job, dict):
        raise ValueError("its header is not a JSON object")
    wrong = [name for name, kind in JOB_FIELDS.items()
             if not isinstance(job.get(name), kind) or isinstance(job.get(name), bool)]
    shape = job.get("shape")
    if shape is not None and not (isinstance(shape, list) and len(shape) == 3 and all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
        wrong.append("shape")
    if wrong or job["top_k"] < 1:
        raise ValueError(f"missing or malformed fields: {wrong or ['top_k']}")
