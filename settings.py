"""Every knob of the service, read once from the environment at import.

Each environment variable has the same name as its constant. A bad value stops the process at
start-up with a message naming the variable, never at the thousandth request. The README's
settings table is this list.
"""
import os


from serving.text import header_value_problem
from serving.redis_urls import cluster_address, sentinel_address


class SettingsError(ValueError):
    """An environment variable holds a value the service cannot use."""


def _raw(name, default):
    value = os.environ.get(name, "").strip()
    return value if value else default


def env_str(name, default, choices=None):
    value = _raw(name, default)
    if choices is not None and value not in choices:
        raise SettingsError(f"{name}={value!r}: must be one of {', '.join(choices)}")
    return value


def env_number(name, default, kind=int, minimum=None, maximum=None):
    value = _raw(name, default)
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise SettingsError(f"{name}={value!r}: not a valid {kind.__name__}") from None
    if minimum is not None and number < minimum:
        raise SettingsError(f"{name}={number}: must be at least {minimum}")
    if maximum is not None and number > maximum:
        raise SettingsError(f"{name}={number}: must be at most {maximum}")
    return number


def env_int(name, default, minimum=None, maximum=None):
    return env_number(name, default, int, minimum, maximum)


def env_float(name, default, minimum=None, maximum=None):
    return env_number(name, default, float, minimum, maximum)


def env_header_value(name, default):
    """A value the service sends in an HTTP header (see serving.text.header_value_problem)."""
    value = _raw(name, default)
    problem = header_value_problem(value)
    if problem:
        raise SettingsError(f"{name}={value!r}: {problem}: it is sent in a header")
    return value


def env_list(name, default, choices=None):
    values = [part.strip().upper() for part in _raw(name, default).split(",") if part.strip()]
    unknown = [value for value in values if choices is not None and value not in choices]
    if unknown or not values:
        raise SettingsError(f"{name}={_raw(name, default)!r}: {', '.join(unknown) or 'empty'} "
                            f"is not one of {', '.join(sorted(choices or ()))}")
    return values


# --- Web tier -------------------------------------------------------------------------------
HOST = env_str("HOST", "0.0.0.0")
"""Address the web server binds to."""

PORT = env_int("PORT", 5000, minimum=1, maximum=65535)
"""TCP port of the web server (5000, as in the classic tutorial)."""

WEB_WORKERS = env_int("WEB_WORKERS", 2, minimum=1)
"""gunicorn worker processes per web instance, each on one core at a time."""

INSTANCE_NAME = env_header_value("INSTANCE_NAME", os.uname().nodename)
"""Name of this web instance, sent in the X-Served-By header (tells instances apart behind nginx)."""

MAX_UPLOAD_BYTES = env_int("MAX_UPLOAD_BYTES", 10 * 1024 * 1024, minimum=1024)
"""Largest accepted request body in bytes; larger uploads get 413."""

UPLOAD_TIMEOUT_S = env_float("UPLOAD_TIMEOUT_S", 5.0, minimum=0.1)
"""Seconds a request's body may take before it must keep arriving at MIN_UPLOAD_BYTES_PER_S: a
client that sends it more slowly is cut off with 408 (as Apache's mod_reqtimeout does), and every
body must have arrived by the request's deadline. A slow client cannot hold a connection long."""

MIN_UPLOAD_BYTES_PER_S = env_int("MIN_UPLOAD_BYTES_PER_S", 500, minimum=1)
"""Slowest a request's body may arrive once UPLOAD_TIMEOUT_S has passed, in bytes a second."""

MAX_IMAGES_PER_REQUEST = env_int("MAX_IMAGES_PER_REQUEST", 32, minimum=1, maximum=1000)
"""Most images one request may carry (repeated `image` fields, or the batch of a /v2 infer);
more get 413. Each image is a job of its own: the queue bound counts images (an empty queue takes
any request). At most 1000: a request's jobs are pushed by one Redis script call."""

MAX_IMAGE_PIXELS = env_int("MAX_IMAGE_PIXELS", 40_000_000, minimum=1)
"""Largest accepted width x height, checked from the header before decoding (decompression bombs)."""


