"""Service-efficiency benchmark: how near the whole service comes to the bare model, on one machine.

    python bench/benchmark.py                                   # 3 rounds, the service's defaults
    python bench/benchmark.py --batch-size 16 --batch-timeout-ms 5 --rounds 5
    python bench/benchmark.py --sweep --concurrency 64 --p99-target-ms 8000

Each round measures, for each runtime (Keras and OpenVINO), one at a time so that they never share
the CPU:
  (a) the bare model: ResNet50 (random weights, fixed seed) in a process of its own, loaded as the
      worker loads it, forward passes on batches of 1 to 32 images of uint8 pixels, through the
      same preprocessing as the service's (inside the runtime), the sizes timed in interleaved
      slices: images/s, and CPU per image, for each size, and batch-1 latency;
  (b) the whole service (`python run_keras_server.py`, RUNTIME set) over HTTP at saturation: wrk
      (bench/wrk_predict.lua) keeps 4 batches of clients sending (64 at least; --concurrency):
      images/s, and the CPU per image of each tier in milliseconds (web tier, Redis, the model
      process beyond its bare pass, the load generator), and the connections each gunicorn
      process held;
  (c) the service at concurrency 1: median latency, its requests alternating with (a)'s batch-1
      passes so that both see the machine at the same moments;
  (d) the service under an open loop at twice the bare model's best rate (--overload-factor):
      images/s answered in the load's first warm-up + phase seconds, mostly while the queue
      fills (until it is full the web tier takes and decodes every request);
  (e) the same load kept on to --overload-seconds: images/s answered after (d), once the queue is
      full and the excess is refused at admission.
During (b), (d) and (e) it also records where the CPU went: cores used by the service's model,
web and Redis processes, by everything else (mostly the load generator), and left idle; for (b),
also as milliseconds of CPU per image answered.
Machine speed drifts by 10-30% from minute to minute, so rounds alternate (a) with (b)-(e) and the
figures are medians over rounds; the ratios to (a) are taken within each round first.

--model-cores N pins the model, bare and served, to N cores (MODEL_THREADS=N) and everything else
(the web tier, Redis, the load generator, this script) to the other cores: the ratios then measure
what serving costs the model on its own cores, without the web tier's share of them.

--sweep instead starts a fresh service for each BATCH_SIZE x BATCH_TIMEOUT_MS cell, loads it at one
concurrency, and recommends the fastest cell whose p99 latency is under --p99-target-ms.
"""
import argparse
import importlib.metadata
import json
import multiprocessing
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import psutil
import requests

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from stress_test import percentile  # noqa: E402

MODEL, MODEL_SEED = "resnet50", 1234
BATCH_SIZES = (1, 2, 4, 8, 16, 32)
KNOBS = ("BATCH_SIZE", "BATCH_TIMEOUT_MS", "PRECISION", "REQUEST_TIMEOUT_S", "MAX_QUEUE_LENGTH",
         "WEB_WORKERS", "WEB_CONNECTIONS", "MODEL_THREADS")
READY_TIMEOUT_S = 300  # TensorFlow import, model build and warm-up on two busy cores
# (b): four batches' worth of clients, and at least this many: with fewer, a batch's clients are
# still in the web tier when the next batch could start, and the model waits on the load
# generator rather than the other way round.
SATURATION_CLIENTS = 64
SATURATION_BATCHES = 4
WRK_SCRIPT = ROOT / "bench" / "wrk_predict.lua"
SAMPLE_IMAGE = ROOT / "data" / "sample.jpg"
PAIR_PAUSE_S = 0.02  # (c): between a request and a bare pass


# --- (a) The bare model, in a process of its own ------------------------------------------

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


# --- (b), (c) The service and its load ----------------------------------------------------

def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def running_service(overrides, workdir, model_cores=None):
    """`python run_keras_server.py` (private Redis) on a free port; yields (url, heartbeat, pid).
    With model_cores, it starts there, and once it is ready all but its model processes move to
    this script's cores. (Not the other way round: OpenVINO pins its threads to the cores its
    process had when it loaded the model.)"""
    port = free_port()
    env = {name: value for name, value in os.environ.items() if name != "REDIS_URL"}
    env.update(PORT=str(port), HOST="127.0.0.1", MODEL=MODEL, MODEL_WEIGHTS="none",
               MODEL_SEED=str(MODEL_SEED), PYTHONUNBUFFERED="1", **overrides)
    log_path = Path(workdir) / f"service-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "run_keras_server.py"], cwd=ROOT, env=env, stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=(lambda: os.sched_setaffinity(0, model_cores)) if model_cores else None)
    url = f"http://127.0.0.1:{port}"
    try:
        heartbeat = wait_ready(url, process, log_path)
        if model_cores:
            move_all_but_the_model(process.pid, os.sched_getaffinity(0))
        yield url, heartbeat, process.pid
    finally:
        process.terminate()  # run_keras_server.py stops its worker, web tier and Redis
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def web_connections(root_pid, url):
    """{pid: client connections held} of each gunicorn worker of the service at `url`."""
    port = int(url.rsplit(":", 1)[1])
    held = {}
    for process, role in service_processes(root_pid):
        try:
            if role == "web" and process.parent() and process_role(
                    process.parent().name(), process.parent().cmdline()) == "web":
                held[process.pid] = sum(1 for c in process.net_connections("tcp")
                                        if c.status == psutil.CONN_ESTABLISHED
                                        and c.laddr.port == port)
        except psutil.Error:  # it ended meanwhile
            continue
    return held


