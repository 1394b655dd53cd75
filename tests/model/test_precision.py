"""PRECISION: reduced precisions checked against FP32 at start, INT8 from the user's calibration
images (cached, rebuilt when they change), `auto`'s choice, and reloads between precisions. Real
worker processes, a real trained model (the digits CNN) and ResNet50 with seeded weights."""
import io
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import requests
from PIL import Image

from conftest import digits_settings, post_image, reload, reload_args, wait_until, worker_stats
from serving.model import precision as reduced


def offered_16_bit():
    """The 16-bit precisions OpenVINO finds units for on this CPU."""
    import openvino

    return reduced.hardware_precisions(openvino.Core())


def png(pixels):
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def heldout_accuracy(url, digits):
    """Top-1 accuracy over HTTP on the held-out digits, and the precision that served them."""
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda data: post_image(url, data, "d.png"), digits["images"]))
    assert all(r.status_code == 200 for r in answers), [r.text for r in answers][:3]
    precisions = {r.headers["X-Model-Precision"] for r in answers}
    predicted = [int(r.json()["predictions"][0]["label"]) for r in answers]
    return float(np.mean(np.array(predicted) == np.array(digits["labels"]))), precisions


def test_the_digits_cnn_keeps_its_accuracy_at_int8_and_at_the_cpus_16_bit_precisions(
        service, digits, redis_client, keys):
    calibration = digits["v1"] / "calibration"
    precisions = ["fp32", "int8", *offered_16_bit()]
    accuracies = {}
    for name in precisions:
        worker = service.worker(PRECISION=name, CALIBRATION_IMAGES=calibration,
                                **digits_settings(digits["v1"], "1"))
        web = service.web()
        accuracies[name], served = heldout_accuracy(web.url, digits)
        assert served == {name}
        check = requests.get(f"{web.url}/model").json()["model"]["precision_check"]
        if name == "fp32":
            assert check is None
        else:  # checked against fp32 on the calibration images, and reported
            assert check["precision"] == name and check["top1_agreement"] >= 0.98, check
            assert check["images"] == f"{len(list(calibration.glob('*.png')))} images of " \
                                      "CALIBRATION_IMAGES"
        for process in (worker, web):
            process.terminate()
            process.wait(60)
        # A worker starts with the last accepted version: each precision here is a fresh start.
        redis_client.delete(keys.model, keys.model_history)
    print(f"held-out accuracy over HTTP: {accuracies}")
    assert accuracies["fp32"] >= 0.9, accuracies
    assert all(abs(accuracy - accuracies["fp32"]) <= 0.005 for accuracy in accuracies.values()), \
        accuracies


def test_int8_without_calibration_images_is_refused_at_start_saying_why(service, digits):
    worker = service.worker(wait=False, PRECISION="int8", **digits_settings(digits["v1"], "1"))
    assert worker.wait(180) == 2
    assert "PRECISION=int8 needs CALIBRATION_IMAGES" in worker.log_path.read_text()


def tie_model(folder):
    """A model whose two logits differ by 1 on a sum of 64 pixels (thousands): FP32 always picks
    the second, while a 16-bit number cannot tell them apart and the first wins the tie."""
    import keras

    inputs = keras.Input((8, 8, 1))
    dense = keras.layers.Dense(2, activation="softmax")
    model = keras.Model(inputs, dense(keras.layers.Flatten()(inputs)))
    dense.set_weights([np.ones((64, 2), np.float32), np.array([0.0, 1.0], np.float32)])
    model.save(folder / "tie.keras")
    (folder / "labels.txt").write_text("first\nsecond\n")
    return {"MODEL": folder / "tie.keras", "LABELS": folder / "labels.txt", "PREPROCESS": "none"}


def test_a_precision_that_fails_its_check_is_refused_and_auto_serves_fp32(
        service, tmp_path, redis_client, keys):
    model = tie_model(tmp_path)
    offered = offered_16_bit()
    explicit = offered[0] if offered else "bf16"
    refused = service.worker(wait=False, PRECISION=explicit, **model)
    assert refused.wait(180) == 2
    log = refused.log_path.read_text()
    if offered:  # it computes in 16 bits, and fails its check: the reason is logged
        assert re.search(rf"PRECISION={explicit} refused: {explicit} agrees with FP32 on the top "
                         r"label of [\d.]+% of 64 seeded random images, under the 99.00% "
                         "required", log), log[-2000:]
    else:  # (on a CPU without 16-bit units, it says so)
        assert f"PRECISION={explicit}: this CPU has no {explicit} units" in log, log[-2000:]

    auto = service.worker(PRECISION="auto", **model)
    assert worker_stats(redis_client, keys)[str(auto.pid)]["precision"] == "fp32"
    log = auto.log_path.read_text()
    for name in offered:
        assert f"PRECISION=auto: not {name}: {name} agrees with FP32" in log, log[-2000:]
    web = service.web()
    answer = post_image(web.url, png(np.full((8, 8), 100, np.uint8)), "grey.png")
    assert answer.status_code == 200 and answer.headers["X-Model-Precision"] == "fp32"
    assert answer.json()["predictions"][0]["label"] == "second"  # FP32's answer
    description = requests.get(f"{web.url}/model").json()["model"]
    assert description["precision"] == "fp32" and description["precision_check"] is None