def pillow_formats():
    """Every format this Pillow can open (registering them imports each of its plugins)."""
    from PIL import Image

    Image.init()
    return Image.OPEN


# A value set is checked against Pillow; the default, made of Pillow's core formats, is not:
# `reload` reads these settings beside serving workers and opens no image.
ALLOWED_FORMATS = env_list("ALLOWED_FORMATS", "JPEG,PNG,GIF,BMP,TIFF,WEBP",
                           choices=pillow_formats() if _raw("ALLOWED_FORMATS", "") else None)
"""Pillow format names accepted in uploads, comma-separated; anything else gets 400."""

DECODE_BUDGET_BYTES = env_int("DECODE_BUDGET_BYTES", 640 * 1024 * 1024, minimum=16 * 1024 * 1024)
"""Bytes one process may spend at once on decoding images (a model worker) or parsing /v2 bodies
(a web process), estimated before it starts (an image's from its header: 16 bytes a pixel at most,
what a progressive JPEG's coefficients hold). 640 MiB: one image of MAX_IMAGE_PIXELS. An image that
waits for it past its deadline is not answered (504); an upload that alone needs more gets 413."""

REQUEST_TIMEOUT_S = env_float("REQUEST_TIMEOUT_S", 30.0, minimum=0.1)
"""Seconds a request may wait for its result (queue wait + inference) before it gets 504.
A client may ask for less with the header X-Request-Timeout-S."""

MAX_QUEUE_LENGTH = env_int("MAX_QUEUE_LENGTH", 1000, minimum=1)
"""Most jobs waiting in IMAGE_QUEUE; past it /predict answers OVERLOAD_STATUS with Retry-After.
The queue is also held to what the workers can answer within a request's deadline (see README)."""

WEB_CONNECTIONS = env_int("WEB_CONNECTIONS", MAX_QUEUE_LENGTH + 256, minimum=1)
"""Requests one gunicorn process holds at once (gevent: each waits on Redis at the cost of a
greenlet and a Redis connection). Default MAX_QUEUE_LENGTH + 256: one process alone can hold a full
queue and still answer refusals at once; past it new connections wait in the kernel's backlog."""

MAX_QUEUE_BYTES = env_int("MAX_QUEUE_BYTES", 256 * 1024 * 1024, minimum=1024)
"""Most bytes of jobs waiting in IMAGE_QUEUE (each job its upload, as it came, and a line of JSON);
bounds Redis memory."""

OVERLOAD_STATUS = env_int("OVERLOAD_STATUS", 503, minimum=429, maximum=503)
"""HTTP status of a request refused because the queue is full: 503 (default) or 429."""

TOP_K = env_int("TOP_K", 5, minimum=1)
"""Predictions returned per image unless the request asks for another number with ?top_k=."""

# --- Redis ----------------------------------------------------------------------------------
REDIS_URL = env_str("REDIS_URL", "")
"""Redis to use: redis://host:6379/0 (rediss:// for TLS, unix:// for a socket); Sentinel:
redis+sentinel://[user:password@]host:26379,host:26379/MASTER_NAME[/db]; Cluster:
redis+cluster://[user:password@]host:6379[,host:6379...] (any nodes). Unset:
`run_keras_server.py` starts a private one."""
if REDIS_URL and not REDIS_URL.startswith(("redis://", "rediss://", "unix://",
                                           "redis+sentinel://", "redis+cluster://")):
    raise SettingsError(f"REDIS_URL={REDIS_URL!r}: must start with redis://, rediss://, unix://, "
                        "redis+sentinel:// or redis+cluster://")
try:
    if REDIS_URL.startswith("redis+sentinel://"):
        sentinel_address(REDIS_URL)
    elif REDIS_URL.startswith("redis+cluster://"):
        cluster_address(REDIS_URL)
except ValueError as exc:
    raise SettingsError(f"REDIS_URL={REDIS_URL!r}: {exc}") from None

