"""The README's one-command start (`python run_keras_server.py`) and the command-line client."""
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests

from conftest import (ROOT, descendants, image_bytes, is_running, post_image, start_whole_service,
                      stop_whole_service, tiny_settings, wait_until)


@pytest.fixture(scope="module")
def whole_service(tmp_path_factory):
    """`python run_keras_server.py` with no REDIS_URL: private Redis, one worker, the web tier."""
    log = tmp_path_factory.mktemp("whole") / "service.log"
    process, url = start_whole_service(log, WEB_WORKERS=1)
    try:
        yield process, url, log
    finally:
        stop_whole_service(process)


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


def test_the_benchmark_tells_each_part_of_the_running_service_apart(whole_service):
    """bench/benchmark.py splits the CPU (and bench/reload.py the memory) by these roles."""
    from bench.cpu import service_processes

    process = whole_service[0]
    roles = sorted(str(role) for _, role in service_processes(process.pid))

    # The launcher; gunicorn's master and its one worker; the model supervisor, its fork server
    # and its model process; the private Redis.
    assert roles == ["None", "model", "model", "model", "redis", "web", "web"], roles


def test_the_benchmarks_load_generator_reports_every_answer_and_is_told_apart(whole_service,
                                                                             tmp_path):
    """bench/benchmark.py's saturation load: wrk with bench/wrk_predict.lua, its answers read
    back with their batches, and its process counted as the load generator's, apart from the
    service's."""
    from bench.cpu import cpu_snapshot
    from bench.service import run_wrk

    process, url, _ = whole_service
    load_pids, snapshots = [], []
    with ThreadPoolExecutor(1) as pool:
        loading = pool.submit(run_wrk, url, 4, 4, tmp_path, load_pids)
        wait_until(lambda: load_pids, what="wrk to start")
        snapshots.append(cpu_snapshot(process.pid, load_pids))
        report = loading.result()
    roles = sorted(str(role) for role, _ in snapshots[0]["processes"].values())
    assert roles == ["None", "load", "model", "model", "model", "redis", "web", "web"], roles
    assert not load_pids  # forgotten once it has ended
    answers = report["requests"]
    assert len(answers) >= 4 and report["summary"]["failed"] == 0
    assert all(r["ok"] and r["batch_size"] >= 1 and r["inference_ms"] > 0 for r in answers)
    assert 0 < answers[0]["t_s"] <= answers[-1]["t_s"] < 10  # seconds from the load's start
    assert 0 < report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]


def test_ctrl_c_under_load_stops_every_part_within_10_s_even_pressed_twice(whole_service):
    process, url, log = whole_service
    everything = [process.pid, *descendants(process.pid)]  # Redis, the worker, gunicorn's
    redis_url = next(line.split(" at ")[1].strip() for line in log.read_text().splitlines()
                     if "private redis-server at" in line)
    assert len(everything) >= 5, everything  # run_keras_server, redis, model, gunicorn + worker
    stop_load, statuses = threading.Event(), []

    def load():
        while not stop_load.is_set():
            try:
                statuses.append(post_image(url, image_bytes(), timeout=5).status_code)
            except requests.RequestException as exc:
                statuses.append(repr(exc))

    with ThreadPoolExecutor(8) as pool:
        for _ in range(8):
            pool.submit(load)
        wait_until(lambda: 200 in statuses, what="the service to answer under load")
        os.killpg(process.pid, signal.SIGINT)  # what a terminal does on Ctrl-C
        pressed = time.monotonic()
        time.sleep(0.5)
        os.killpg(process.pid, signal.SIGINT)  # pressed again, impatiently
        wait_until(lambda: not any(is_running(pid) for pid in everything), timeout=15,
                   interval=0.1, what="every process to exit")
        stopped_after = time.monotonic() - pressed
        stop_load.set()

    assert stopped_after < 10, stopped_after
    assert process.wait(1) == 0
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(redis_url).ping()
    assert "stopped after" in log.read_text()  # the worker left cleanly, not killed


def test_sigterm_over_and_over_still_stops_every_part_redis_included(tmp_path, tiny_model):
    process, _ = start_whole_service(tmp_path / "service.log", **tiny_settings(tiny_model))
    everything = [process.pid, *descendants(process.pid)]
    try:
        # `timeout` and `pkill` at once, or a supervisor that repeats itself: the launcher gets
        # SIGTERM again and again while it stops, up to its last instant (Python gives a handler
        # back to the default while it exits), and must still stop the rest and exit 0.
        storm_ends = time.monotonic() + 45
        while time.monotonic() < storm_ends and process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
            time.sleep(0.001)
        wait_until(lambda: not any(is_running(pid) for pid in everything), timeout=45,
                   interval=0.1, what="every process to exit")
    finally:
        stop_whole_service(process)
        for pid in everything:  # what a failed stop left behind, no longer the launcher's
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)
    assert process.wait() == 0


def test_closing_the_terminal_stops_every_part_redis_included(tmp_path, tiny_model):
    process, _ = start_whole_service(tmp_path / "service.log", **tiny_settings(tiny_model))
    everything = [process.pid, *descendants(process.pid)]
    try:
        # A closing terminal sends SIGHUP to its foreground processes: the launcher, gunicorn
        # (which takes it as "reload") and the model worker; the private Redis has a session of
        # its own and gets nothing. The launcher must stop them all, as on Ctrl-C.
        os.killpg(process.pid, signal.SIGHUP)
        wait_until(lambda: not any(is_running(pid) for pid in everything), timeout=45,
                   interval=0.1, what="every process to exit")
    finally:
        stop_whole_service(process)
        for pid in everything:
            if is_running(pid):
                os.kill(pid, signal.SIGKILL)
    assert process.wait() == 0