def move_all_but_the_model(root_pid, cores):
    """Every thread of the service's processes but the model's onto `cores` (threads they start
    later inherit it)."""
    from serving.rollout.priority import for_every_thread

    for process, role in service_processes(root_pid):
        if role != "model":
            for_every_thread(lambda thread_id: os.sched_setaffinity(thread_id, cores), process.pid)


def wait_ready(url, process, log_path):
    """Poll /readyz until a warm worker answers; returns its heartbeat."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the service exited:\n{log_path.read_text()[-3000:]}")
        try:
            response = requests.get(f"{url}/readyz", timeout=2)
            if response.status_code == 200:
                return response.json()["workers"][0]
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the service was not ready within {READY_TIMEOUT_S} s; see {log_path}")


def run_load(url, concurrency, seconds, workdir, plot="", rate=None, load_pids=None):
    """A closed loop (or an open one at `rate` requests/s) from stress_test.py in its own light
    process; returns its JSON report. Its pid is in load_pids while it runs (see run_wrk)."""
    report = Path(workdir) / f"load-{time.time_ns()}.json"
    loop = ["--rate", f"{rate:.2f}"] if rate else ["--concurrency", str(concurrency)]
    command = [sys.executable, "stress_test.py", "--url", f"{url}/predict", *loop,
               "--duration", str(seconds), "--timeout", "120",
               "--report", str(report), "--plot", plot, "--allow-failures"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL)
    wait_for_load(process, seconds + 300, load_pids)
    return json.loads(report.read_text())


def wait_for_load(process, timeout_s, load_pids):
    """Wait for a load generator's process (listed in load_pids meanwhile); raise if it fails."""
    if load_pids is not None:
        load_pids.append(process.pid)
    try:
        if process.wait(timeout_s):
            raise RuntimeError(f"{process.args[0]} exited with status {process.returncode}")
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    finally:
        if load_pids is not None:
            load_pids.remove(process.pid)


def run_wrk(url, connections, seconds, workdir, load_pids=None):
    """A closed loop of `connections` clients from wrk (bench/wrk_predict.lua: the sample image as
    the tutorial's form), for `seconds`; returns a load report as run_load's, each answer's t_s
    being when it came (latency_ms 0: wrk reports percentiles instead). wrk's pid is added to
    load_pids while it runs, for cpu_split."""
    out = Path(workdir) / f"wrk-{time.time_ns()}.txt"
    origin = time.monotonic()  # the clock wrk_predict.lua stamps the answers with
    process = subprocess.Popen(
        ["wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds:g}s", "--timeout", "120s",
         "-s", str(WRK_SCRIPT), f"{url}/predict", "--", str(SAMPLE_IMAGE), str(out)],
        stdout=subprocess.DEVNULL)
    wait_for_load(process, seconds + 180, load_pids)
    lines = out.read_text().splitlines()
    records = [{"t_s": float(at) - origin, "latency_ms": 0.0, "status": int(status),
                "ok": status == "200", "batch_size": int(size) or None,
                "inference_ms": float(inference) or None}
               for at, status, size, inference in (line.split() for line in lines
                                                   if not line.startswith("#"))]
    latency = next(line.split()[2:] for line in lines if line.startswith("# latency"))
    sizes = [r["batch_size"] for r in records if r["ok"] and r["batch_size"]]
    return {"requests": records, "latency_ms": dict(zip(("p50", "p90", "p99", "max"),
                                                        map(float, latency))),
            "summary": {"failed": sum(not r["ok"] for r in records),
                        "mean_batch_size": statistics.mean(sizes) if sizes else None}}


def run_paired_single(url, bare_model, seconds):
    """(c): one client whose requests alternate with the bare model's batch-1 passes, a pause
    between each (another process's threads may still spin a moment after its pass). Minute to
    minute the machine's speed drifts by more than the overhead measured here; paired, both sides
    see the same drift. Returns a load report with the bare passes' times in it."""
    from stress_test import DEFAULT_IMAGE, load_images, send_one, summarize

    image = load_images(DEFAULT_IMAGE)[0]
    origin = time.perf_counter()
    records = []
    while time.perf_counter() - origin < seconds:
        record = send_one(f"{url}/predict", image, 120, origin)
        time.sleep(PAIR_PAUSE_S)
        record["bare_batch1_ms"] = bare_model.one_pass()
        time.sleep(PAIR_PAUSE_S)
        records.append(record)
    return {"summary": summarize(records), "requests": records}


