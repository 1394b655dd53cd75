"""The bare model, (a) of bench/benchmark.py: ResNet50 (random weights, fixed seed) in a process of
its own, loaded as the model worker loads it, timing batch sizes in interleaved slices; and photos
for INT8's calibration."""
import multiprocessing
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODEL, MODEL_SEED = "resnet50", 1234
BATCH_SIZES = (1, 2, 4, 8, 16, 32)
READY_TIMEOUT_S = 300  # TensorFlow import, model build and warm-up on two busy cores
SAMPLE_IMAGE = ROOT / "data" / "sample.jpg"


def serve_bare_model(conn, runtime, cores=None):
    """Child process: build the worker's model, then time every batch size each time asked."""
    if cores:
        os.sched_setaffinity(0, cores)  # before any runtime starts its threads
    import numpy as np

    import settings
    from serving.model.loader import load_classifier

    # The same loader and thread setting as the model worker, so threads and memory match.
    classifier = load_classifier(MODEL, "none", seed=MODEL_SEED, threads=settings.MODEL_THREADS,
                                 runtime=runtime, cache_dir=settings.OPENVINO_CACHE_DIR,
                                 lanes=settings.BATCHES_IN_FLIGHT, precision=settings.PRECISION,
                                 calibration=settings.CALIBRATION_IMAGES)
    rng = np.random.default_rng(MODEL_SEED)
    batches = {n: rng.integers(0, 256, (n, *classifier.input_shape), np.uint8)
               for n in BATCH_SIZES}  # pixels as the queue carries them
    for batch in batches.values():  # the first call at a new size traces the graph: not timed
        classifier.forward(batch)
    conn.send(classifier.runtime)
    while (order := conn.recv()) is not None:  # the parent sends None after its last round
        if order == "once":  # one timed batch-1 pass
            conn.send(figures_of(1, *timed_calls(classifier.forward, batches[1], 0))["batch_ms"])
        else:  # seconds for each size
            conn.send(time_sizes(classifier.forward, batches, order))


# (a) times the sizes in this many interleaved slices each: the machine's speed drifts from second
# to second, and sizes timed one after another in a single stretch each would make the best size
# the one that ran in the fastest moment, not the fastest size.
BARE_SLICES = 4


def time_sizes(forward, batches, seconds_per_size, slices=BARE_SLICES):
    """{size: figures_of its passes, and the images/s of each slice}: each size timed for
    seconds_per_size in all, in `slices` slices, in alternating order (as BATCH_SIZE=auto
    does)."""
    from serving.model.meters import alternating

    slices_of = {n: [] for n in batches}  # timed_calls of each slice
    for number in range(slices):
        for n in alternating(batches, number):
            slices_of[n].append(timed_calls(forward, batches[n], seconds_per_size / slices))
    figures = {}
    for n, timed in slices_of.items():
        times = [seconds for calls, _, _ in timed for seconds in calls]
        cpu_s, wall_s = sum(cpu for _, cpu, _ in timed), sum(wall for _, _, wall in timed)
        figures[n] = {**figures_of(n, times, cpu_s, wall_s),
                      "slices_img_per_s": [n * len(calls) / sum(calls) for calls, _, _ in timed]}
    return figures


def timed_calls(forward, batch, seconds, max_calls=10_000):
    """Call the forward pass for `seconds` (at least once): (seconds of each call, CPU seconds of
    this process meanwhile, seconds in all)."""
    times = []
    cpu_started, started_all = time.process_time(), time.perf_counter()
    deadline = started_all + seconds
    while len(times) < max_calls and (not times or time.perf_counter() < deadline):
        started = time.perf_counter()
        forward(batch)
        times.append(time.perf_counter() - started)
    return times, time.process_time() - cpu_started, time.perf_counter() - started_all


def figures_of(size, times, cpu_s, wall_s):
    """Images/s, median ms per batch, calls, and the cores the process used meanwhile (its CPU
    seconds per second), of passes of `size` images that took `times` seconds each."""
    return {"img_per_s": size * len(times) / sum(times),
            "batch_ms": statistics.median(times) * 1000, "calls": len(times),
            "cores": cpu_s / wall_s}


class BareModel:
    """The bare model's process, started once and driven one phase at a time through a pipe."""

    def __init__(self, runtime, cores=None):
        context = multiprocessing.get_context("spawn")  # a fresh interpreter, like the worker's
        self.conn, child_end = context.Pipe()
        self.process = context.Process(target=serve_bare_model, args=(child_end, runtime, cores),
                                       daemon=True)
        self.process.start()
        self.runtime = self.receive(READY_TIMEOUT_S)
        if self.runtime != runtime:
            raise RuntimeError(f"the bare model runs on {self.runtime}, not {runtime}")

    def measure(self, seconds_per_size):
        self.conn.send(seconds_per_size)
        return self.receive(len(BATCH_SIZES) * (seconds_per_size + 60))

    def one_pass(self):
        """Milliseconds of one batch-1 forward pass."""
        self.conn.send("once")
        return self.receive(60)

    def receive(self, timeout_s):
        if not self.conn.poll(timeout_s):
            raise RuntimeError(f"the bare-model process gave no answer within {timeout_s:.0f} s")
        return self.conn.recv()

    def stop(self):
        self.conn.send(None)
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()


def calibration_images(folder, count=300, seed=0):
    """A folder of `count` JPEG crops (and mirror images) of real photos: the sample image and
    scikit-learn's two sample images, for INT8's calibration. Returns the folder."""
    import io

    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.open(SAMPLE_IMAGE).convert("RGB"),
              *(Image.fromarray(pixels) for pixels in load_sample_images().images)]
    rng = np.random.default_rng(seed)
    for n in range(count):
        photo = photos[n % len(photos)]
        width, height = (int(rng.integers(side // 3, side + 1)) for side in photo.size)
        left = int(rng.integers(0, photo.width - width + 1))
        top = int(rng.integers(0, photo.height - height + 1))
        crop = photo.crop((left, top, left + width, top + height))
        if rng.random() < 0.5:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        buffer = io.BytesIO()
        crop.save(buffer, "JPEG", quality=90)
        Path(folder, f"{n:04d}.jpg").write_bytes(buffer.getvalue())
    return folder