def test_resnet50_with_precision_auto_reports_its_check(service, redis_client, keys):
    offered = offered_16_bit()
    worker = service.worker(MODEL="resnet50", PRECISION="auto", BATCH_SIZE=4)
    beat = worker_stats(redis_client, keys)[str(worker.pid)]
    log = worker.log_path.read_text()
    assert "PRECISION=auto chose" in log or not offered, log[-2000:]
    web = service.web()
    description = requests.get(f"{web.url}/model").json()["model"]
    assert description["precision"] == beat["precision"]
    if beat["precision"] != "fp32":
        check = description["precision_check"]
        assert check["top1_agreement"] >= 0.99 and 0 < check["max_difference"] < 0.1, check
        assert re.search(rf"{beat['precision']} against FP32 on 64 seeded random images: top-1 "
                         r"agreement [\d.]+", log)
    print(f"auto chose {beat['precision']} here (offered: {offered}); check "
          f"{description['precision_check']}")


def startup(worker):
    """Seconds from a worker's start to its first line saying it serves (logged as it begins to
    claim, which may come just after the heartbeat that shows it warm)."""
    def logged():
        lines = worker.log_path.read_text().splitlines()
        return lines if any(" serving: model " in line for line in lines) else None

    lines = wait_until(logged, what="the worker's log to say it serves")
    stamps = [line[:23] for line in lines if re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}", line)]
    served = next(line[:23] for line in lines if " serving: model " in line)
    parse = lambda stamp: time.mktime(time.strptime(stamp[:19], "%Y-%m-%d %H:%M:%S")) + int(
        stamp[20:]) / 1000  # noqa: E731
    return parse(served) - parse(stamps[0])


def test_the_int8_model_is_cached_and_rebuilt_when_the_calibration_images_change(
        service, digits, tmp_path, redis_client, keys):
    calibration = tmp_path / "calibration"
    shutil.copytree(digits["v1"] / "calibration", calibration)
    settings = dict(PRECISION="int8", CALIBRATION_IMAGES=calibration, BATCH_SIZE=8,
                    OPENVINO_CACHE_DIR=tmp_path / "cache", **digits_settings(digits["v1"], "1"))
    logs, times = [], []
    for change in (None, None, "changed"):
        if change:  # another image among them
            shutil.copy(digits["v1"] / "heldout" / "0000.png", calibration / "0000.png")
        worker = service.worker(**settings)
        logs.append(worker.log_path.read_text())
        times.append(startup(worker))
        worker.terminate()
        worker.wait(60)
    print(f"start-up with INT8: {', '.join(f'{s:.1f} s' for s in times)} (the second from the "
          "cache)")
    assert "quantized to INT8 on 300 calibration images" in logs[0]
    assert "INT8 model from the cache" in logs[1] and "quantized to INT8" not in logs[1]
    assert "quantized to INT8 on 300 calibration images" in logs[2]
    assert len(list((tmp_path / "cache").glob("*-int8.xml"))) == 2


def test_reload_to_another_precision_and_rollback_under_load_fail_no_request(
        service, digits, redis_client, keys):
    calibration = digits["v1"] / "calibration"
    service.worker(BATCH_SIZE=8, **digits_settings(digits["v1"], "1"))
    web = service.web()
    answers, stop = [], threading.Event()

    def client(offset):
        i = offset
        while not stop.wait(0.05):
            response = post_image(web.url, digits["images"][i % len(digits["images"])], "d.png")
            answers.append((time.monotonic(), response.status_code,
                            response.headers.get("X-Model-Version"),
                            response.headers.get("X-Model-Precision"),
                            response.headers.get("X-Model-Worker")))
            i += 5

    with ThreadPoolExecutor(3) as pool:
        clients = [pool.submit(client, n) for n in range(3)]
        wait_until(lambda: len(answers) >= 10, what="answers before the reload")
        status, log = reload(service, *reload_args(digits["v1"], "1-int8"), "--precision", "int8",
                             "--calibration-images", str(calibration))
        assert status == 0, log
        wait_until(lambda: answers[-1][3] == "int8", what="answers at int8")
        status, log = reload(service, "--rollback")
        assert status == 0, log
        wait_until(lambda: answers[-1][3] == "fp32", what="answers at fp32 again")
        stop.set()
        for future in clients:
            future.result()

    assert all(status == 200 for _, status, *_ in answers), [a for a in answers if a[1] != 200]
    # Each version runs in a process of its own (worker id SUPERVISOR/N), and the old one finishes
    # its batches while the new one answers: by process, not by arrival, the worker switched to
    # int8 once and back once.
    by_process = {}
    for _, _, version, precision, process in answers:
        by_process.setdefault(process, set()).add((version, precision))
    in_order = [by_process[process] for process in
                sorted(by_process, key=lambda process: int(process.rsplit("/", 1)[1]))]
    assert in_order == [{("1", "fp32")}, {("1-int8", "int8")}, {("1", "fp32")}], by_process