# --- Where the CPU went during a load ------------------------------------------------------

CPU_ROLES = ("model", "web", "redis", "load")  # "load": the load generator


def process_role(name, cmdline):
    """The service's part a process plays, from its name and command line (None: another)."""
    if name.startswith("redis-server"):
        return "redis"
    args = cmdline[1:] if cmdline and Path(cmdline[0]).name.startswith("python") else cmdline
    program, rest = (args[1:2], args[2:]) if args[:1] == ["-m"] else (args[:1], args[1:])
    program = Path(program[0]).name if program else ""
    if program == "gunicorn":
        return "web"
    if program == "run_keras_server.py" and rest[:1] in (["model"], ["model-process"]):
        return "model"
    return None


def service_processes(root_pid):
    """(process, role) of the service started as root_pid and of every process under it."""
    try:
        root = psutil.Process(root_pid)
        family = [root, *root.children(recursive=True)]
    except psutil.Error:  # the service has ended
        return
    for process in family:
        try:
            yield process, process_role(process.name(), process.cmdline())
        except psutil.Error:  # it ended meanwhile
            continue


def cpu_snapshot(root_pid, load_pids=()):
    """The machine's busy, idle and stolen CPU seconds so far, and the CPU seconds of each process
    of the service started as root_pid and of the load generator's (load_pids): their role and
    user + system time, by pid. (Stolen: time a virtual machine's host gave to others.)"""
    machine = psutil.cpu_times()
    processes = {}
    family = [*service_processes(root_pid), *load_processes(load_pids)]
    for process, role in family:
        try:
            times = process.cpu_times()
        except psutil.Error:  # it ended meanwhile
            continue
        processes[process.pid] = (role, times.user + times.system)
    idle = machine.idle + getattr(machine, "iowait", 0.0)
    stolen = getattr(machine, "steal", 0.0)
    busy = sum(machine) - idle - getattr(machine, "guest", 0.0) - getattr(
        machine, "guest_nice", 0.0) - stolen
    return {"at": time.monotonic(), "busy": busy, "idle": idle, "stolen": stolen,
            "processes": processes}


def load_processes(pids):
    """(process, "load") of the load generator's processes still running."""
    for pid in list(pids):
        try:
            yield psutil.Process(pid), "load"
        except psutil.Error:
            continue


def cores_between(first, last):
    """Cores (CPU seconds per second) used between two snapshots by the service's model, web and
    Redis processes, by everything else ("other": the load generator, this script, the launcher,
    the kernel's own work) and left idle. A process that started in between counts from zero."""
    seconds = last["at"] - first["at"]
    used = dict.fromkeys(CPU_ROLES, 0.0)
    for pid, (role, cpu_s) in last["processes"].items():
        if role:
            used[role] += cpu_s - first["processes"].get(pid, (role, 0.0))[1]
    busy = last["busy"] - first["busy"]
    cores = {role: used[role] / seconds for role in CPU_ROLES}
    cores["other"] = max(0.0, busy - sum(used.values())) / seconds
    cores["idle"] = (last["idle"] - first["idle"]) / seconds
    cores["stolen"] = (last["stolen"] - first["stolen"]) / seconds
    return cores


@contextmanager
def cpu_split(root_pid, skip_s, until_s=None, load_pids=()):
    """Yields a dict that, when the block ends, holds cores_between() from skip_s into the block
    (the load's warm-up left out) to until_s or its end; empty if the block ended sooner or the
    span is empty (until_s == skip_s, e.g. --overload-seconds no longer than (d)). load_pids: the
    load generator's processes, a list that the load fills as it starts."""
    split, snapshots = {}, {}
    timers = [threading.Timer(at, lambda at=at: snapshots.update(
        {at: cpu_snapshot(root_pid, load_pids)})) for at in (skip_s, until_s) if at is not None]
    for timer in timers:
        timer.start()
    try:
        yield split
    finally:
        for timer in timers:
            timer.cancel()
            timer.join()
    first = snapshots.get(skip_s)
    last = cpu_snapshot(root_pid, load_pids) if first and until_s is None else snapshots.get(
        until_s)
    if first and last and last["at"] > first["at"]:
        split.update(cores_between(first, last))


# --- Figures (pure functions) -------------------------------------------------------------

