"""The worker's parts that need no process: process_batch with a real (tiny) model, the drain meter
and the arrival rate, with a clock the test turns; a worker's lanes handing over, on the test
Redis."""
import itertools
import threading
import time

import numpy as np
import pytest

import settings

from serving.wire import job_format
from conftest import ROOT, Clock, distinct_images, image_bytes, tiny_direct, wait_until
from serving.wire.job_format import decode_array
from serving.images import prepare_image
from serving.model.meters import ArrivalRate, DrainMeter, FillWindow
from serving.model.reader import ImageReader
from serving.model.worker import process_batch

NOW = 1_000_000.0


@pytest.fixture(scope="module")
def tiny(tiny_model):
    from serving.model.loader import load_classifier

    return load_classifier(tiny_model["MODEL"], "none", tiny_model["LABELS"], "scale_0_1",
                           version="7")


@pytest.fixture
def images(tiny):
    return ImageReader(tiny.input_shape, 2, 2**30)


def as_claimed(job):
    """A job as a worker reads it after claiming it."""
    return job_format.read_job(job.entry, job.body)


def jobs_for(images, deadline=NOW + 30, top_k=3, pixels=False):
    """Jobs of uploaded files (or of raw pixels, as /v2 sends them), queued 0.1 s apart."""
    jobs = []
    for n, data in enumerate(images):
        if pixels:
            job = job_format.new_job(prepare_image(data, (32, 32)), deadline, top_k, (32, 32, 3))
        else:
            job = job_format.new_job(data, deadline, top_k)
        job = as_claimed(job)
        job["enqueued_at"] = NOW - 0.1 * (n + 1)
        jobs.append(job)
    return jobs


@pytest.mark.parametrize("pixels", [False, True], ids=["files", "pixels"])
def test_process_batch_answers_every_job_from_one_forward_pass(tiny, tiny_model, images, pixels):
    uploads = distinct_images(4)
    jobs = jobs_for(uploads, pixels=pixels)
    ticks = itertools.count(50.0, 0.25)  # the forward pass takes one tick: 250 ms

    outcome = process_batch(tiny, images, jobs, NOW, clock=lambda: next(ticks))

    assert outcome.expired == [] and outcome.failed == 0 and outcome.forward_s == 0.25
    assert list(outcome.results) == [job["id"] for job in jobs]
    for n, (job, data) in enumerate(zip(jobs, uploads)):
        result = outcome.results[job["id"]]
        assert result["batch_size"] == 4 and result["model_version"] == "7"
        assert result["inference_ms"] == 250
        assert result["queue_wait_ms"] == pytest.approx(100 * (n + 1))
        expected = tiny_direct(tiny_model, data)
        labels = [int(p["label"].split("_")[1]) for p in result["predictions"]]
        assert labels == list(np.argsort(expected)[::-1][:3])
        for label, prediction in zip(labels, result["predictions"]):
            assert prediction["probability"] == pytest.approx(expected[label], abs=1e-5)


def test_process_batch_drops_jobs_whose_deadline_passes_before_the_pass_ends(tiny, images):
    late, on_time = jobs_for(distinct_images(2)[:1], deadline=NOW + 0.4), jobs_for(
        distinct_images(2)[1:], deadline=NOW + 0.6)
    outcome = process_batch(tiny, images, late + on_time, NOW, pass_s=0.5)
    assert outcome.expired == [late[0]["id"]]
    assert list(outcome.results) == [on_time[0]["id"]]
    assert outcome.results[on_time[0]["id"]]["batch_size"] == 1