IMAGE_QUEUE = env_str("IMAGE_QUEUE", "image_queue")
"""Name of the Redis list of pending jobs; also the hash tag of every other key the service writes
({IMAGE_QUEUE}:...), so that on Redis Cluster all of them live in the queue's slot."""
if "{" in IMAGE_QUEUE or "}" in IMAGE_QUEUE:
    raise SettingsError(f"IMAGE_QUEUE={IMAGE_QUEUE!r}: must not contain {{ or }} (it is the keys' "
                        "hash tag)")

REDIS_USERNAME = env_str("REDIS_USERNAME", "")
"""Redis user this process logs in as (an ACL user: `web` or `model` where docker-compose.yml or
deploy/k8s start Redis, see Securing Redis in the README). Empty: the URL's, else Redis' default."""

REDIS_PASSWORD = env_str("REDIS_PASSWORD", "")
"""Password of REDIS_USERNAME (give it from a secret, not in REDIS_URL). Empty: the URL's, if any.
A process whose credentials Redis refuses stops at start, saying so."""

RESULT_TTL_S = env_int("RESULT_TTL_S", 60, minimum=1)
"""Seconds a result lives in Redis after a worker stores it (a handler collects it at once; about
0.5 kB each), and a worker's claim list after its last claim. Keep it at least REQUEST_TIMEOUT_S:
a request of several images collects their results one after another."""

# --- Model worker ---------------------------------------------------------------------------
MODEL = env_str("MODEL", "resnet50")
"""`resnet50`, `mobilenet_v2`, or a path to a saved Keras model (.keras or .h5)."""

MODELS_DIR = env_str("MODELS_DIR", "models")
"""The folder (relative: to the working directory) of the model, weights, label and calibration
files that `reload` may name: a worker refuses a proposed version naming a file elsewhere, as TF
Serving and Triton load only from their model repositories. The files this worker's own settings
name may be anywhere."""

MODEL_WEIGHTS = env_str("MODEL_WEIGHTS", "imagenet")
"""`imagenet` (Keras' cache, downloaded once), a path to a weights file, or `none` (random, seeded)."""

MODEL_VERSION = env_header_value("MODEL_VERSION", "1")
"""Version name of the model, sent with every answer (X-Model-Version) and shown by GET /model."""

MODEL_SEED = env_int("MODEL_SEED", 1234)
"""Seed of the random weights used with MODEL_WEIGHTS=none: same seed, same model everywhere."""

LABELS = env_str("LABELS", "")
"""Labels of a model given by path: a text file (one per line) or JSON. Empty: ImageNet's."""

PREPROCESS = env_str("PREPROCESS", "", choices=("", "resnet50", "mobilenet_v2", "scale_0_1", "none"))
"""Preprocessing of a model given by path. Empty: the named model's own (`none` for a path)."""

BATCH_SIZE = env_str("BATCH_SIZE", "auto")
"""Most images per forward pass, or `auto`: each worker times batch sizes 1, 2, 4, ... in 7
interleaved rounds while warming up (sizes are added while a round takes under 2 s and a batch under
REQUEST_TIMEOUT_S / 10) and keeps the largest whose median throughput is within 5% of the best."""
if BATCH_SIZE != "auto":
    BATCH_SIZE = env_int("BATCH_SIZE", 32, minimum=1)

BATCH_TIMEOUT_MS = env_float("BATCH_TIMEOUT_MS", 5.0, minimum=0.0)
"""Longest wait, in milliseconds, to fill a batch once its first image has arrived. Waited only when
the worker's recent arrival rate makes another image likely within it (rate x window >= 1), and
never while the worker's other batch is computing: then a partial batch waits for that pass."""

BATCHES_IN_FLIGHT = env_int("BATCHES_IN_FLIGHT", 2, minimum=1)
"""Batches one worker runs at once. 2 overlaps one batch's Redis and decoding work with another's
forward pass and keeps the cores busy when neighbours take CPU; 1: strictly one at a time."""

DECODE_THREADS = env_int("DECODE_THREADS", 0, minimum=0)
"""Threads of a model worker that decode uploads into its batches. 0: one per core it may use."""

MODEL_THREADS = env_int("MODEL_THREADS", 0, minimum=0)
"""Threads for one forward pass (TensorFlow intra-op, OpenVINO's inference threads). 0: the
runtime's choice (all cores)."""