def completion_bursts(records):
    """(time, images) of each answered batch, found from the answers' completion times.

    All answers of one batch reach their clients within a few ms and report the same pass
    (X-Inference-Ms, X-Batch-Size); a gap over half of that pass, or another pass, starts a new
    batch. (A pass may include a wait for another lane's pass on the same cores: then batches end
    every half pass or so, and only the pass tells them apart.)
    """
    done = sorted((r["t_s"] + r["latency_ms"] / 1000, r["inference_ms"] or 0.0, r["batch_size"])
                  for r in records if r["ok"])
    bursts = []  # [first completion, answers, last completion, pass]
    for end, inference_ms, size in done:
        if bursts and bursts[-1][3] == (inference_ms, size) and \
                end - bursts[-1][2] <= inference_ms / 2000:
            bursts[-1][1:3] = [bursts[-1][1] + 1, end]
        else:
            bursts.append([end, 1, end, (inference_ms, size)])
    return [(first, count) for first, count, _, _ in bursts]


def steady_throughput(records, from_s, to_s):
    """Images/s from the first to the last batch answered between from_s and to_s (None: < 2).

    Counting answers in a fixed window would be off by up to a whole batch, and 32 images take
    seconds on a CPU; measuring from one batch's end to another's is exact.
    """
    bursts = [(t, n) for t, n in completion_bursts(records) if from_s <= t <= to_s]
    if len(bursts) < 2:
        return None
    return sum(n for _, n in bursts[1:]) / (bursts[-1][0] - bursts[0][0])


def latencies_after(report, warmup_s):
    return [r["latency_ms"] for r in report["requests"] if r["ok"] and r["t_s"] >= warmup_s]


def round_figures(bare, saturated, single, overloaded, warmup_s, duration_s, overload_s=None,
                  saturated_cpu=None, batch_size=None):
    """One round's figures of one runtime from the bare timings and the three load reports; the
    overload's from warmup_s to duration_s, and (queue full) from duration_s to overload_s; and
    from the cores used at saturation, the CPU per image of each part (see cpu_per_image)."""
    best = max(bare, key=lambda n: bare[n]["img_per_s"])
    service = steady_throughput(saturated["requests"], warmup_s, duration_s)
    answered = [r for r in overloaded["requests"] if r["ok"]]
    under_overload = steady_throughput(answered, warmup_s, duration_s)
    full = steady_throughput(answered, duration_s, overload_s) if overload_s else None
    refusals = [r["t_s"] for r in overloaded["requests"] if r["status"] in (429, 503)]
    c1 = latencies_after(single, warmup_s)
    c1_median = statistics.median(c1) if c1 else None
    paired = [r["bare_batch1_ms"] for r in single["requests"] if r["t_s"] >= warmup_s]
    bare1 = statistics.median(paired) if paired else None
    return {
        "bare": bare, "bare_best_batch_size": best, "bare_best_img_per_s": bare[best]["img_per_s"],
        "bare_batch1_ms": bare1, "service_img_per_s": service,
        "service_mean_batch_size": saturated["summary"]["mean_batch_size"],
        "service_c1_median_ms": c1_median,
        "service_overload_img_per_s": under_overload, "service_full_img_per_s": full,
        "overload_first_refusal_s": min(refusals, default=None),
        "overload_refused": sum(r["status"] in (429, 503) for r in overloaded["requests"]),
        "overload_other_failures": sum(not r["ok"] and r["status"] not in (429, 503)
                                       for r in overloaded["requests"]),
        "failed": saturated["summary"]["failed"] + single["summary"]["failed"],
        "ratio": service / bare[best]["img_per_s"] if service else None,
        "overload_ratio": under_overload / bare[best]["img_per_s"] if under_overload else None,
        "full_ratio": full / bare[best]["img_per_s"] if full else None,
        "latency_overhead_ms": c1_median - bare1 if c1 else None,
        "service_p99_ms": saturated.get("latency_ms", {}).get("p99"),
        "ms_per_image": cpu_per_image(saturated_cpu or {}, service, bare, batch_size),
    }


def cpu_per_image(cores, img_per_s, bare, batch_size):
    """Milliseconds of CPU per image answered, by part (cores_between's), and the model process's
    beyond its bare forward passes at the service's batch size (bare's CPU per image there), and
    `outside_forward`: what the web tier, Redis and that beyond cost together. {} without
    figures."""
    if not cores or not img_per_s:
        return {}
    ms = {part: used * 1000 / img_per_s for part, used in cores.items()
          if part not in ("idle", "stolen")}
    size = min(bare, key=lambda n: abs(n - (batch_size or n)))
    ms["bare_model"] = bare[size]["cores"] * 1000 / bare[size]["img_per_s"]
    ms["model_beyond_bare"] = ms["model"] - ms["bare_model"]
    ms["outside_forward"] = ms["web"] + ms["redis"] + ms["model_beyond_bare"]
    return ms


def median_of(rounds, name):
    values = [r.get(name) for r in rounds if r.get(name) is not None]
    return statistics.median(values) if values else None