def test_process_batch_answers_an_undecodable_job_with_400_and_the_rest_normally(tiny, images):
    good, truncated, not_an_image = jobs_for(distinct_images(3))
    wrong_shape, = jobs_for(distinct_images(1), pixels=True)
    wrong_shape["shape"] = [16, 64, 3]  # as many bytes, another shape
    whole = image_bytes(size=(64, 64))
    truncated["data"] = whole[:len(whole) // 2]
    not_an_image["data"] = b"not an image at all!"
    outcome = process_batch(tiny, images, [truncated, good, wrong_shape, not_an_image], NOW)
    assert outcome.results[good["id"]]["batch_size"] == 1
    assert outcome.results[good["id"]]["predictions"] == process_batch(
        tiny, images, [good], NOW).results[good["id"]]["predictions"]  # its own row, not another's
    errors = {name: outcome.results[job["id"]] for name, job in
              [("shape", wrong_shape), ("truncated", truncated), ("not an image", not_an_image)]}
    assert {name: error["status"] for name, error in errors.items()} == dict.fromkeys(errors, 400)
    assert "not the model's" in errors["shape"]["error"]
    assert "cannot decode the image" in errors["truncated"]["error"]
    assert "not an image in an accepted format" in errors["not an image"]["error"]


def test_process_batch_answers_a_job_asking_for_a_malformed_output_with_400_and_the_rest_normally(
        tiny, images):
    # No producer here writes such a job; one that another program wrote must not fail the batch.
    good, malformed = jobs_for(distinct_images(2))
    malformed["classification"] = "two"
    outcome = process_batch(tiny, images, [good, malformed], NOW)
    assert outcome.results[good["id"]]["batch_size"] == 2
    assert outcome.results[malformed["id"]]["status"] == 400
    assert "malformed" in outcome.results[malformed["id"]]["error"]


def test_process_batch_answers_what_a_job_asks_for_and_only_for_its_model(tiny, tiny_model,
                                                                          images):
    plain, full, top, other_model, other_version = jobs_for(distinct_images(5))
    full["probabilities"] = True
    top["classification"] = 2
    other_model["model"] = "resnet50"
    other_version.update(model="tiny", version="6")
    outcome = process_batch(tiny, images, [plain, full, top, other_model, other_version], NOW)

    assert "probabilities" not in outcome.results[plain["id"]]
    probabilities = decode_array(outcome.results[full["id"]]["probabilities"], (10,), np.float32)
    np.testing.assert_allclose(probabilities, tiny_direct(tiny_model, distinct_images(5)[1]),
                               atol=1e-6)
    expected = tiny_direct(tiny_model, distinct_images(5)[2])
    best = np.argsort(expected)[::-1][:2]
    assert [text.split(":")[1:] for text in outcome.results[top["id"]]["classification"]] == [
        [str(i), f"class_{i}"] for i in best]
    for job in (other_model, other_version):
        assert outcome.results[job["id"]]["status"] == 404
        assert "not served any more" in outcome.results[job["id"]]["error"]
    assert outcome.results[plain["id"]]["batch_size"] == 3


def test_process_batch_with_every_job_expired_runs_no_forward_pass(tiny, images):
    jobs = jobs_for(distinct_images(2), deadline=NOW - 1)
    outcome = process_batch(tiny, images, jobs, NOW,
                            clock=lambda: pytest.fail("the clock was read"))
    assert outcome.results == {} and outcome.forward_s == 0
    assert outcome.expired == [job["id"] for job in jobs]


# Run in an interpreter of its own: what the test process' allocator already holds would blur it.
DECODE_IN_TURN = """
import io, json, sys, threading, time
from PIL import Image
import settings
from serving.model.reader import ImageReader

def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096

side = int(settings.MAX_IMAGE_PIXELS ** 0.5) - 25
buffer = io.BytesIO()
Image.new("RGB", (side, side), (30, 60, 90)).save(buffer, "PNG")
job = {"id": "1", "data": buffer.getvalue(), "deadline": time.time() + 600}
reader = ImageReader((224, 224, 3), 1, settings.DECODE_BUDGET_BYTES)
before, growth, done = resident(), [], threading.Event()

def decode():
    try:
        refused = reader.read([job])[2]
        growth.append(f"refused: {refused}" if refused else resident() - before)
    except Exception as exc:  # said, rather than leaving the loop below waiting
        growth.append(repr(exc))
    done.wait()  # a thread keeps its allocator arena while it lives

threads = [threading.Thread(target=decode) for _ in range(4)]
for number, thread in enumerate(threads, 1):
    thread.start()
    while len(growth) < number:
        time.sleep(0.01)
done.set()
json.dump(growth, sys.stdout)
"""


def test_large_images_decoded_in_turn_by_different_threads_leave_no_memory_behind():
    import json
    import subprocess
    import sys

    # Each decode of this 6,299 x 6,299 PNG holds 150 MiB of pixels; a thread's arena that kept
    # them would show in the resident size after it, one more each turn.
    run = subprocess.run([sys.executable, "-c", DECODE_IN_TURN], cwd=ROOT, capture_output=True,
                         text=True, timeout=120, check=True)
    growth = json.loads(run.stdout)
    assert all(isinstance(g, int) for g in growth), growth
    assert len(growth) == 4 and max(growth) < 32 * 2**20, [g >> 20 for g in growth]


def test_a_model_whose_output_is_not_a_number_fails_those_jobs_with_500_in_valid_json(tmp_path):
    import json

    import keras

    from serving.model.loader import load_classifier

    keras.utils.set_random_seed(0)
    dense = keras.layers.Dense(3)
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(), dense])
    dense.set_weights([np.zeros((16, 3), np.float32), np.full(3, np.nan, np.float32)])
    model.save(tmp_path / "nan.keras")
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")
    broken = load_classifier(str(tmp_path / "nan.keras"), "none", str(tmp_path / "labels.txt"),
                             "none", runtime="keras")
    jobs = [as_claimed(job_format.new_job(np.zeros((4, 4, 1), np.uint8), NOW + 30, 3, (4, 4, 1)))
            for _ in range(2)]
    outcome = process_batch(broken, ImageReader(broken.input_shape, 1, 2**30), jobs, NOW)
    for job in jobs:
        assert outcome.results[job["id"]] == {
            "error": "the model's output for this image is not a number", "status": 500}
    json.loads(json.dumps(outcome.results, allow_nan=False))


