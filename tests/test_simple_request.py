"""The README's one-command start (`python run_keras_server.py`) and the command-line client."""
import os
import signal
import subprocess
import sys

import pytest
import redis
import requests

from conftest import ROOT, free_port, image_bytes, wait_until


@pytest.fixture(scope="module")
def whole_service(tmp_path_factory):
    """`python run_keras_server.py` with no REDIS_URL: private Redis, one worker, the web tier."""
    port = free_port()
    env = {name: value for name, value in os.environ.items() if name != "REDIS_URL"}
    env.update(PORT=str(port), MODEL_WEIGHTS="none", WEB_WORKERS="1", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONUNBUFFERED="1")
    log = tmp_path_factory.mktemp("whole") / "service.log"
    process = subprocess.Popen([sys.executable, "run_keras_server.py"], cwd=ROOT, env=env,
                               stdout=open(log, "wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"

    def ready():
        assert process.poll() is None, log.read_text()
        return requests.get(f"{url}/readyz", timeout=2).status_code == 200

    try:
        wait_until(ready, timeout=180, what="the whole service to be ready")
        yield process, url, log
    finally:
        if process.poll() is None:
            process.kill()


def run_client(*args):
    return subprocess.run([sys.executable, "simple_request.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def test_client_prints_ranked_predictions(whole_service, tmp_path):
    _, url, _ = whole_service
    image = tmp_path / "photo.jpg"
    image.write_bytes(image_bytes())

    result = run_client(str(image), "--url", f"{url}/predict", "--top-k", "3")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(".")[0] for line in lines] == ["1", "2", "3"]
    probabilities = [float(line.rsplit(":", 1)[1]) for line in lines]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < probabilities[0] <= 1


def test_client_exits_non_zero_with_the_server_message(whole_service, tmp_path):
    _, url, _ = whole_service
    text = tmp_path / "notes.txt"
    text.write_text("not an image")

    result = run_client(str(text), "--url", f"{url}/predict")

    assert result.returncode != 0
    assert "not an image in an accepted format" in result.stderr and "HTTP 400" in result.stderr


def test_ctrl_c_stops_every_part(whole_service):
    process, url, log = whole_service
    redis_url = next(line.split(" at ")[1].strip() for line in log.read_text().splitlines()
                     if "private redis-server at" in line)

    process.send_signal(signal.SIGINT)

    assert process.wait(60) == 0
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/healthz", timeout=2)
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(redis_url).ping()
    assert "stopped after" in log.read_text()  # the worker left cleanly, not killed
