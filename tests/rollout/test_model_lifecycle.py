"""Observability and model lifecycle: Prometheus metrics, /model, a real trained model (digits)
served end to end, and a hot reload under load."""
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests

from serving.wire import records
from conftest import (ROOT, digits_settings, digits_spec, free_port, is_running, metric,
                      post_image, reload, reload_args, stop, tiny_settings, wait_until,
                      worker_stats)
from serving.images import prepare_image
from serving.rollout.loader_watch import LOADER_WINDOW_S


def direct_probabilities(folder, images):
    """The saved model called directly on the same decoded pixels."""
    import keras

    model = keras.models.load_model(folder / "digits.keras", compile=False)
    pixels = np.stack([prepare_image(data, (8, 8), 1) for data in images])
    return np.asarray(model.predict_on_batch(pixels / 255.0))


@pytest.mark.parametrize("runtime", ["keras", "openvino"])
def test_digits_served_end_to_end_are_accurate_and_equal_a_direct_call(service, digits, runtime,
                                                                     redis_client, keys):
    worker = service.worker(RUNTIME=runtime, **digits_settings(digits["v1"], "1"))
    assert worker_stats(redis_client, keys)[str(worker.pid)]["runtime"] == runtime
    web = service.web()
    images = digits["images"]

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda data: post_image(web.url, data, "d.png", top_k=10),
                                  images))

    assert all(r.status_code == 200 for r in responses)
    expected = direct_probabilities(digits["v1"], images)
    predicted = [int(r.json()["predictions"][0]["label"]) for r in responses]
    assert predicted == list(expected.argmax(axis=1))
    for response, row in zip(responses, expected):
        for prediction in response.json()["predictions"]:
            assert prediction["probability"] == pytest.approx(row[int(prediction["label"])],
                                                              abs=1e-5)
    accuracy = np.mean(np.array(predicted) == np.array(digits["labels"]))
    assert accuracy >= 0.9, accuracy


def test_model_endpoint_describes_the_loaded_model(service, digits):
    service.worker(BATCH_SIZE=16, **digits_settings(digits["v1"], "7"))
    web = service.web()

    body = requests.get(f"{web.url}/model").json()

    assert body["success"] is True and body["versions"] == ["7"]
    assert body["model"] == {"name": str(digits["v1"] / "digits.keras"), "version": "7",
                             "weights": "none", "input_shape": [8, 8, 1], "labels": 10,
                             "preprocess": "scale_0_1", "batch_size": "16", "device": "CPU",
                             "runtime": "openvino",  # RUNTIME=auto on a CPU
                             "precision": "fp32", "precision_check": None}  # FP32: nothing to check


def test_model_endpoint_is_503_without_workers(service):
    web = service.web()
    response = requests.get(f"{web.url}/model")
    assert response.status_code == 503 and response.json()["success"] is False


def requests_counted_by_each_process(folder):
    """keras_requests_total of each gunicorn process, from its own file of the shared folder."""
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    counts = {}
    for path in Path(folder).glob("counter_*.db"):
        alone = Path(folder).parent / f"alone-{path.stem}"
        alone.mkdir(exist_ok=True)
        shutil.copy(path, alone / path.name)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(alone))
        text = generate_latest(registry).decode()
        counts[path.stem] = sum(float(n) for n in re.findall(
            r'^keras_requests_total\{status="\d+"\} (\S+)$', text, re.M))
    return counts