def test_two_lanes_at_once_count_their_busy_time_once():
    clock = Clock()
    meter = DrainMeter(clock=clock)
    assert meter.rate() == 0 and meter.batch_s() == 0
    first = meter.start()
    clock.now += 0.5
    second = meter.start()  # the other lane starts while the first still runs
    clock.now += 0.5
    meter.finish(first, 8)  # 1 s, 8 images
    clock.now += 0.5
    meter.finish(second, 8)  # 1 s, 8 images; 1.5 s busy in all
    clock.now += 10  # idle time is not busy time
    third = meter.start()
    clock.now += 0.5
    meter.finish(third, 4)

    assert meter.rate() == pytest.approx(20 / 2.0)  # 20 images in 2 busy seconds, not 2.5
    assert meter.batch_s() == pytest.approx((1 + 1 + 0.5) / 3)


def test_the_rate_follows_the_last_batches():
    clock = Clock()
    meter = DrainMeter(window=2, clock=clock)
    for seconds in (1.0, 0.25, 0.25):  # a slow batch, then two fast ones
        started = meter.start()
        clock.now += seconds
        meter.finish(started, 5)
    assert meter.rate() == pytest.approx(10 / 0.5)


def test_arrival_rate_counts_the_last_second_and_the_batch_being_filled():
    clock = Clock()
    arrivals = ArrivalRate(horizon_s=1.0, clock=clock)
    assert arrivals.per_second() == 0 and arrivals.per_second(1) == 1
    arrivals.note(3)
    clock.now += 0.5
    arrivals.note(2)
    assert arrivals.per_second() == 5 and arrivals.per_second(2) == 7
    clock.now += 0.6  # the first 3 are now older than a second
    assert arrivals.per_second() == 2


def test_wait_idle_returns_when_the_last_running_pass_ends():
    meter = DrainMeter()
    assert meter.wait_idle(0)
    first, second = meter.start(), meter.start()
    assert not meter.wait_idle(0.01)
    meter.finish(first, 1)
    assert not meter.wait_idle(0.01)  # the other pass still runs
    ended = threading.Timer(0.05, meter.finish, (second, 1))
    ended.start()
    assert meter.wait_idle(5)
    ended.join()


