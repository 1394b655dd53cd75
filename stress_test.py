"""Load generator for the Keras REST service: send many requests, then report what came back.

    python stress_test.py                                 # the classic tutorial's run: 500
                                                          # requests, one every 0.05 s
    python stress_test.py --rate 10 --duration 60         # open loop: 10 new requests a second
    python stress_test.py --concurrency 32 --duration 60  # closed loop: 32 clients, back to back

It prints a summary table (counts, failures by status and by error, throughput, latency
percentiles, the server's mean batch size), writes a JSON report and a PNG plot, and exits 1 if
any request failed (0 with --allow-failures). It reports figures; it asserts nothing about speed.
"""
import argparse
import http.client
import json
import math
import resource
import select
import sys
import threading
import time
import urllib.parse
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, wait
from pathlib import Path

from tqdm import tqdm
from urllib3 import encode_multipart_formdata

HERE = Path(__file__).resolve().parent
DEFAULT_URL = "http://localhost:5000/predict"
DEFAULT_IMAGE = HERE / "data" / "sample.jpg"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"}
MAX_IMAGES = 1000
MAX_REQUESTS = 1_000_000  # the count bound of a run limited only by --duration
# Open loop: requests in flight at once (beyond it they wait for a thread). It must be well above
# what the service holds, its queue (MAX_QUEUE_LENGTH, 1000 by default) and the batches in hand,
# or an open loop above capacity can never fill the queue, and overloads nothing.
MAX_THREADS = 4000