def test_metrics_add_up_across_gunicorn_processes_and_workers(
        service, digits, redis_client, keys, tmp_path):
    worker_port = free_port()
    worker = service.worker(WORKER_METRICS_PORT=worker_port, BATCH_TIMEOUT_MS=20,
                            **digits_settings(digits["v1"], "1"))
    folder = tmp_path / "web-metrics"
    folder.mkdir()
    web = service.web(WEB_WORKERS=2, PROMETHEUS_MULTIPROC_DIR=folder)
    good, bad = [], []
    with ThreadPoolExecutor(16) as pool:
        for _ in range(10):  # until both gunicorn processes have answered some requests
            good += pool.map(lambda data: post_image(web.url, data, "d.png"),
                             digits["images"][:30])
            bad += pool.map(lambda data: post_image(web.url, data), [b"not an image"] * 4)
            if sum(count > 0 for count in requests_counted_by_each_process(folder).values()) >= 2:
                break
    scrapes = [requests.get(f"{web.url}/metrics").text for _ in range(6)]

    assert {r.status_code for r in good} == {200} and {r.status_code for r in bad} == {400}
    per_process = requests_counted_by_each_process(folder)
    assert sum(count > 0 for count in per_process.values()) == 2, per_process
    assert sum(per_process.values()) == len(good) + len(bad)
    for text in scrapes:  # whichever process answers the scrape adds up both
        assert metric(text, "keras_requests_total", '{status="200"}') == len(good)
        assert metric(text, "keras_requests_total", '{status="400"}') == len(bad)
        assert metric(text, "keras_request_seconds_count") == len(good) + len(bad)
        assert metric(text, "keras_queue_wait_seconds_count") == len(good)
        assert metric(text, "keras_queue_depth") == 0
        assert metric(text, "keras_live_workers") == 1
    # Every request is answered, so no batch runs any more; the heartbeat may still be one
    # interval behind the worker's own metrics, so it is waited for until both say the same.
    worker_text = requests.get(f"http://127.0.0.1:{worker_port}/metrics").text
    batches = metric(worker_text, "keras_batch_size_count")
    wait_until(lambda: worker_stats(redis_client, keys)[str(worker.pid)]["batches"]
               == str(int(batches)), what=f"the heartbeat to count {batches} batches")
    assert metric(worker_text, "keras_batch_size_sum") == len(good)
    assert metric(worker_text, "keras_forward_pass_seconds_count") == batches
    assert metric(worker_text, "keras_jobs_expired_total") == 0


def test_the_workers_metrics_forget_a_model_process_that_a_reload_replaced(
        service, digits, redis_client, keys):
    """A live gauge (the clock offset, one sample per process) of the model process a reload
    replaced leaves /metrics once that process has ended: only the serving one's is shown."""
    port = free_port()
    worker = service.worker(WORKER_METRICS_PORT=port, **digits_settings(digits["v1"], "1"))

    def offset_pids():
        text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
        return set(re.findall(r'^keras_clock_offset_seconds\{pid="(\d+)"\}', text, re.M))

    old = worker_stats(redis_client, keys)[str(worker.pid)]["model_pid"]
    wait_until(lambda: offset_pids() == {old}, what="the serving process's clock offset")
    status, log = reload(service, *reload_args(digits["v2"], "2"))
    assert status == 0, log
    new = worker_stats(redis_client, keys)[str(worker.pid)]["model_pid"]
    wait_until(lambda: not is_running(int(old)), what="the replaced model process to end")

    wait_until(lambda: offset_pids() == {new}, what="only the new process's clock offset")


def test_a_worker_is_ready_for_kubernetes_only_once_a_model_version_serves(
        service, tiny_model, redis_client, keys):
    """The readiness probe of deploy/k8s/base/model.yaml: /readyz on WORKER_METRICS_PORT, 503
    while the model loads, 200 once it serves, 503 again from SIGTERM on."""
    port = free_port()
    worker = service.worker(wait=False, WORKER_METRICS_PORT=port, **tiny_settings(tiny_model))
    statuses = []

    def ready():
        try:
            statuses.append(requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code)
        except requests.ConnectionError:  # (not listening yet)
            return False
        return statuses[-1] == 200

    wait_until(ready, timeout=120, what="the worker's /readyz to turn 200")
    assert 503 in statuses and set(statuses) == {200, 503}  # it answered while loading
    def warm():
        return any(beat["warm"] == "1" for beat in worker_stats(redis_client, keys).values())

    wait_until(warm, timeout=10, what="the worker's warm heartbeat")
    assert requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).status_code == 200

    worker.send_signal(signal.SIGTERM)
    wait_until(lambda: requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code
               == 503, timeout=10, what="/readyz to turn 503 on SIGTERM")


def p99(latencies):
    return float(np.percentile(latencies, 99)) if latencies else float("nan")


def versions_served(redis_client, keys):
    """The version each live model process serves, by its supervisor's pid."""
    return {pid: beat["version"] for pid, beat in worker_stats(redis_client, keys).items()}


