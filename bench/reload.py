"""Do model reloads disturb the requests being served? Latency during 10 reloads against steady.

    python bench/reload.py                       # 10 reloads at the service's defaults
    python bench/reload.py --runtime keras --reloads 3

Starts the whole service (`python run_keras_server.py`, private Redis, default settings) with
ResNet50 (seeded random weights) and measures its capacity with a short closed loop at 2 x
BATCH_SIZE clients. Then an open loop sends requests at half of that capacity, at fixed times
whatever the answers do (a closed loop sends fewer requests while the service slows down, and so
hides part of a spike). After a steady phase it runs `run_keras_server.py reload` 10 times one
after another (versions 2, 3, ...), with a pause after each; the service converts each version
to OpenVINO afresh (a cache folder of its own, removed at the end). For each reload it prints
p99 and p999 latency of the requests sent from the reload's start until a second after it
returned and the replaced model process ended, whichever is later, as ratios to the steady
phase's, and where in that window the requests slower than steady p99 were sent (by tenths);
then the failed requests, whether each worker's answers switched version exactly once, and the
peak resident memory of the model processes, steady and while two versions are loaded (sampled
every second). It also prints the steady phase's p99 by 10-s block, and says when one of them
had an episode (the machine's: no reload runs then) that makes the steady baseline unfair, or
when the steady p99 is over 1.1 x the median block's, the reloads' p99 against that block. The
record names the CPU it ran on.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import stress_test  # noqa: E402
from bench.bare import ROOT  # noqa: E402
from bench.cpu import service_processes  # noqa: E402
from bench.machine import machine_info, write_json  # noqa: E402
from bench.service import running_service  # noqa: E402

TARGET_RATIO = 1.2


def test_image():
    """A 640x480 JPEG photo-sized upload (random pixels, fixed seed)."""
    from io import BytesIO

    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (480, 640, 3), np.uint8)
    buffer = BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


class OpenLoop:
    """stress_test's open loop at `rate` requests per second, in a thread, until finish(); its
    records' t_s count from `origin` (time.perf_counter(), taken as the loop starts)."""

    def __init__(self, url, rate, image):
        self.stop, self.records = threading.Event(), []
        self.thread = threading.Thread(target=lambda: self.records.extend(
            stress_test.run_open_loop(f"{url}/predict", [("a.jpg", image)], 10**9, rate, None,
                                      120, stop=self.stop)), daemon=True)
        self.origin = time.perf_counter()
        self.thread.start()

    def finish(self):
        self.stop.set()
        self.thread.join()
        return self.records


class ModelMemory:
    """The peak resident memory (MB) of the service's model processes, sampled every second in a
    thread, per phase ("steady", then "reloads"): what a container limit must hold.

    Read from the kernel's counters (/proc/PID/statm): each process's own (anonymous) pages, plus
    the file-backed pages of the one with most, which they share (the same libraries). Not PSS:
    reading it walks a process's page tables under a lock that its forward passes need, so the
    sampler itself would slow the passes whose latency this script measures."""

    def __init__(self, root_pid):
        self.root_pid, self.phase, self.peaks = root_pid, "start", {}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()

    def model_resident_mb(self):
        own, shared = 0, 0
        for process, role in service_processes(self.root_pid):
            if role != "model":
                continue
            try:
                memory = process.memory_info()
            except psutil.Error:  # it ended meanwhile
                continue
            own += memory.rss - memory.shared
            shared = max(shared, memory.shared)
        return (own + shared) / 1e6

    def sample(self):
        while not self.done.wait(1.0):
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), self.model_resident_mb())

    def finish(self):
        self.done.set()
        self.thread.join()
        return {phase: round(mb) for phase, mb in self.peaks.items()}


def capacity(url, concurrency, seconds, image):
    """Images per second of a closed loop without pauses (after 3 s unmeasured)."""
    records = stress_test.run_closed_loop(f"{url}/predict", [("a.jpg", image)], concurrency,
                                          10**9, 3 + seconds, 120)
    return sum(r["ok"] and r["t_s"] >= 3 for r in records) / seconds


def percentiles(latencies):
    return {"p50_ms": float(np.percentile(latencies, 50)) * 1000,
            "p99_ms": float(np.percentile(latencies, 99)) * 1000,
            "p999_ms": float(np.percentile(latencies, 99.9)) * 1000,
            "requests": len(latencies)}


# The steady phase is cut in blocks of this many seconds: one whose p99 is more than
# UNSTEADY_FACTOR x the median block's had an episode (the machine's, as no reload runs then),
# and the steady p99 it lifts is no fair baseline for the reloads' ratios.
STEADY_BLOCK_S = 10
UNSTEADY_FACTOR = 1.5
# A steady p99 over this many times the median block's came from a slower part of the phase.
FLATTERED_FACTOR = 1.1