def summarize_rounds(rounds):
    """Medians over rounds of every figure; bare images/s per batch size too."""
    names = ("bare_best_img_per_s", "bare_batch1_ms", "service_img_per_s",
             "service_mean_batch_size", "service_c1_median_ms", "service_overload_img_per_s",
             "ratio", "overload_ratio", "latency_overhead_ms", "service_full_img_per_s",
             "full_ratio", "overload_first_refusal_s")
    summary = {name: median_of(rounds, name) for name in names}
    sizes = rounds[0]["bare"].keys()
    summary["bare_img_per_s"] = {n: statistics.median(r["bare"][n]["img_per_s"] for r in rounds)
                                 for n in sizes}
    summary["bare_cores"] = {n: median_of([r["bare"][n] for r in rounds], "cores") for n in sizes}
    summary["failed"] = sum(r["failed"] for r in rounds)
    summary["service_p99_ms"] = median_of(rounds, "service_p99_ms")
    parts = [r["ms_per_image"] for r in rounds if r.get("ms_per_image")]
    summary["ms_per_image"] = {part: statistics.median(p[part] for p in parts)
                               for part in parts[0]} if parts else {}
    summary["web_connections"] = [r.get("web_connections") for r in rounds]
    summary["overload_other_failures"] = sum(r["overload_other_failures"] for r in rounds)
    for phase in ("cpu_saturated", "cpu_overloaded", "cpu_full"):
        splits = [r[phase] for r in rounds if r.get(phase)]
        summary[phase] = {part: statistics.median(split[part] for split in splits)
                          for part in splits[0]} if splits else {}
    return summary


def recommend(cells, p99_target_ms):
    """The cell with the highest throughput whose p99 is under the target (None if none is)."""
    fits = [c for c in cells if c["img_per_s"] and c["p99_ms"] is not None
            and (p99_target_ms is None or c["p99_ms"] < p99_target_ms)]
    return max(fits, key=lambda c: c["img_per_s"], default=None)


def cell_figures(batch_size, timeout_ms, report, warmup_s, duration_s):
    """One sweep cell's figures from its load report."""
    latencies = latencies_after(report, warmup_s)
    return {"batch_size": batch_size, "batch_timeout_ms": timeout_ms,
            "img_per_s": steady_throughput(report["requests"], warmup_s, duration_s),
            "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
            "mean_batch_size": report["summary"]["mean_batch_size"],
            "failed": report["summary"]["failed"]}


# --- Runs -----------------------------------------------------------------------------------

def run_rounds(args, workdir):
    """Alternate bare-model and service phases of each runtime; returns, by runtime, the rounds
    and the service's settings."""
    print("starting the bare models and the services (a minute or two)...", flush=True)
    with ExitStack() as stack:
        setups = {}
        for runtime in args.runtimes:
            bare_model = BareModel(runtime, args.model_cores)
            stack.callback(bare_model.stop)
            url, heartbeat, pid = stack.enter_context(running_service(
                {"RUNTIME": runtime}, workdir, args.model_cores))
            if heartbeat.get("runtime") != runtime:
                raise RuntimeError(f"the service runs on {heartbeat.get('runtime')}, not {runtime}")
            used = settings_used(heartbeat)
            used["concurrency"] = args.concurrency or max(
                SATURATION_CLIENTS, SATURATION_BATCHES * used["BATCH_SIZE"])
            setups[runtime] = bare_model, url, pid, used
        duration = args.warmup_seconds + args.phase_seconds
        rounds = {runtime: [] for runtime in args.runtimes}
        for number in range(1, args.rounds + 1):
            for runtime, (bare_model, url, pid, used) in setups.items():
                bare = bare_model.measure(args.phase_seconds / len(BATCH_SIZES))
                # The last overload phase is drawn (after its load ends: it costs no figure).
                plot = args.plot if number == args.rounds and runtime == args.runtimes[-1] else ""
                # The split ends at `duration` into the block, while the load still runs (the load
                # generator starts its clock later), not with the last answers after it stops.
                load_pids, connections = [], {}
                with cpu_split(pid, args.warmup_seconds, duration, load_pids) as saturated_cpu:
                    counting = threading.Timer(duration / 2, lambda: connections.update(
                        web_connections(pid, url)))
                    counting.start()
                    saturated = run_wrk(url, used["concurrency"], duration, workdir, load_pids)
                    counting.join()
                single = run_paired_single(url, bare_model, duration)
                best = max(entry["img_per_s"] for entry in bare.values())
                overloaded, overloaded_cpu, full_cpu = {"requests": []}, {}, {}
                overload_s = max(duration, args.overload_seconds)
                if args.overload_factor:
                    with cpu_split(pid, args.warmup_seconds, duration,
                                   load_pids) as overloaded_cpu, \
                            cpu_split(pid, duration, overload_s, load_pids) as full_cpu:
                        overloaded = run_load(url, None, overload_s, workdir, plot,
                                              rate=args.overload_factor * best,
                                              load_pids=load_pids)
                figures = round_figures(bare, saturated, single, overloaded, args.warmup_seconds,
                                        duration, overload_s, saturated_cpu, used["BATCH_SIZE"])
                rounds[runtime].append({**figures, "cpu_saturated": saturated_cpu,
                                        "cpu_overloaded": overloaded_cpu, "cpu_full": full_cpu,
                                        "web_connections": connections})
                print_round(number, runtime, rounds[runtime][-1])
    return rounds, {runtime: used for runtime, (_, _, _, used) in setups.items()}