def load_images(path):
    """(name, bytes) of the image file at `path`, or of each image in that folder (sorted)."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) \
        if path.is_dir() else [path]
    if not files:
        raise SystemExit(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in {path}")
    return [(f.name, f.read_bytes()) for f in files[:MAX_IMAGES]]


_local = threading.local()


def connection_to(url, timeout_s):
    """This client thread's kept-alive connection to url's server, and the path to ask for.

    Plain http.client: a third of the CPU per request of requests' session, and the load generator
    shares the machine with the service it measures. A connection the server closed while it sat
    idle reads as ready (at its end) and is reopened, as urllib3 does.
    """
    parts = urllib.parse.urlsplit(url)
    connections = _local.__dict__.setdefault("connections", {})
    connection = connections.get((parts.scheme, parts.netloc))
    if connection is None:
        kind = http.client.HTTPSConnection if parts.scheme == "https" else \
            http.client.HTTPConnection
        connection = connections[parts.scheme, parts.netloc] = kind(parts.netloc)
    elif connection.sock is not None and readable(connection.sock):
        connection.close()
    connection.timeout = timeout_s
    if connection.sock is not None:
        connection.sock.settimeout(timeout_s)
    return connection, parts.path + (f"?{parts.query}" if parts.query else "")


def readable(sock):
    """Whether a socket has something to read now (poll, not select: an open loop's thousand
    connections take descriptors past select's limit of 1024)."""
    poller = select.poll()
    poller.register(sock, select.POLLIN)
    return bool(poller.poll(0))


def send_one(url, image, timeout_s, origin, scheduled=None):
    """POST one (filename, bytes) image; returns its record. Latency counts from `scheduled`.

    In the open loop a request that waited for a free thread is late through the client's fault;
    timing it from its scheduled start keeps that wait in the figures instead of hiding it.
    """
    started = scheduled if scheduled is not None else time.perf_counter()
    record = new_record(started - origin)
    body, content_type = encode_multipart_formdata({"image": image})
    connection, path = connection_to(url, timeout_s)
    try:
        connection.request("POST", path, body, {"Content-Type": content_type})
        response = connection.getresponse()
        answer = response.read()
        record["status"] = response.status
        record["ok"], record["error"] = read_answer(response.status, answer)
        record["batch_size"] = int(response.getheader("X-Batch-Size", 0)) or None
        record["inference_ms"] = float(response.getheader("X-Inference-Ms", 0)) or None
        record["retry_after"] = response.getheader("Retry-After")
        record["version"] = response.getheader("X-Model-Version")
        record["worker"] = response.getheader("X-Model-Worker")
    except (OSError, http.client.HTTPException) as exc:
        connection.close()
        record["error"] = f"{type(exc).__name__} (no HTTP answer)"
    record["latency_ms"] = (time.perf_counter() - started) * 1000
    return record


def new_record(t_s, error=None, latency_ms=None):
    """One request's record: send time (s since the run's start), outcome, server's batch, the
    model version and the worker that answered."""
    return {"t_s": t_s, "latency_ms": latency_ms, "status": 0, "ok": False, "error": error,
            "batch_size": None, "inference_ms": None, "retry_after": None, "version": None,
            "worker": None}


def read_answer(status, answer):
    """(succeeded, error message) of one HTTP answer in the service's JSON shape."""
    try:
        body = json.loads(answer)
    except ValueError:
        body = None
    if not isinstance(body, dict):
        return False, f"HTTP {status} without a JSON object"
    if status == 200 and body.get("success") is True:
        return True, None
    return False, str(body.get("error") or f"HTTP {status}")


def run_open_loop(url, images, count, rate, duration_s, timeout_s, on_done=lambda r: None,
                  stop=None):
    """Start `count` requests at `rate` per second (or until `duration_s`, or until the event
    `stop` is set), whatever comes back."""
    stop = stop or threading.Event()
    threads = min(count, MAX_THREADS)
    allow_open_files(threads + 64)  # a socket each, and the files any process has
    origin = time.perf_counter()
    pool = ThreadPoolExecutor(threads, thread_name_prefix="client")
    started = []
    try:
        for i in range(count):
            scheduled = origin + i / rate
            if duration_s is not None and scheduled - origin >= duration_s:
                break
            if stop.wait(max(0.0, scheduled - time.perf_counter())):
                break
            future = pool.submit(send_one, url, images[i % len(images)], timeout_s, origin,
                                 scheduled)
            future.add_done_callback(lambda f: on_done(f.result()))
            started.append((scheduled, future))
        # Each request is bounded by its own timeout; this bounds the whole wait as well.
        wait([future for _, future in started], timeout=timeout_s + 10)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return [future.result() if future.done() else
            new_record(at - origin, "no answer by the end of the run",
                       (time.perf_counter() - at) * 1000) for at, future in started]


def allow_open_files(count):
    """Raise this process's limit on open files to `count` where it is lower (as far as the hard
    limit allows; many systems start processes at 1,024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < count:
        resource.setrlimit(resource.RLIMIT_NOFILE, (count if hard == resource.RLIM_INFINITY
                                                    else min(count, hard), hard))


def run_closed_loop(url, images, concurrency, count, duration_s, timeout_s,
                    on_done=lambda r: None):
    """`concurrency` clients, each sending its next request as soon as its last one is answered.

    Stops after `count` requests or `duration_s` seconds, whichever comes first; returns records.
    """
    origin = time.perf_counter()
    deadline = origin + duration_s if duration_s is not None else math.inf
    claimed, records, lock = iter(range(count)), [], threading.Lock()

    def client():
        while time.perf_counter() < deadline:
            with lock:
                i = next(claimed, None)
            if i is None:
                return
            record = send_one(url, images[i % len(images)], timeout_s, origin)
            with lock:
                records.append(record)
            on_done(record)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        # Without --duration the count bounds the run: each request ends within its timeout.
        thread.join(None if duration_s is None else
                    max(0.0, deadline - time.perf_counter()) + timeout_s + 10)
    with lock:
        return sorted(records, key=lambda r: r["t_s"])


def percentile(values, q):
    """The q-th percentile (0-100) of `values` by the nearest-rank method; None if empty."""
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summarize(records):
    """Counts, throughput and latency figures of one run's records."""
    succeeded = [r for r in records if r["ok"]]
    failed = [r for r in records if not r["ok"]]
    wall_s = max((r["t_s"] + r["latency_ms"] / 1000 for r in records), default=0.0)
    latencies = [r["latency_ms"] for r in succeeded]
    sizes = [r["batch_size"] for r in succeeded if r["batch_size"]]
    return {
        "sent": len(records), "succeeded": len(succeeded), "failed": len(failed),
        "failed_by_status": dict(Counter(str(r["status"]) for r in failed)),
        "failed_by_error": dict(Counter(r["error"] for r in failed)),
        "wall_s": wall_s,
        "throughput_rps": len(succeeded) / wall_s if wall_s else 0.0,
        "latency_ms": {name: percentile(latencies, q)
                       for name, q in (("p50", 50), ("p90", 90), ("p99", 99), ("max", 100))},
        # Every image of a batch of n reports n, so the plain mean of the headers would weigh big
        # batches n times; the harmonic mean counts each batch once: images / batches.
        "mean_batch_size": len(sizes) / sum(1 / n for n in sizes) if sizes else None,
    }


def print_summary(summary, out=sys.stdout):
    """The end-of-run table."""
    ms = summary["latency_ms"]

    def fmt(value, unit=""):
        return "-" if value is None else f"{value:.1f}{unit}"

    rows = [("sent", summary["sent"]), ("succeeded", summary["succeeded"]),
            ("failed", summary["failed"])]
    rows += [(f"  HTTP {status}" if status != "0" else "  no answer", n)
             for status, n in summary["failed_by_status"].items()]
    rows += [("  error", f"{n} x {error[:100]}") for error, n in summary["failed_by_error"].items()]
    rows += [("wall time", fmt(summary["wall_s"], " s")),
             ("throughput", fmt(summary["throughput_rps"], " req/s")),
             ("latency p50 / p90", f"{fmt(ms['p50'])} / {fmt(ms['p90'])} ms"),
             ("latency p99 / max", f"{fmt(ms['p99'])} / {fmt(ms['max'])} ms"),
             ("mean server batch", fmt(summary["mean_batch_size"]))]
    for name, value in rows:
        print(f"{name:<24} {value}", file=out)


def write_report(path, run_settings, summary, records):
    """JSON: how the run was made, its summary, and one record per request."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"settings": run_settings, "summary": summary, "requests": records}, f, indent=1)


def plot(path, records, title):
    """PNG: each request's latency at its send time, and answers per second on a second axis."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, latency_axis = plt.subplots(figsize=(10, 5))
    for ok, colour, label in ((True, "tab:blue", "succeeded"), (False, "tab:red", "failed")):
        points = [(r["t_s"], r["latency_ms"]) for r in records if r["ok"] is ok]
        if points:
            latency_axis.scatter(*zip(*points), s=8, color=colour, label=label)
    latency_axis.set(xlabel="time since start (s)", ylabel="latency (ms)", title=title)
    ends = [r["t_s"] + r["latency_ms"] / 1000 for r in records if r["ok"]]
    bin_s = max(1, math.ceil(max(ends, default=0) / 60))  # about 60 bins, each at least 1 s
    per_bin = Counter(int(end // bin_s) for end in ends)
    bins = range(int(max(ends, default=0) // bin_s) + 1)
    throughput_axis = latency_axis.twinx()
    throughput_axis.step([b * bin_s for b in bins], [per_bin[b] / bin_s for b in bins],
                         where="post", color="tab:green", label="throughput")
    throughput_axis.set_ylabel("succeeded requests per second")
    handles = [h for axis in (latency_axis, throughput_axis)
               for h in axis.get_legend_handles_labels()[0]]
    latency_axis.legend(handles=handles, loc="upper left")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def progress_bar(total):
    """A live tqdm bar (on a terminal only) and the thread-safe callback that advances it."""
    bar, lock, failed = tqdm(total=total, unit="req", disable=None), threading.Lock(), Counter()

    def on_done(record):
        with lock:
            failed[record["ok"]] += 1
            bar.set_postfix(failed=failed[False], refresh=False)
            bar.update()

    return bar, on_done


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the /predict URL ({DEFAULT_URL})")
    loop = parser.add_mutually_exclusive_group()
    loop.add_argument("--rate", type=float, help="open loop: requests started per second "
                      "(default 20, one every 0.05 s as in the tutorial)")
    loop.add_argument("--concurrency", type=int, help="closed loop: clients sending back to back")
    parser.add_argument("--requests", type=int, help="most requests to send (default 500; "
                        f"with --duration: no count limit below {MAX_REQUESTS})")
    parser.add_argument("--duration", type=float, help="seconds to keep starting new requests")
    parser.add_argument("--image", default=str(DEFAULT_IMAGE), help="image file, or a folder of "
                        "images sent in turn (default: the bundled data/sample.jpg)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds one request may take")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    parser.add_argument("--report", default=f"reports/stress-{stamp}.json", help="JSON report path")
    parser.add_argument("--plot", default=f"reports/stress-{stamp}.png", help="PNG plot path "
                        "('' for none)")
    parser.add_argument("--allow-failures", action="store_true",
                        help="exit 0 even when some requests failed")
    args = parser.parse_args(argv)
    if args.concurrency is None and args.rate is None:
        args.rate = 20.0  # the tutorial's one request every 0.05 s
    if args.requests is None:
        args.requests = MAX_REQUESTS if args.duration else 500
    if min(args.rate or 1, args.concurrency or 1, args.requests, args.timeout) <= 0:
        parser.error("--rate, --concurrency, --requests and --timeout must be above 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    images = load_images(args.image)
    closed = args.concurrency is not None
    mode = f"closed loop, {args.concurrency} clients" if closed else \
        f"open loop, {args.rate:g} requests/s"
    print(f"{args.url}: {mode}, up to {args.requests} requests"
          + (f" for {args.duration:g} s" if args.duration else ""))
    bar, on_done = progress_bar(None if args.requests == MAX_REQUESTS else args.requests)
    if closed:
        records = run_closed_loop(args.url, images, args.concurrency, args.requests,
                                  args.duration, args.timeout, on_done)
    else:
        records = run_open_loop(args.url, images, args.requests, args.rate, args.duration,
                                args.timeout, on_done)
    bar.close()
    summary = summarize(records)
    print_summary(summary)
    if args.report:
        run_settings = {name: getattr(args, name) for name in
                        ("url", "rate", "concurrency", "requests", "duration", "timeout")}
        run_settings["images"] = [name for name, _ in images]
        write_report(args.report, run_settings, summary, records)
        print(f"report: {args.report}")
    if args.plot:
        plot(args.plot, records, f"{args.url} ({mode})")
        print(f"plot: {args.plot}")
    clean = summary["failed"] == 0 and summary["sent"] > 0
    return 0 if clean or args.allow_failures else 1


if __name__ == "__main__":
    sys.exit(main())