def process_state(pid):
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def wait_for_state(pid, states):
    """A signal takes effect when the process next runs: wait until its state is one of these."""
    wait_until(lambda: process_state(pid) in states, timeout=5, interval=0.01,
               what=f"process {pid} to be in state {states}")


def test_a_loading_process_is_held_while_forward_passes_run_and_goes_on_between_them():
    import subprocess
    import sys

    from serving.model.loader_pause import LoaderPause

    loader = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        pause = LoaderPause()
        pause.follow(loader.pid)
        with pause:
            with pause:  # two lanes' passes overlap: held until both have ended
                wait_for_state(loader.pid, "T")
            time.sleep(0.1)
            assert process_state(loader.pid) == "T"
        wait_for_state(loader.pid, "RS")
        with pause:
            pause.follow(None)  # e.g. a hand-over: it must run now, held or not
            wait_for_state(loader.pid, "RS")
            time.sleep(0.1)
            assert process_state(loader.pid) in "RS"
        loader.kill()
        loader.wait()
        with pause:  # a loader that has ended is no error
            pass
    finally:
        loader.kill()


def test_a_partial_batch_waits_for_company_only_when_it_is_likely_and_never_beside_a_pass():
    """The fill window at the default BATCH_TIMEOUT_MS: no wait at light load, the whole window
    when the arrival rate makes another job likely within it, and a short look while another
    lane's forward pass runs."""
    clock = Clock()
    fill = FillWindow(settings.BATCH_TIMEOUT_MS / 1000, clock=clock)
    assert fill.timer()(1) <= 0  # 1 job a second: another within the window is unlikely
    fill.arrivals.note(1000)  # 1,000 a second
    time_to_fill = fill.timer()
    assert time_to_fill(1) == pytest.approx(settings.BATCH_TIMEOUT_MS / 1000)
    clock.now += 0.002
    assert time_to_fill(2) == pytest.approx(settings.BATCH_TIMEOUT_MS / 1000 - 0.002)
    running = fill.drain.start()
    assert time_to_fill(2) == 0.0001  # claim what came meanwhile, and ask again
    fill.drain.finish(running, 2)


class HeldPasses:
    """The tiny model, whose forward passes wait until `go` is set: a batch held in hand."""

    def __init__(self, model):
        self.model, self.started, self.go = model, threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self.model, name)

    def predict_batch(self, pixels):
        self.started.set()
        self.go.wait(30)
        return self.model.predict_batch(pixels)


def test_a_worker_handing_over_returns_from_stop_once_its_batch_in_hand_is_answered(
        tiny, store, redis_client):
    """stop(successor=True) returns once no lane claims and the batch in hand is answered: the
    successor claims from then on, and its first passes never share the cores with this worker's
    last. The worker claims nothing more meanwhile, although its other lane was waiting in a
    claim."""
    from serving.model.worker import ModelWorker
    from serving.wire import jobqueue
    from serving.wire.keys import Keys

    keys, model = Keys(settings.IMAGE_QUEUE), HeldPasses(tiny)
    worker = ModelWorker(store, model, 1, {"id": "old"})
    lanes = threading.Thread(target=worker.run)
    lanes.start()
    first, second = (job_format.new_job(image_bytes(seed=n), time.time() + 30, 3)
                     for n in range(2))
    try:
        jobqueue.enqueue_jobs(store, keys, [first], 100, 10**9)
        assert model.started.wait(10)  # one lane's pass holds `first`; the other lane claims
        stopping = threading.Thread(target=worker.stop, kwargs={"successor": True})
        stopping.start()
        stopping.join(3)  # (the other lane's claim, a second at most, has ended)
        assert stopping.is_alive()  # the pass in hand holds it
        jobqueue.enqueue_jobs(store, keys, [second], 100, 10**9)  # for the successor
        model.go.set()
        stopping.join(10)
        assert not stopping.is_alive()
        assert redis_client.llen(keys.result(first.id)) == 1  # answered before stop returned
    finally:
        model.go.set()
        lanes.join(10)
    assert not lanes.is_alive()
    assert redis_client.llen(keys.queue) == 1  # `second` waits for the successor