def test_reload_and_rollback_under_load_fail_no_request_and_switch_each_worker_once(
        service, digits, redis_client, keys, capsys):
    workers = [service.worker(BATCH_SIZE=8, **digits_settings(digits["v1"], "1"))
               for _ in range(2)]
    web = service.web()
    images = digits["images"]
    answers, stop = [], threading.Event()
    began = time.monotonic()

    def client(offset):  # closed loop with pauses (loading is at low priority), bounded in time
        i = offset
        while not stop.wait(0.05) and time.monotonic() - began < 120:
            sent = time.monotonic() - began
            response = post_image(web.url, images[i % len(images)], "d.png", top_k=10)
            answers.append((sent, time.monotonic() - began - sent, response.status_code,
                            response.headers.get("X-Model-Version"),
                            response.headers.get("X-Model-Worker"), i % len(images),
                            response.json()))
            i += 7

    with ThreadPoolExecutor(4) as pool:
        clients = [pool.submit(client, n) for n in range(4)]
        time.sleep(4)
        reload_at = time.monotonic() - began
        status, log = reload(service, *reload_args(digits["v2"], "2"))
        switched_at = time.monotonic() - began
        assert status == 0, log
        # When reload returns, every worker serves the new version.
        assert versions_served(redis_client, keys) == {str(w.pid): "2" for w in workers}
        time.sleep(3)
        status, log = reload(service, "--rollback")
        assert status == 0, log
        assert versions_served(redis_client, keys) == {str(w.pid): "1" for w in workers}
        time.sleep(2)
        stop.set()
        for future in clients:
            future.result()

    assert all(status == 200 for _, _, status, *_ in answers)
    # Each version runs in a process of its own (worker id SUPERVISOR/N): every process answered
    # with one version, and each worker's processes went 1, 2, 1: one switch per rollout.
    by_process = {}
    for _, _, _, version, process, *_ in answers:
        by_process.setdefault(process, set()).add(version)
    assert all(len(versions) == 1 for versions in by_process.values()), by_process
    supervisors = {}
    for process, (version,) in sorted(by_process.items(),
                                      key=lambda item: int(item[0].rsplit("/", 1)[1])):
        supervisors.setdefault(process.rsplit("/", 1)[0], []).append(version)
    assert sorted(supervisors.values()) == [["1", "2", "1"]] * 2, supervisors
    direct = {"1": direct_probabilities(digits["v1"], images),
              "2": direct_probabilities(digits["v2"], images)}
    for _, _, _, version, _, index, body in answers:  # each answer names the model that made it
        for prediction in body["predictions"]:
            assert prediction["probability"] == pytest.approx(
                direct[version][index][int(prediction["label"])], abs=1e-5)
    steady = [latency for sent, latency, *_ in answers if sent < reload_at]
    during = [latency for sent, latency, *_ in answers if reload_at <= sent <= switched_at]
    with capsys.disabled():
        print(f"\nreload: steady p99 {p99(steady) * 1000:.1f} ms ({len(steady)} requests), "
              f"during reload p99 {p99(during) * 1000:.1f} ms ({len(during)} requests), "
              f"switch took {switched_at - reload_at:.1f} s")
    assert steady and during


def bad_specs(digits, tiny_model, folder):
    """(what is wrong, reload arguments, working folder, a phrase of the expected reason, exit
    status: 2 if reload itself refuses, by the spec's files, 1 if a worker does, by the model it
    loads)."""
    (folder / "five-labels.txt").write_text("a\nb\nc\nd\ne\n")
    (folder / "corrupt.keras").write_bytes(b"PK\x03\x04 this is not a Keras archive" * 50)
    v2 = digits["v2"]
    elsewhere = Path(tempfile.mkdtemp(prefix="not-models-dir-"))  # outside pytest's folders
    for name in ("digits.keras", "labels.txt"):
        shutil.copy(v2 / name, elsewhere / name)
    return [
        ("a file outside MODELS_DIR", reload_args(elsewhere, "bad"), ROOT,
         "is not under MODELS_DIR", 2),
        # Every answer carries the version in a header, which takes printable Latin-1 only.
        ("a version no header can carry", reload_args(v2, "v2\u2013rc"), ROOT,
         "every answer carries it in a header", 2),
        ("missing file", reload_args(folder, "bad", model="missing.keras"), ROOT,
         "is neither one of", 2),
        ("wrong label count", reload_args(v2, "bad") [:2] + [
            "--labels", str(folder / "five-labels.txt"), "--preprocess", "scale_0_1",
            "--version", "bad"], ROOT, "10 outputs but 5 labels", 1),
        ("other input shape", ["--model", tiny_model["MODEL"], "--labels", tiny_model["LABELS"],
                               "--preprocess", "scale_0_1", "--version", "bad"], ROOT,
         "differs from the served [8, 8, 1]", 1),
        ("corrupt file", reload_args(folder, "bad", model="corrupt.keras",
                                     labels="five-labels.txt"), ROOT, "cannot load", 1),
        # A path that exists where reload runs but not where the worker runs: the worker
        # refuses, and reload takes the proposal back.
        ("refused by the worker", reload_args(v2.name, "bad"), v2.parent, "refused by worker",
         1),
    ]