def block_p99s(records, start, end):
    """p99 latency (ms) of the requests sent in each STEADY_BLOCK_S of [start, end)."""
    blocks = {}
    for r in records:
        if start <= r["t_s"] < end and r["ok"]:
            blocks.setdefault(int((r["t_s"] - start) // STEADY_BLOCK_S), []).append(r["latency_ms"])
    return [float(np.percentile(latencies, 99)) for _, latencies in sorted(blocks.items())]


def switches_once_per_reload(records):
    """Every model process (worker id SUPERVISOR/N) answered with one version, and each worker's
    processes, in the order they started, served each version once, in the order asked."""
    versions = {}
    for record in records:
        if record["ok"]:
            versions.setdefault(record["worker"], set()).add(record["version"])
    if any(len(v) != 1 for v in versions.values()):
        return False
    by_worker = {}
    for process in sorted(versions, key=lambda p: int(p.rsplit("/", 1)[1])):
        by_worker.setdefault(process.rsplit("/", 1)[0], []).append(next(iter(versions[process])))
    return all(sequence == [str(n) for n in range(1, len(sequence) + 1)]
               for sequence in by_worker.values())


def slow_by_tenth(records, started, ended, threshold_ms):
    """How many requests slower than threshold_ms were sent in each tenth of [started, ended]."""
    tenths = [0] * 10
    for record in records:
        if record["latency_ms"] > threshold_ms and started <= record["t_s"] <= ended:
            tenths[min(9, int(10 * (record["t_s"] - started) / (ended - started)))] += 1
    return tenths


def model_processes(root_pid):
    return [process for process, role in service_processes(root_pid) if role == "model"]


def settled(before, timeout_s=60):
    """time.perf_counter() once one of the model processes `before` a reload has ended (the
    replaced one), or after timeout_s. Polls those few processes only: a scan of the whole
    service's tree this often would take CPU from the requests being measured."""
    deadline = time.perf_counter() + timeout_s
    while all(process.is_running() for process in before) and time.perf_counter() < deadline:
        time.sleep(0.05)
    return time.perf_counter()


def reload(version, env, origin):
    """`reload` to ResNet50 version `version`: (start, end, both s since origin, exit status,
    log)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "run_keras_server.py", "reload", "--model", "resnet50",
                           "--weights", "none", "--version", str(version)],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    return started - origin, time.perf_counter() - origin, done.returncode, done.stderr[-2000:]


def measure_reloads(args, workdir, image):
    from serving.processes import start_private_redis, stop_processes

    redis_process, redis_url = start_private_redis(workdir)  # one `reload` can reach too
    # Every version converts afresh, as one never served before does: the user's cache may hold
    # versions 2, 3, ... of an earlier run.
    cache = tempfile.mkdtemp(prefix="reload-bench-openvino-")
    overrides = {"REDIS_URL": redis_url, "OPENVINO_CACHE_DIR": cache,
                 **({"RUNTIME": args.runtime} if args.runtime else {})}
    try:
        with running_service(overrides, workdir) as (url, heartbeat, pid):
            memory = ModelMemory(pid)
            batch_size = int(heartbeat["batch_size"])
            full = capacity(url, 2 * batch_size, args.capacity_seconds, image)
            loop = OpenLoop(url, full / 2, image)
            print(f"capacity {full:.1f} img/s at batch size {batch_size}; open loop at "
                  f"{full / 2:.1f} requests/s", flush=True)
            time.sleep(2)  # (unmeasured: the loop's threads and connections start)
            steady_from, memory.phase = time.perf_counter() - loop.origin, "steady"
            time.sleep(args.steady_seconds)
            steady_to, memory.phase = time.perf_counter() - loop.origin, "reloads"
            env = {**os.environ, "REDIS_URL": redis_url}
            windows = []
            for number in range(args.reloads):
                before = model_processes(pid)
                started, returned, status, log = reload(number + 2, env, loop.origin)
                # A refused reload replaces no process.
                ended = max(returned, settled(before) - loop.origin) if status == 0 else returned
                windows.append({"version": number + 2, "started": started, "ended": ended,
                                "returned": returned, "status": status,
                                "log": log if status else ""})
                print(f"reload to version {number + 2}: exit {status} after "
                      f"{returned - started:.1f} s, the old process gone after "
                      f"{ended - started:.1f} s", flush=True)
                time.sleep(args.pause_seconds)
            records = loop.finish()
            peaks = memory.finish()
    finally:
        stop_processes([redis_process])
        shutil.rmtree(cache, ignore_errors=True)
    raw = Path(workdir) / "requests.json"
    raw.write_text(json.dumps({"records": records, "steady": [steady_from, steady_to],
                               "reloads": windows}))
    measured = [r for r in records if r["t_s"] >= steady_from]
    steady = [r["latency_ms"] / 1000 for r in measured if r["t_s"] < steady_to and r["ok"]]
    result = {"runtime": heartbeat.get("runtime"), "batch_size": batch_size,
              "capacity_img_per_s": full, "rate_per_s": full / 2,
              "forward_s_at_start": float(heartbeat.get("batch_s") or 0),
              "steady": percentiles(steady),
              "steady_p99_ms_by_block": block_p99s(measured, steady_from, steady_to),
              "model_resident_mb": {"steady": peaks.get("steady"), "reloads": peaks.get("reloads")},
              "failed": sum(not r["ok"] for r in measured),
              "failures": sorted({r["error"] for r in measured if not r["ok"]})[:10],
              "switches_once_per_reload": switches_once_per_reload(measured),
              "reloads": []}
    for window in windows:
        inside = [r for r in measured if window["started"] <= r["t_s"] <= window["ended"] + 1]
        figures = percentiles([r["latency_ms"] / 1000 for r in inside if r["ok"]]) \
            if inside else {}
        figures.update(version=window["version"], exit_status=window["status"],
                       seconds=window["returned"] - window["started"],
                       old_gone_s=window["ended"] - window["started"], log=window["log"],
                       failed=sum(not r["ok"] for r in inside),
                       slow_by_tenth=slow_by_tenth(inside, window["started"], window["ended"] + 1,
                                                   result["steady"]["p99_ms"]))
        if inside:
            figures["p99_ratio"] = figures["p99_ms"] / result["steady"]["p99_ms"]
            figures["p999_ratio"] = figures["p999_ms"] / result["steady"]["p999_ms"]
        result["reloads"].append(figures)
    return result


def print_table(result):
    steady = result["steady"]
    print(f"\n{result['runtime']}, {result['rate_per_s']:.1f} requests/s: steady p50 "
          f"{steady['p50_ms']:.0f} ms, p99 {steady['p99_ms']:.0f} ms, p999 "
          f"{steady['p999_ms']:.0f} ms ({steady['requests']} requests); failed "
          f"{result['failed']}; each worker switched once per reload: "
          f"{result['switches_once_per_reload']}")
    blocks = result["steady_p99_ms_by_block"]
    print(f"steady p99 by {STEADY_BLOCK_S} s block: {' '.join(f'{b:.0f}' for b in blocks)} ms")
    if max(blocks) > UNSTEADY_FACTOR * float(np.median(blocks)):
        print(f"the steady phase had an episode (a block's p99 over {UNSTEADY_FACTOR} x the "
              "median block's): the ratios below mean little; run again")
    print("reload  exit  seconds  requests  p99 ms  p999 ms  p99/steady  p999/steady  "
          "slower than steady p99, by tenth of the reload")
    for r in result["reloads"]:
        print(f"{r['version']:6d}  {r['exit_status']:4d}  {r['seconds']:7.1f}  "
              f"{r.get('requests', 0):8d}  {r.get('p99_ms', 0):6.0f}  {r.get('p999_ms', 0):7.0f}"
              f"  {r.get('p99_ratio', 0):10.2f}  {r.get('p999_ratio', 0):11.2f}  "
              f"{' '.join(map(str, r['slow_by_tenth']))}")
    memory = result["model_resident_mb"]
    print(f"model processes' resident memory, peak: {memory['steady']} MB steady, "
          f"{memory['reloads']} MB during the reloads")
    worst = max(max(r.get("p99_ratio", 0), r.get("p999_ratio", 0)) for r in result["reloads"])
    print(f"worst ratio {worst:.2f} (target: at most {TARGET_RATIO})")
    # A steady phase whose p99 comes from a slower part of it flatters every ratio: say by how much.
    typical = float(np.median(blocks))
    if steady["p99_ms"] > FLATTERED_FACTOR * typical:
        ratios = " ".join(f"{r.get('p99_ms', 0) / typical:.2f}" for r in result["reloads"])
        print(f"the steady phase's p99 is {steady['p99_ms'] / typical:.2f} x its median block's "
              f"({typical:.0f} ms): against that, the reloads' p99 are {ratios} x")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reloads", type=int, default=10)
    parser.add_argument("--steady-seconds", type=float, default=60)
    parser.add_argument("--pause-seconds", type=float, default=5,
                        help="steady time after each reload (5)")
    parser.add_argument("--capacity-seconds", type=float, default=15)
    parser.add_argument("--runtime", help="RUNTIME of the service (its default: auto)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / (
        f"{time.strftime('%Y-%m-%d')}-{os.uname().nodename}-reload.json")))
    args = parser.parse_args(argv)
    workdir = tempfile.mkdtemp(prefix="reload-bench-")
    record = {**machine_info(), "command": " ".join(sys.argv), "target_ratio": TARGET_RATIO,
              "load": "open loop at half of the capacity measured first"}
    record["run"] = measure_reloads(args, workdir, test_image())
    print_table(record["run"])
    write_json(args.out, record)
    print(f"service logs and every request's record: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