RUNTIME = env_str("RUNTIME", "auto", choices=("auto", "keras", "openvino"))
"""What runs the forward pass. `openvino`: the Keras model converted to OpenVINO (CPU, FP32) and
checked against Keras at start, refusing to serve if they disagree; `keras`: TensorFlow; `auto`:
OpenVINO on a machine without a GPU (Keras, with a warning, if the conversion or check fails),
TensorFlow on a GPU."""

PRECISION = env_str("PRECISION", "fp32", choices=("fp32", "bf16", "fp16", "int8", "auto"))
"""Precision of the forward pass. fp32: the model's own. bf16, fp16: the CPU's 16-bit units
(OpenVINO). int8: quantized by NNCF on CALIBRATION_IMAGES. auto: the fastest of fp32 and the
16-bit precisions the CPU has, timed at start. Every precision but fp32 is checked against fp32
before it serves (MIN_TOP1_AGREEMENT): an explicit one that fails refuses to serve, auto passes
it over."""

CALIBRATION_IMAGES = env_str("CALIBRATION_IMAGES", "")
"""A folder of images like the ones served (a few hundred; the first 300 by name), decoded as
uploads are: INT8's calibration, and what every reduced precision is checked on (else 64 seeded
random images). PRECISION=int8 refuses to start without it."""

MIN_TOP1_AGREEMENT = env_float("MIN_TOP1_AGREEMENT", 0.99, minimum=0.0, maximum=1.0)
"""Share of the check's images whose top label bf16 or fp16 must give as fp32 does, to serve."""

MIN_TOP1_AGREEMENT_INT8 = env_float("MIN_TOP1_AGREEMENT_INT8", 0.98, minimum=0.0, maximum=1.0)
"""The same for int8."""

OPENVINO_CACHE_DIR = env_str("OPENVINO_CACHE_DIR", os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "keras-server", "openvino"))
"""Folder of converted models, named by a hash of the model and weights files, MODEL_VERSION and
the Keras and OpenVINO versions (INT8 models also by the calibration images and NNCF's version):
a restart reuses the conversion. The 8 used last are kept; older ones are removed, and so is what
a conversion killed half-way left, after an hour."""

WORKER_METRICS_PORT = env_int("WORKER_METRICS_PORT", 0, minimum=0, maximum=65535)
"""Port where a model worker serves its Prometheus metrics (/metrics) and its readiness (/readyz:
200 once a model version serves). 0: none (give each worker its own)."""

HEARTBEAT_INTERVAL_S = env_float("HEARTBEAT_INTERVAL_S", 1.0, minimum=0.05)
"""Seconds between a worker's heartbeats; also how often it re-queues jobs of dead workers."""

HEARTBEAT_TTL_S = env_float("HEARTBEAT_TTL_S", 5.0, minimum=0.1)
"""Seconds without a heartbeat after which a worker counts as gone and its claimed jobs re-queue."""

LOG_LEVEL = env_str("LOG_LEVEL", "INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
"""Logging threshold of every process."""

if OVERLOAD_STATUS not in (429, 503):
    raise SettingsError(f"OVERLOAD_STATUS={OVERLOAD_STATUS}: must be 429 or 503")
if HEARTBEAT_TTL_S <= HEARTBEAT_INTERVAL_S:
    raise SettingsError("HEARTBEAT_TTL_S must be larger than HEARTBEAT_INTERVAL_S")


def check_web_tier():
    """What only the web tier checks at start (its gunicorn.conf.py), so that model workers sharing
    its settings (one ConfigMap) are not stopped by a web knob."""
    if WEB_CONNECTIONS * WEB_WORKERS <= MAX_QUEUE_LENGTH:
        # Otherwise requests would wait unseen in the kernel's backlog before the queue bound
        # refused anyone: two knobs that contradict each other.
        raise SettingsError(f"WEB_CONNECTIONS={WEB_CONNECTIONS} x WEB_WORKERS={WEB_WORKERS} must "
                            f"exceed MAX_QUEUE_LENGTH={MAX_QUEUE_LENGTH}")