def run_sweep(args, workdir):
    """A fresh service per BATCH_SIZE x BATCH_TIMEOUT_MS cell, each loaded at one concurrency."""
    concurrency = args.concurrency or 2 * max(args.sweep_batch_sizes)
    duration = args.warmup_seconds + args.phase_seconds
    print(f"sweep at concurrency {concurrency}, {args.phase_seconds:g} s per cell\n"
          f"{'BATCH_SIZE':>10}  {'TIMEOUT_MS':>10}  {'img/s':>6}  {'p50 ms':>7}  {'p99 ms':>7}")
    cells = []
    for batch_size in args.sweep_batch_sizes:
        for timeout_ms in args.sweep_timeouts_ms:
            overrides = {"BATCH_SIZE": str(batch_size), "BATCH_TIMEOUT_MS": str(timeout_ms)}
            with running_service(overrides, workdir, args.model_cores) as (url, _, _):
                report = run_load(url, concurrency, duration, workdir)
            cells.append(cell_figures(batch_size, timeout_ms, report, args.warmup_seconds,
                                      duration))
            print(cell_line(cells[-1]), flush=True)
    return cells, concurrency


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


def settings_used(heartbeat):
    """The service's knobs as it read them, and what its worker reports about itself."""
    import settings

    knobs = {name: getattr(settings, name) for name in KNOBS if hasattr(settings, name)}
    knobs.update({name: heartbeat.get(name)
                  for name in ("model", "weights", "device", "runtime", "precision")})
    knobs["BATCH_SIZE"] = int(heartbeat["batch_size"])
    return knobs


VECTOR_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx_vnni", "avx512_vnni", "avx512_bf16",
                "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16")


def machine_info():
    """Where the figures were made: the CPU's name, family, model and vector units, and versions.
    (Machines named alike differ: one 2-core "AMD EPYC" ran ResNet50 4.5 times faster than another.)"""
    fields = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                name, _, value = line.partition(":")
                fields.setdefault(name.strip(), value.strip())  # the first processor's
    except OSError:
        pass
    flags = set(fields.get("flags", "").split())
    return {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(),
            "cpu": fields.get("model name", platform.processor()),
            "cpu_family": fields.get("cpu family"), "cpu_model": fields.get("model"),
            "vector_flags": [flag for flag in VECTOR_FLAGS if flag in flags],
            "cores": os.cpu_count(), "gpu": gpu_name(), "python": platform.python_version(),
            "tensorflow": package_version("tensorflow", "tensorflow-cpu"),
            "keras": package_version("keras"), "keras_backend": os.environ.get(
                "KERAS_BACKEND", "tensorflow"), "openvino": package_version("openvino"),
            "command": " ".join(sys.argv)}


def gpu_name():
    """The first NVIDIA GPU's name and driver, or None."""
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,"
                               "noheader"], capture_output=True, text=True, timeout=30,
                              check=True).stdout.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def package_version(*names):
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


# --- Output ---------------------------------------------------------------------------------

def fmt(value, spec=".1f"):
    return "n/a" if value is None else format(value, spec)


def print_round(number, runtime, r):
    print(f"round {number}, {runtime}: bare best {fmt(r['bare_best_img_per_s'])} img/s "
          f"(batch {r['bare_best_batch_size']}), batch 1 {fmt(r['bare_batch1_ms'])} ms | service "
          f"{fmt(r['service_img_per_s'])} img/s (mean batch {fmt(r['service_mean_batch_size'])}), "
          f"2x overload {fmt(r['service_overload_img_per_s'])} img/s, queue full "
          f"{fmt(r['service_full_img_per_s'])} img/s, c=1 {fmt(r['service_c1_median_ms'])} ms | "
          f"ratios {fmt(r['ratio'], '.3f')}, {fmt(r['overload_ratio'], '.3f')} and "
          f"{fmt(r['full_ratio'], '.3f')}, +{fmt(r['latency_overhead_ms'])} ms, "
          f"{r['failed']} failed | CPU per image outside the forward pass "
          f"{fmt(r['ms_per_image'].get('outside_forward'), '.2f')} ms", flush=True)


