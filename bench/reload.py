"""Do model reloads disturb the requests being served? Latency during 10 reloads against steady.

    python bench/reload.py                       # 10 reloads, without and with jemalloc
    python bench/reload.py --reloads 3 --allocators default

Starts the whole service (`python run_keras_server.py`, private Redis, default settings) with
ResNet50 (seeded random weights), measures its capacity with a short closed loop at 2 x BATCH_SIZE
clients, then keeps a closed loop at about half of it: CLIENTS clients, each pausing between its
requests. After a steady phase, it runs `run_keras_server.py reload` 10 times one after another
(versions 2, 3, ...), with a pause after each. For each reload it prints p99 and p999 latency of
the requests sent from the reload's start until a second after it returned, as ratios to the
steady phase's, the failed requests, whether each worker's answers switched version exactly
once, and the peak memory (PSS) of the model processes, steady and while two versions are loaded
(sampled every second). With --allocators default,jemalloc it does it all twice, the second time
with jemalloc (LD_PRELOAD) in every process of the service.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import requests

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent)]
from benchmark import (ROOT, machine_info, running_service, service_processes,  # noqa: E402
                       write_json)

JEMALLOC = "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"  # Debian's libjemalloc2
TARGET_RATIO = 1.2


def test_image():
    """A 640x480 JPEG photo-sized upload (random pixels, fixed seed)."""
    from io import BytesIO

    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (480, 640, 3), np.uint8)
    buffer = BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


class ClosedLoop:
    """`clients` threads, each sending one request, waiting for its answer, pausing `pause_s`."""

    def __init__(self, url, clients, pause_s, image):
        self.url, self.pause_s, self.image = url, pause_s, image
        self.records, self.stop = [], threading.Event()
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(clients)]
        self.began = time.monotonic()
        for thread in self.threads:
            thread.start()

    def client(self):
        session = requests.Session()
        while not self.stop.is_set():
            sent = time.monotonic()
            try:
                response = session.post(f"{self.url}/predict", files={"image": self.image},
                                        timeout=120)
                record = (sent, time.monotonic() - sent, response.status_code,
                          response.headers.get("X-Model-Version"),
                          response.headers.get("X-Model-Worker"))
            except requests.RequestException as exc:
                record = (sent, time.monotonic() - sent, type(exc).__name__, None, None)
            self.records.append(record)
            self.stop.wait(self.pause_s)

    def finish(self):
        self.stop.set()
        for thread in self.threads:
            thread.join()
        return self.records


class ModelMemory:
    """The peak memory (PSS, MB) of the service's model processes, sampled every second in a
    thread, per phase ("steady", then "reloads"): what a container limit must hold."""

    def __init__(self, root_pid):
        self.root_pid, self.phase, self.peaks = root_pid, "start", {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def model_pss_mb(self):
        total = 0
        for process, role in service_processes(self.root_pid):
            if role != "model":
                continue
            try:
                total += process.memory_full_info().pss
            except psutil.Error:  # it ended meanwhile
                continue
        return total / 1e6

    def sample(self):
        while not self.done.wait(1.0):
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), self.model_pss_mb())

    def finish(self):
        self.done.set()
        self.thread.join()
        return {phase: round(mb) for phase, mb in self.peaks.items()}


def capacity(url, concurrency, seconds, image):
    """Images per second of a closed loop without pauses (after 3 s unmeasured)."""
    loop = ClosedLoop(url, concurrency, 0, image)
    time.sleep(3 + seconds)
    records = loop.finish()
    ok = [r for r in records if r[2] == 200 and r[0] - loop.began >= 3]
    return len(ok) / seconds


def percentiles(latencies):
    return {"p50_ms": float(np.percentile(latencies, 50)) * 1000,
            "p99_ms": float(np.percentile(latencies, 99)) * 1000,
            "p999_ms": float(np.percentile(latencies, 99.9)) * 1000,
            "requests": len(latencies)}


def switches_once_per_reload(records):
    """Every model process (worker id SUPERVISOR/N) answered with one version, and each worker's
    processes, in the order they started, served each version once, in the order asked."""
    versions = {}
    for _, _, status, version, process in records:
        if status == 200:
            versions.setdefault(process, set()).add(version)
    if any(len(v) != 1 for v in versions.values()):
        return False
    by_worker = {}
    for process in sorted(versions, key=lambda p: int(p.rsplit("/", 1)[1])):
        by_worker.setdefault(process.rsplit("/", 1)[0], []).append(next(iter(versions[process])))
    return all(sequence == [str(n) for n in range(1, len(sequence) + 1)]
               for sequence in by_worker.values())


def reload(version, env):
    started = time.monotonic()
    done = subprocess.run([sys.executable, "run_keras_server.py", "reload", "--model", "resnet50",
                           "--weights", "none", "--version", str(version)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    return started, time.monotonic(), done.returncode, done.stderr[-2000:]


def run_allocator(allocator, args, workdir, image):
    from run_keras_server import start_private_redis, stop_processes

    redis_process, redis_url = start_private_redis(workdir)  # one `reload` can reach too
    overrides = {"REDIS_URL": redis_url}
    if allocator == "jemalloc":
        overrides["LD_PRELOAD"] = JEMALLOC
    print(f"\n== allocator: {allocator}", flush=True)
    if args.runtime:
        overrides["RUNTIME"] = args.runtime
    try:
        return measure_reloads(allocator, args, workdir, image, overrides)
    except RuntimeError as exc:  # e.g. a runtime that crashes with this allocator
        print(f"the service failed with {allocator}: {str(exc)[-600:]}")
        return {"allocator": allocator, "runtime": args.runtime or "auto",
                "error": str(exc)[-3000:]}
    finally:
        stop_processes([redis_process])


def measure_reloads(allocator, args, workdir, image, overrides):
    with running_service(overrides, workdir) as (url, heartbeat, pid):
        memory = ModelMemory(pid)
        batch_size = int(heartbeat["batch_size"])
        full = capacity(url, 2 * batch_size, args.capacity_seconds, image)
        forward_s = float(heartbeat.get("batch_s") or 0)
        # CLIENTS clients at half of the capacity: each sends every CLIENTS / (capacity / 2) s.
        cycle_s = args.clients / (full / 2)
        loop = ClosedLoop(url, args.clients, 0, image)
        time.sleep(2)
        latency_s = float(np.median([r[1] for r in loop.records if r[2] == 200] or [0.1]))
        loop.pause_s = max(0.0, cycle_s - latency_s)
        print(f"capacity {full:.1f} img/s at batch size {batch_size}; {args.clients} clients "
              f"pausing {loop.pause_s * 1000:.0f} ms (about {full / 2:.1f} req/s)", flush=True)
        steady_from, memory.phase = time.monotonic(), "steady"
        time.sleep(args.steady_seconds)
        steady_to, memory.phase = time.monotonic(), "reloads"
        env = {**os.environ, "REDIS_URL": overrides["REDIS_URL"]}
        windows = []
        for number in range(args.reloads):
            started, ended, status, log = reload(number + 2, env)
            windows.append({"version": number + 2, "started": started, "ended": ended,
                            "status": status, "log": log if status else ""})
            print(f"reload to version {number + 2}: exit {status} after {ended - started:.1f} s",
                  flush=True)
            time.sleep(args.pause_seconds)
        records = loop.finish()
        peaks = memory.finish()
    raw = Path(workdir) / f"requests-{allocator}.json"
    raw.write_text(json.dumps({"records": records, "steady": [steady_from, steady_to],
                               "reloads": windows}))
    steady = [r[1] for r in records if steady_from <= r[0] < steady_to and r[2] == 200]
    result = {"allocator": allocator, "runtime": heartbeat.get("runtime"),
              "batch_size": batch_size, "capacity_img_per_s": full,
              "forward_s_at_start": forward_s, "clients": args.clients,
              "pause_ms": loop.pause_s * 1000, "steady": percentiles(steady),
              "model_pss_mb": {"steady": peaks.get("steady"), "reloads": peaks.get("reloads")},
              "failed": sum(r[2] != 200 for r in records if r[0] >= steady_from),
              "switches_once_per_reload": switches_once_per_reload(
                  [r for r in records if r[0] >= steady_from]),
              "reloads": []}
    for window in windows:
        inside = [r for r in records
                  if window["started"] <= r[0] <= window["ended"] + 1 and r[2] == 200]
        figures = percentiles([r[1] for r in inside]) if inside else {}
        figures.update(version=window["version"], exit_status=window["status"],
                       seconds=window["ended"] - window["started"], log=window["log"])
        if inside:
            figures["p99_ratio"] = figures["p99_ms"] / result["steady"]["p99_ms"]
            figures["p999_ratio"] = figures["p999_ms"] / result["steady"]["p999_ms"]
        result["reloads"].append(figures)
    return result


def print_table(result):
    if "error" in result:
        return
    steady = result["steady"]
    print(f"\n{result['allocator']}, {result['runtime']}: steady p50 {steady['p50_ms']:.0f} ms, "
          f"p99 "
          f"{steady['p99_ms']:.0f} ms, p999 {steady['p999_ms']:.0f} ms "
          f"({steady['requests']} requests); failed {result['failed']}; each worker switched "
          f"once per reload: {result['switches_once_per_reload']}")
    print("reload  exit  seconds  requests  p99 ms  p999 ms  p99/steady  p999/steady")
    for r in result["reloads"]:
        print(f"{r['version']:6d}  {r['exit_status']:4d}  {r['seconds']:7.1f}  "
              f"{r.get('requests', 0):8d}  {r.get('p99_ms', 0):6.0f}  {r.get('p999_ms', 0):7.0f}"
              f"  {r.get('p99_ratio', 0):10.2f}  {r.get('p999_ratio', 0):11.2f}")
    memory = result["model_pss_mb"]
    print(f"model processes' memory (PSS), peak: {memory['steady']} MB steady, "
          f"{memory['reloads']} MB during the reloads")
    worst = max(max(r.get("p99_ratio", 0), r.get("p999_ratio", 0)) for r in result["reloads"])
    print(f"worst ratio {worst:.2f} (target: at most {TARGET_RATIO})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reloads", type=int, default=10)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--steady-seconds", type=float, default=60)
    parser.add_argument("--pause-seconds", type=float, default=5,
                        help="steady time after each reload (5)")
    parser.add_argument("--capacity-seconds", type=float, default=15)
    parser.add_argument("--allocators", default="default,jemalloc")
    parser.add_argument("--runtime", help="RUNTIME of the service (its default: auto)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / (
        f"{time.strftime('%Y-%m-%d')}-{os.uname().nodename}-reload.json")))
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="reload-bench-")
    image = test_image()
    record = {**machine_info(), "command": " ".join(sys.argv), "target_ratio": TARGET_RATIO,
              "runs": []}
    for allocator in args.allocators.split(","):
        record["runs"].append(run_allocator(allocator, args, workdir, image))
        print_table(record["runs"][-1])
        write_json(args.out, record)
    print(f"service logs: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
