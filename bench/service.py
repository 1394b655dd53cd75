"""The whole service as the benchmarks start it (`python run_keras_server.py` with a private Redis)
and the loads they put on it: wrk at saturation, stress_test.py's closed or open loop, and one
client paired with the bare model's passes."""
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import requests

from bench.bare import MODEL, MODEL_SEED, READY_TIMEOUT_S, ROOT, SAMPLE_IMAGE
from bench.cpu import process_role, service_processes

KNOBS = ("BATCH_SIZE", "BATCH_TIMEOUT_MS", "PRECISION", "REQUEST_TIMEOUT_S", "MAX_QUEUE_LENGTH",
         "WEB_WORKERS", "WEB_CONNECTIONS", "MODEL_THREADS")
WRK_SCRIPT = ROOT / "bench" / "wrk_predict.lua"
PAIR_PAUSE_S = 0.02  # (c): between a request and a bare pass


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


def settings_used(heartbeat):
    """The service's knobs as it read them, and what its worker reports about itself."""
    import settings

    knobs = {name: getattr(settings, name) for name in KNOBS if hasattr(settings, name)}
    knobs.update({name: heartbeat.get(name)
                  for name in ("model", "weights", "device", "runtime", "precision")})
    knobs["BATCH_SIZE"] = int(heartbeat["batch_size"])
    return knobs