def print_summary(summaries, rounds, service_settings, args, machine):
    print(f"\nResNet50 (random weights, seed {MODEL_SEED}); {args.rounds} rounds of "
          f"{args.phase_seconds:g} s phases (+{args.warmup_seconds:g} s warm-up); medians over "
          f"rounds\nmachine: {machine['cpu']} (family {machine['cpu_family']}, model "
          f"{machine['cpu_model']}; {' '.join(machine['vector_flags'])}), {machine['cores']} cores"
          f"; keras {machine['keras']} ({machine['keras_backend']}), tensorflow "
          f"{machine['tensorflow']}, openvino {machine['openvino']}")
    if machine["model_cores"]:
        print(f"pinned: the model (bare and served) on cores {machine['model_cores']}, "
              "everything else on the others")
    for runtime in rounds:
        summary, used = summaries[runtime], service_settings[runtime]
        knobs = " ".join(f"{name}={used[name]}" for name in KNOBS if name in used)
        print(f"\n== RUNTIME={runtime} on {used['device']}; service: {knobs}")
        print("bare model   batch  img/s  cores")
        for size, img_per_s in summary["bare_img_per_s"].items():
            cores = fmt(summary["bare_cores"][size], ".2f")
            print(f"             {size:>5}  {img_per_s:6.1f}  {cores:>5}")
        per_round = " ".join(fmt(r["ratio"], ".3f") for r in rounds[runtime])
        print(f"(a) bare model, best                 {fmt(summary['bare_best_img_per_s'])} img/s\n"
              f"(a) bare model, batch-1 latency      {fmt(summary['bare_batch1_ms'])} ms (median "
              f"of the passes paired with (c))\n"
              f"(b) service at concurrency {used['concurrency']:<9} "
              f"{fmt(summary['service_img_per_s'])} img/s (mean batch "
              f"{fmt(summary['service_mean_batch_size'])})\n"
              f"(c) service at concurrency 1, median {fmt(summary['service_c1_median_ms'])} ms\n"
              f"(d) service, open loop at 2x (a)     {fmt(summary['service_overload_img_per_s'])} "
              f"img/s answered, the first {args.warmup_seconds + args.phase_seconds:g} s\n"
              f"(e) the same load, queue full        {fmt(summary['service_full_img_per_s'])} "
              f"img/s answered after that (first refusal at "
              f"{fmt(summary['overload_first_refusal_s'])} s)\n"
              f"(b) / best (a)                       {fmt(summary['ratio'], '.3f')} "
              f"(rounds: {per_round})\n"
              f"(d) / best (a)                       {fmt(summary['overload_ratio'], '.3f')}\n"
              f"(e) / best (a)                       {fmt(summary['full_ratio'], '.3f')}\n"
              f"(c) - bare batch-1 latency           {fmt(summary['latency_overhead_ms'])} ms\n"
              f"(b) p99 latency                      {fmt(summary['service_p99_ms'], '.0f')} ms\n"
              f"CPU per image during (b), ms         {cpu_line(summary['ms_per_image'])}\n"
              f"  outside the forward pass           "
              f"{fmt(summary['ms_per_image'].get('outside_forward'), '.2f')} ms (web tier, Redis "
              f"and the model process beyond its bare pass)\n"
              f"connections per web process in (b)   {summary['web_connections']}\n"
              f"cores used during (b)                {cpu_line(summary['cpu_saturated'])}\n"
              f"cores used during (d)                {cpu_line(summary['cpu_overloaded'])}\n"
              f"cores used during (e)                {cpu_line(summary['cpu_full'])}\n"
              f"failed requests                      {summary['failed']} (and "
              f"{summary['overload_other_failures']} under overload other than 503)")
    if "cross_runtime" in summaries:
        print(f"\nservice with OpenVINO / best bare Keras: "
              f"{fmt(summaries['cross_runtime'], '.3f')}")
    if args.rounds < 3:
        print("note: fewer than 3 rounds; medians do not smooth out the machine's drift")


def cpu_line(cores):
    return ", ".join(f"{part} {value:.2f}" for part, value in cores.items()) or "n/a"


def cell_line(cell):
    return (f"{cell['batch_size']:>10}  {cell['batch_timeout_ms']:>10g}  "
            f"{fmt(cell['img_per_s']):>6}  {fmt(cell['p50_ms'], '.0f'):>7}  "
            f"{fmt(cell['p99_ms'], '.0f'):>7}  ({cell['failed']} failed)")


def write_json(path, data):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
    print(f"wrote {path}")


# --- Command line ---------------------------------------------------------------------------

