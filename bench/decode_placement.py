"""Where to decode uploads: CPU per image of each place the work falls, measured on one machine.

    python bench/decode_placement.py                 # the sample image, 2,000 images each way

  web tier:  the web process decodes the upload and queues its pixels (uint8, the model's input
             size); the model process copies them into its batch.
  model:     the web process reads the header and queues the upload as it came; the model process
             decodes it into its batch (what the service does).
Both run the service's own code (helpers, jobqueue) against a real redis-server, the web side and
the model side each in a process of its own, and the job's other steps (the HTTP request, the
forward pass, the answer) are left out: they are the same wherever decoding runs. Printed: CPU
milliseconds per image of the web process, Redis and the model process, and their sum. (A third
place, resizing inside the model graph, cannot batch uploads of different sizes: a batch has one
input shape.)
"""
import argparse
import json
import multiprocessing
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SIZE, BATCH = (224, 224), 16


def web_side(url, queue, place, image, count, start, spent):
    """Queue `count` jobs of one image as the web tier would with decoding at `place`."""
    from serving.images import prepare_image
    from serving.web.submit import check_upload
    from serving.wire import job_format, jobqueue
    from serving.wire.connection import connect_redis
    from serving.wire.keys import Keys

    store, keys = connect_redis(url), Keys(queue)
    store.ping()
    start.wait()
    began = time.process_time()
    for _ in range(count):
        deadline = time.time() + 60
        if place == "web tier":
            pixels = prepare_image(image, SIZE)
            job = job_format.new_job(pixels, deadline, 5, pixels.shape)
        else:
            check_upload(image)
            job = job_format.new_job(image, deadline, 5)
        jobqueue.enqueue_jobs(store, keys, [job], 10**9, 2**40)
    spent.put(("web", time.process_time() - began))


def model_side(url, queue, count, start, spent):
    """Claim the jobs in batches and put each image into a batch buffer (decoding uploads)."""
    from serving.model.reader import ImageReader
    from serving.model.worker import parse_jobs
    from serving.wire import jobqueue
    from serving.wire.connection import connect_redis
    from serving.wire.keys import Keys

    store, keys = connect_redis(url), Keys(queue)
    reader = ImageReader((SIZE[1], SIZE[0], 3), 1, 2**30)
    store.ping()
    start.wait()
    began, taken = time.process_time(), 0
    while taken < count:
        claimed = jobqueue.claim_batch(store, keys, "bench", BATCH, 1.0, 60, lambda n: 0)
        pixels, valid, refusals = reader.read(parse_jobs(claimed))
        assert not refusals, refusals
        jobqueue.store_results(store, keys, "bench", {}, [entry for entry, _ in claimed], 60)
        taken += len(valid)
    spent.put(("model", time.process_time() - began))


def cpu_s(process):
    times = process.cpu_times()
    return times.user + times.system


def measure(place, url, redis, image, count):
    """CPU ms per image of the web side, Redis and the model side for one place."""
    context = multiprocessing.get_context("spawn")
    queue = f"placement-{place.replace(' ', '-')}"
    start, spent = context.Event(), context.Queue()
    sides = [context.Process(target=web_side, args=(url, queue, place, image, count, start,
                                                    spent)),
             context.Process(target=model_side, args=(url, queue, count, start, spent))]
    for side in sides:
        side.start()
    time.sleep(5)  # both have imported and connected, and wait for the start
    redis_before = cpu_s(redis)
    start.set()
    figures = dict(spent.get(timeout=600) for _ in sides)
    figures["redis"] = cpu_s(redis) - redis_before
    for side in sides:
        side.join()
    return {part: seconds * 1000 / count for part, seconds in figures.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", default=str(ROOT / "data" / "sample.jpg"))
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", help="JSON record")
    args = parser.parse_args(argv)
    image = Path(args.image).read_bytes()
    workdir = tempfile.mkdtemp(prefix="placement-")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    redis = subprocess.Popen([shutil.which("redis-server") or "redis-server", "--port", str(port),
                              "--save", "", "--appendonly", "no", "--dir", workdir],
                             stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    time.sleep(0.5)
    from bench.machine import machine_info

    rounds = {"web tier": [], "model": []}
    try:
        for _ in range(args.rounds):  # alternated, so that the machine's drift touches both
            for place in rounds:
                rounds[place].append(measure(place, url, psutil.Process(redis.pid), image,
                                             args.count))
    finally:
        redis.terminate()
        redis.wait()
    machine = machine_info()
    print(f"{len(image) // 1000} kB upload, {args.count} images x {args.rounds} rounds; machine: "
          f"{machine['cpu']} (family {machine['cpu_family']}, model {machine['cpu_model']})")
    summary = {}
    for place, figures in rounds.items():
        medians = {part: sorted(f[part] for f in figures)[len(figures) // 2]
                   for part in ("web", "redis", "model")}
        medians["total"] = sum(medians.values())
        summary[place] = medians
        print(f"decoding in the {place:9s}: CPU ms per image: web {medians['web']:.3f}, Redis "
              f"{medians['redis']:.3f}, model process {medians['model']:.3f}; together "
              f"{medians['total']:.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps({**machine, "image_bytes": len(image),
                                              "rounds": rounds, "summary": summary}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