def test_bad_reloads_fail_with_the_reason_and_the_last_good_version_stays(
        service, digits, tiny_model, redis_client, keys, tmp_path):
    worker = service.worker(**digits_settings(digits["v1"], "1"))
    web = service.web()
    status, log = reload(service, *reload_args(digits["v2"], "2"))
    assert status == 0, log

    for what, args, cwd, reason, expected_status in bad_specs(digits, tiny_model, tmp_path):
        status, log = reload(service, *args, cwd=cwd)
        assert status == expected_status and reason in log, f"{what}: {status}\n{log}"
        assert records.wanted_model(redis_client, keys)[0]["version"] == "2", what
        response = post_image(web.url, digits["images"][0], "d.png")
        assert response.status_code == 200, what
        assert response.headers["X-Model-Version"] == "2", what

    # A worker started now, with settings that name version 1, serves the last accepted: 2.
    stop(worker)
    restarted = service.worker(**digits_settings(digits["v1"], "1"))
    assert versions_served(redis_client, keys) == {str(restarted.pid): "2"}
    assert post_image(web.url, digits["images"][0], "d.png").headers["X-Model-Version"] == "2"


def test_at_default_settings_a_version_may_name_only_files_under_models_dir(
        service, digits, redis_client, keys, tmp_path):
    """MODELS_DIR unset: the folder `models` where the service runs. A proposal written straight
    into Redis (as whoever reaches Redis could) is refused by the worker, and reload refuses the
    same spec before proposing it; the worker's own files, anywhere, serve."""
    defaults = {"MODELS_DIR": ""}
    worker = service.worker(**defaults, **digits_settings(digits["v1"], "1"))
    spec = {"model": str(digits["v2"] / "digits.keras"), "weights": "imagenet",
            "labels": str(digits["v2"] / "labels.txt"), "preprocess": "scale_0_1",
            "version": "2", "precision": "fp32", "calibration_images": ""}
    rollout = records.propose_model(redis_client, keys, spec)

    def refused():
        return records.refusals(redis_client, keys, rollout)
    wait_until(refused, timeout=120, what="the worker to refuse the proposal")
    reason = refused()[next(iter(refused()))]
    assert "is not under MODELS_DIR" in reason and str(ROOT / "models") in reason, reason
    assert worker_stats(redis_client, keys)[str(worker.pid)]["version"] == "1"

    done = subprocess.run([sys.executable, "run_keras_server.py", "reload",
                           *reload_args(digits["v2"], "3")], cwd=ROOT,
                          env=service.env(defaults), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "is not under MODELS_DIR" in done.stderr, done.stderr


FRAMEWORKS = {"keras", "tensorflow", "openvino", "jax", "torch", "nncf"}
# Nor array or image libraries: a process importing them beside a forward pass slows it, even at
# the lowest priority (numpy starts its BLAS threads as it loads).
HEAVY = {"numpy", "PIL", "cv2", "simplejpeg"}


def reload_importing(service, *args):
    """`reload ARGS` run under `python -X importtime`: (exit status, its log, every module it
    imported)."""
    done = subprocess.run([sys.executable, "-X", "importtime", str(ROOT / "run_keras_server.py"),
                           "reload", *args], cwd=ROOT, env=service.env({}), capture_output=True,
                          text=True, timeout=300)
    lines = done.stderr.splitlines()
    imported = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    log = "\n".join(line for line in lines if not line.startswith("import time:"))
    return done.returncode, log, imported - {"package"}  # (less the column's title)


def test_reload_imports_no_deep_learning_framework_and_the_worker_refuses_what_does_not_load(
        service, digits, redis_client, keys, tmp_path):
    """`reload` checks a spec's files, never loads the model: whether it loads is the workers' to
    say, from the candidate each loads anyway. A refused spec, one a worker refuses and one every
    worker serves: no deep learning framework in the reload process in any of them, nor numpy or
    an image library."""
    worker = service.worker(**digits_settings(digits["v1"], "1"))
    (tmp_path / "corrupt.keras").write_bytes(b"PK\x03\x04 this is not a Keras archive" * 50)
    shutil.copy(digits["v2"] / "labels.txt", tmp_path / "labels.txt")
    runs = {
        "refused by reload": (reload_args(tmp_path, "2", model="missing.keras"), 2,
                              "is neither one of"),
        "refused by the worker": (reload_args(tmp_path, "2", model="corrupt.keras"), 1,
                                  "cannot load the Keras model"),
        "served": (reload_args(digits["v2"], "2"), 0, "serves version 2")}
    for what, (args, expected_status, phrase) in runs.items():
        status, log, imported = reload_importing(service, *args)
        assert status == expected_status and phrase in log, f"{what}: {status}\n{log}"
        assert {"redis", "settings", "serving.rollout.reload", "serving.wire.records"} <= imported, \
            what  # (the parse read them all)
        unwanted = sorted(name for name in imported if name.split(".")[0] in FRAMEWORKS | HEAVY)
        assert not unwanted, (what, unwanted)
    assert versions_served(redis_client, keys) == {str(worker.pid): "2"}


def test_a_model_process_keeps_its_model_out_of_the_garbage_collectors_sight(tiny_model):
    """Loaded and warm, a model process freezes what it holds (keep_out_of_collection): the full
    collections that serving still sets off scan none of the model's objects, which no forward
    pass then waits for, while garbage made afterwards is still collected."""
    import gc

    from serving.model.loader import load_classifier
    from serving.rollout.model_process import keep_out_of_collection

    classifier = load_classifier(tiny_model["MODEL"], "none", tiny_model["LABELS"], "scale_0_1")
    assert any(thing is classifier.serving for thing in gc.get_objects())
    try:
        keep_out_of_collection()
        assert not any(thing is classifier.serving for thing in gc.get_objects())
        cycle = []
        cycle.append(cycle)
        del cycle
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()


def test_a_legacy_h5_model_with_a_lambda_layer_is_refused_without_running_it(service, digits,
                                                                              tmp_path):
    """Keras' safe mode: a Lambda layer's Python code in an .h5 file is not run, and the version
    is refused with the reason."""
    import keras

    marker = tmp_path / "the-lambda-ran"
    marker_name = str(marker)  # (a closure's values are saved with the code)
    model = keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Lambda(lambda x: x + 0 * len(open(marker_name, "w").name)),
        keras.layers.Flatten(), keras.layers.Dense(10, activation="softmax")])
    model.save(tmp_path / "lambda.h5")
    marker.unlink()  # (the lambda ran once, here, as Keras traced it)
    (tmp_path / "labels.txt").write_text("".join(f"{n}\n" for n in range(10)))
    service.worker(**digits_settings(digits["v1"], "1"))

    status, log = reload(service, *reload_args(tmp_path, "2", model="lambda.h5"))
    assert status == 1 and "cannot load" in log and "unsafe" in log.lower(), log
    assert not marker.exists()