def number_list(text):
    return [float(part) if "." in part else int(part) for part in text.split(",") if part]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each phase (3)")
    parser.add_argument("--phase-seconds", type=float, default=20.0,
                        help="measured seconds of each service load, and of all bare batch "
                             "sizes together (20)")
    parser.add_argument("--warmup-seconds", type=float, default=5.0,
                        help="unmeasured start of each service load (5)")
    parser.add_argument("--runtimes", type=lambda text: text.split(","),
                        default=["keras", "openvino"],
                        help="runtimes to measure, bare and served (keras,openvino)")
    parser.add_argument("--overload-seconds", type=float, default=60.0,
                        help="seconds of the overload load, (d) and then (e) (60)")
    parser.add_argument("--overload-factor", type=float, default=2.0,
                        help="(d)'s open-loop rate as a multiple of the bare model's best (2; 0: "
                             "no (d), e.g. where one client process cannot send that many)")
    parser.add_argument("--batch-size", type=int, help="BATCH_SIZE of the service")
    parser.add_argument("--batch-timeout-ms", type=float, help="BATCH_TIMEOUT_MS of the service")
    parser.add_argument("--concurrency", type=int, help="clients at saturation (4 x BATCH_SIZE, "
                        "64 at least; sweep: 2 x the largest batch size)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16", "int8", "auto"),
                        help="PRECISION of the bare model and the service (int8 calibrates on "
                             "CALIBRATION_IMAGES, else on crops of photos: calibration_images)")
    parser.add_argument("--model-cores", type=int, default=0,
                        help="pin the model, bare and served, to this many cores and the rest "
                             "(web tier, Redis, load generator) to the others (0: no pinning)")
    parser.add_argument("--out", help="JSON path (bench/results/<date>-<host>[-sweep].json)")
    parser.add_argument("--sweep", action="store_true", help="grid of BATCH_SIZE x "
                        "BATCH_TIMEOUT_MS instead of the efficiency benchmark")
    parser.add_argument("--sweep-batch-sizes", type=number_list, default=[4, 8, 16, 32])
    parser.add_argument("--sweep-timeouts-ms", type=number_list, default=[2, 5, 20])
    parser.add_argument("--p99-target-ms", type=float,
                        help="sweep: recommend the fastest cell whose p99 is under this")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.phase_seconds <= 0 or args.warmup_seconds < 0:
        parser.error("--rounds must be at least 1 and --phase-seconds above 0")
    cores = sorted(os.sched_getaffinity(0))
    if not 0 <= args.model_cores < len(cores):
        parser.error(f"--model-cores must leave at least one of the {len(cores)} cores")
    args.model_cores, args.other_cores = cores[:args.model_cores] or None, cores[args.model_cores:]
    stem = f"{time.strftime('%Y-%m-%d')}-{socket.gethostname()}" + ("-sweep" if args.sweep else "")
    args.out = args.out or str(ROOT / "bench" / "results" / f"{stem}.json")
    args.plot = str(Path(args.out).with_suffix(".png"))
    return args


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Set here, they reach the service and the record of settings alike.
    if args.precision == "int8" and not os.environ.get("CALIBRATION_IMAGES"):
        os.environ["CALIBRATION_IMAGES"] = calibration_images(tempfile.mkdtemp(prefix="calib-"))
    for name, value in (("BATCH_SIZE", args.batch_size),
                        ("BATCH_TIMEOUT_MS", args.batch_timeout_ms),
                        ("PRECISION", args.precision),
                        ("MODEL_THREADS", len(args.model_cores) if args.model_cores else None)):
        if value is not None:
            os.environ[name] = str(value)
    if args.model_cores:  # this script and the load generator; the web tier and Redis move here
        os.sched_setaffinity(0, args.other_cores)
    workdir = tempfile.mkdtemp(prefix="benchmark-")
    result = machine_info()
    result["model_cores"] = args.model_cores  # None: the model shares every core
    if args.sweep:
        cells, concurrency = run_sweep(args, workdir)
        best = recommend(cells, args.p99_target_ms)
        target = f"p99 under {args.p99_target_ms:g} ms" if args.p99_target_ms else "no p99 target"
        print(f"recommended ({target}): " + (f"BATCH_SIZE={best['batch_size']} BATCH_TIMEOUT_MS="
                                             f"{best['batch_timeout_ms']:g}" if best else "none"))
        result.update(concurrency=concurrency, p99_target_ms=args.p99_target_ms, cells=cells,
                      recommended=best)
    else:
        rounds, service_settings = run_rounds(args, workdir)
        summary = {runtime: summarize_rounds(r) for runtime, r in rounds.items()}
        if {"keras", "openvino"} <= rounds.keys():
            summary["cross_runtime"] = statistics.median(
                o["service_img_per_s"] / k["bare_best_img_per_s"]
                for k, o in zip(rounds["keras"], rounds["openvino"]) if o["service_img_per_s"])
        print_summary(summary, rounds, service_settings, args, result)
        plot = Path(args.plot).name if Path(args.plot).exists() else None  # (d)-(e) ran
        print(f"plot of the last overload phase: {args.plot if plot else 'none (no overload)'}")
        result.update(settings=service_settings, plot=plot, rounds_run=args.rounds,
                      phase_seconds=args.phase_seconds, warmup_seconds=args.warmup_seconds,
                      overload_seconds=args.overload_seconds,
                      summary=summary, rounds=rounds)
    write_json(args.out, result)
    print(f"service logs and raw load reports: {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