def test_overlapping_reloads_end_with_the_last_one_everywhere(service, digits, redis_client,
                                                              keys):
    workers = [service.worker(**digits_settings(digits["v1"], "1")) for _ in range(2)]
    first = subprocess.Popen(
        [sys.executable, "run_keras_server.py", "reload", *reload_args(digits["v2"], "2")],
        cwd=ROOT, env=service.env({}), stderr=subprocess.PIPE, text=True)
    wait_until(lambda: (records.wanted_model(redis_client, keys)[0] or {}).get("version") == "2",
               timeout=60, what="the first reload to propose version 2")
    status, log = reload(service, *reload_args(digits["v1"], "3"))
    first_log = first.communicate(timeout=300)[1]

    assert status == 0, log
    # The first one ended either before the second was proposed, or superseded by it.
    assert first.returncode == 0 or "superseded by a later reload" in first_log, first_log
    assert versions_served(redis_client, keys) == {str(w.pid): "3" for w in workers}
    assert records.wanted_model(redis_client, keys)[0]["version"] == "3"
    assert records.accepted_models(redis_client, keys)[-1]["version"] == "3"
    time.sleep(2)  # and it stays so: no late switch to version 2
    assert versions_served(redis_client, keys) == {str(w.pid): "3" for w in workers}


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_reload_takes_its_proposal_back(service, digits, redis_client, keys, sig):
    worker = service.worker(**digits_settings(digits["v1"], "1"))
    # Its supervisor, frozen, starts no new version: the reload waits until it is interrupted.
    os.kill(worker.pid, signal.SIGSTOP)
    try:
        # Started as a shell starts a job in the background: with SIGINT ignored.
        reloading = subprocess.Popen(
            [sys.executable, "run_keras_server.py", "reload", *reload_args(digits["v2"], "2")],
            cwd=ROOT, env=service.env({}), stderr=subprocess.PIPE, text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        wait_until(lambda: (records.wanted_model(redis_client, keys)[0] or {}).get("version")
                   == "2", timeout=60, what="the reload to propose version 2")
        reloading.send_signal(sig)
        log = reloading.communicate(timeout=60)[1]
    finally:
        os.kill(worker.pid, signal.SIGCONT)

    assert reloading.returncode != 0, log
    assert records.wanted_model(redis_client, keys)[0]["version"] == "1", log
    assert [spec["version"] for spec in records.accepted_models(redis_client, keys)] == ["1"]
    assert versions_served(redis_client, keys) == {str(worker.pid): "1"}


def test_a_new_version_that_gets_no_cpu_goes_on_unheld_then_at_normal_priority(
        service, digits, redis_client, keys):
    worker = service.worker(**digits_settings(digits["v1"], "1"))
    serving = {child.pid for child in psutil.Process(worker.pid).children()}
    reloading = subprocess.Popen(
        [sys.executable, "run_keras_server.py", "reload", *reload_args(digits["v2"], "2")],
        cwd=ROOT, env=service.env({}), stderr=subprocess.PIPE, text=True)
    try:
        # The new version's process is stopped as soon as the supervisor has it, long before its
        # model is loaded, and again as soon as the first step lets it go on: it stands in for
        # one that a busy worker leaves no CPU, held or not, at the lowest priority.
        candidate = wait_until(lambda: [child for child in psutil.Process(worker.pid).children()
                                        if child.pid not in serving], timeout=60, interval=0.01,
                               what="the new version's process")[0]
        candidate.suspend()
        stopped_at = time.monotonic()
        wait_until(lambda: "loads on unheld" in worker.log_path.read_text(),
                   timeout=LOADER_WINDOW_S + 30, interval=0.01, what="the first step")
        candidate.suspend()
        log = reloading.communicate(timeout=LOADER_WINDOW_S + 120)[1]
    finally:
        reloading.kill()
    took_s = time.monotonic() - stopped_at

    assert reloading.returncode == 0, log
    assert versions_served(redis_client, keys) == {str(worker.pid): "2"}
    assert "it loads on at normal priority" in worker.log_path.read_text()
    assert took_s >= 2 * LOADER_WINDOW_S  # a window at each step


def test_a_refused_reload_after_redis_lost_the_history_returns_to_the_version_served(
        service, digits, tiny_model, redis_client, keys, tmp_path):
    worker = service.worker(**digits_settings(digits["v1"], "1"))
    redis_client.delete(keys.model, keys.model_history)  # as a Redis restart without its data
    refused = next(spec for spec in bad_specs(digits, tiny_model, tmp_path)
                   if spec[0] == "refused by the worker")
    status, log = reload(service, *refused[1], cwd=refused[2])

    assert status == 1 and "refused by worker" in log, log
    # What every worker returns to: the version they served (else any that had switched stays).
    assert records.wanted_model(redis_client, keys)[0]["version"] == "1", log
    assert [spec["version"] for spec in records.accepted_models(redis_client, keys)] == ["1"]
    assert versions_served(redis_client, keys) == {str(worker.pid): "1"}


def test_a_reload_with_no_live_worker_is_not_accepted(service, digits, redis_client, keys):
    """No worker has loaded the version, so none has checked it: `reload` waits for one, and
    when none comes it times out and takes the proposal back, to the version accepted before if
    any (without waiting for workers to return to it: there are none)."""
    status, log = reload(service, *reload_args(digits["v2"], "2"), "--timeout-s", "2")

    assert status == 1 and "no model worker is live" in log, log
    assert records.wanted_model(redis_client, keys)[0] is None
    assert records.accepted_models(redis_client, keys) == []

    records.accept_first_model(redis_client, keys, digits_spec(digits["v1"], "1"))
    status, log = reload(service, *reload_args(digits["v2"], "2"), "--timeout-s", "2")

    assert status == 1 and "no model worker is live" in log, log
    assert "workers return to version 1" in log and "returning to version 1:" not in log, log
    assert records.wanted_model(redis_client, keys)[0]["version"] == "1"


def test_a_worker_started_during_a_reload_does_not_record_the_proposal_as_accepted(
        service, digits, redis_client, keys):
    records.propose_model(redis_client, keys, digits_spec(digits["v2"], "2"))  # a reload waits
    worker = service.worker(**digits_settings(digits["v1"], "1"))

    assert versions_served(redis_client, keys) == {str(worker.pid): "2"}  # it follows the reload
    assert records.accepted_models(redis_client, keys) == []  # which alone may accept it
