"""stress_test.py against a real running service, and the benchmark's pure figure functions."""
import json
import os
import subprocess
import sys
import time

import pytest
import requests

import stress_test
from conftest import ROOT, Processes, free_port, image_bytes, tiny_settings, wait_until

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_service(redis_server, tmp_path_factory, tiny_model):
    """The tiny model behind one worker and one web instance, for the whole module."""
    processes = Processes(redis_server["url"], tmp_path_factory.mktemp("stress"), "stress")
    processes.worker(BATCH_SIZE=8, BATCH_TIMEOUT_MS=20, **tiny_settings(tiny_model))
    yield processes.web()
    processes.stop_all()


@pytest.fixture(scope="module")
def web_without_worker(redis_server, tmp_path_factory):
    """A web instance whose queue no worker serves: every request is refused with 503."""
    processes = Processes(redis_server["url"], tmp_path_factory.mktemp("idle"), "stress_idle")
    yield processes.web()
    processes.stop_all()


def run_stress_test(tmp_path, *args):
    report, plot = tmp_path / "report.json", tmp_path / "plot.png"
    result = subprocess.run([sys.executable, "stress_test.py", *args, "--report", str(report),
                             "--plot", str(plot)], cwd=ROOT, capture_output=True, text=True,
                            timeout=180)
    return result, report, plot


def answered_by_server(url):
    """The server's own count of answered requests: `jobs` summed over the worker heartbeats."""
    return sum(int(worker["jobs"]) for worker in requests.get(f"{url}/readyz").json()["workers"])


def assert_server_answered(url, expected):
    wait_until(lambda: answered_by_server(url) >= expected, timeout=10,
               what=f"the heartbeats to count {expected} answered requests")
    time.sleep(1.0)  # two more heartbeats (0.5 s apart): the count must not go past the report's
    assert answered_by_server(url) == expected


@pytest.mark.parametrize("loop_args, sent", [
    (["--requests", "40", "--rate", "40"], 40),
    (["--requests", "30", "--concurrency", "6", "--duration", "60"], 30),
])
def test_report_counts_match_the_servers_count(tiny_service, tmp_path, loop_args, sent):
    before = answered_by_server(tiny_service.url)

    result, report, plot = run_stress_test(tmp_path, "--url", f"{tiny_service.url}/predict",
                                           *loop_args)

    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(report.read_text())["summary"]
    assert (summary["sent"], summary["succeeded"], summary["failed"]) == (sent, sent, 0)
    assert_server_answered(tiny_service.url, before + summary["succeeded"])
    latency = summary["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert 1 <= summary["mean_batch_size"] <= 8
    assert summary["throughput_rps"] > 0
    assert plot.read_bytes().startswith(PNG_SIGNATURE)
    assert "succeeded" in result.stdout and "p99" in result.stdout


def test_a_folder_of_images_is_sent_in_turn(tiny_service, tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, fmt in enumerate(("JPEG", "PNG", "BMP")):
        (folder / f"image{i}.{fmt.lower()}").write_bytes(image_bytes(fmt=fmt, seed=i))
    (folder / "notes.txt").write_text("not an image, not sent")

    result, report, _ = run_stress_test(tmp_path, "--url", f"{tiny_service.url}/predict",
                                        "--image", str(folder), "--requests", "6",
                                        "--concurrency", "2")

    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(report.read_text())
    assert data["settings"]["images"] == ["image0.jpeg", "image1.png", "image2.bmp"]
    assert data["summary"]["succeeded"] == 6


def test_a_kept_alive_connection_the_server_closed_is_opened_again(tiny_service):
    """gunicorn closes a connection idle for 5 s (keepalive); an open loop's client thread may sit
    idle longer than that, and its next request must not fail for it."""
    url, image = f"{tiny_service.url}/predict", ("a.jpg", image_bytes())
    first = stress_test.send_one(url, image, 10, time.perf_counter())
    time.sleep(6.5)
    second = stress_test.send_one(url, image, 10, time.perf_counter())

    assert first["ok"] and second["ok"], (first, second)


FAILING_SERVERS = {
    "no model worker (503)": lambda web, idle: (f"{idle.url}/predict", {"503": 4}),
    "wrong path (404)": lambda web, idle: (f"{web.url}/nope", {"404": 4}),
    "nothing listening": lambda web, idle: (f"http://127.0.0.1:{free_port()}/predict", {"0": 4}),
}


@pytest.mark.parametrize("case", FAILING_SERVERS)
def test_failures_exit_non_zero_unless_allowed(tiny_service, web_without_worker, tmp_path, case):
    url, by_status = FAILING_SERVERS[case](tiny_service, web_without_worker)
    args = ["--url", url, "--requests", "4", "--rate", "20", "--timeout", "10"]

    failing, report, plot = run_stress_test(tmp_path, *args)
    summary = json.loads(report.read_text())["summary"]
    allowed, _, _ = run_stress_test(tmp_path, *args, "--allow-failures")

    assert failing.returncode == 1, failing.stdout + failing.stderr
    assert summary["succeeded"] == 0 and summary["failed_by_status"] == by_status
    assert sum(summary["failed_by_error"].values()) == 4
    assert plot.read_bytes().startswith(PNG_SIGNATURE)
    assert allowed.returncode == 0, allowed.stdout + allowed.stderr


# --- The benchmark's figures, from made-up request records --------------------------------

def record(end_s, ok=True, inference_ms=100.0, latency_ms=500.0):
    return {"t_s": end_s - latency_ms / 1000, "latency_ms": latency_ms, "ok": ok,
            "status": 200 if ok else 0, "inference_ms": inference_ms, "batch_size": None}


def batches(ends_and_sizes, spread_s=0.004):
    """Records of batches answered at the given times, each answer a few ms after the last."""
    return [record(end + i * spread_s) for end, size in ends_and_sizes for i in range(size)]


def test_completion_bursts_group_the_answers_of_one_batch():
    from bench.figures import completion_bursts

    records = batches([(1.0, 4), (2.0, 4), (3.0, 2)]) + [record(2.5, ok=False)]

    bursts = completion_bursts(records)

    assert [n for _, n in bursts] == [4, 4, 2]
    assert [t for t, _ in bursts] == pytest.approx([1.0, 2.0, 3.0])


def test_completion_bursts_tell_apart_batches_whose_passes_queued_behind_each_other():
    from bench.figures import completion_bursts

    # Two lanes on one core: each pass reports 1 s (half of it waiting for the other lane's),
    # and a batch ends every 0.5 s.
    records = [dict(record(0.5 * k + i * 0.004, inference_ms=1000.0 + k), batch_size=4)
               for k in range(6) for i in range(4)]

    assert [n for _, n in completion_bursts(records)] == [4] * 6


def test_the_bare_models_sizes_are_timed_in_interleaved_slices_in_alternating_order():
    from bench.bare import time_sizes

    calls = []  # the size of each pass, in order

    def forward(batch):
        calls.append(len(batch))
        time.sleep(0.001 * len(batch))

    figures = time_sizes(forward, {n: [0] * n for n in (1, 2, 4)}, 0.0, slices=4)

    # At 0 s a slice is one pass: each slice passes every size once, the next one backwards.
    assert calls == [1, 2, 4, 4, 2, 1, 1, 2, 4, 4, 2, 1]
    for n, figure in figures.items():
        assert figure["calls"] == 4 and len(figure["slices_img_per_s"]) == 4
        assert figure["img_per_s"] == pytest.approx(
            4 / sum(1 / rate for rate in figure["slices_img_per_s"]))


def test_steady_throughput_measures_from_batch_end_to_batch_end():
    from bench.figures import steady_throughput

    # A ramp-up batch of 1, then 8 images every 2 s: 4 img/s however the window cuts.
    records = batches([(0.5, 1)] + [(1.0 + 2 * k, 8) for k in range(6)])

    assert steady_throughput(records, 0.9, 11.5) == pytest.approx(4.0, rel=0.01)
    assert steady_throughput(records, 0.9, 10.0) == pytest.approx(4.0, rel=0.01)
    assert steady_throughput(records, 4.0, 5.5) is None  # one batch is no rate


def test_round_figures_and_their_medians():
    from bench.figures import round_figures, summarize_rounds

    def bare(scale):
        return {1: {"img_per_s": 10.0 * scale, "batch_ms": 100.0 / scale, "cores": 1.5},
                16: {"img_per_s": 12.0 * scale, "batch_ms": 1333.0 / scale, "cores": 1.8}}

    def report(records):
        return {"requests": records, "summary": {"failed": 0, "mean_batch_size": 8.0}}

    saturated = report(batches([(1.0 + k, 11) for k in range(8)]))  # 11 img/s
    # (c): each request paired with a bare batch-1 pass; the warm-up's pair does not count.
    single = report([dict(record(t, latency_ms=120.0), bare_batch1_ms=ms)
                     for t, ms in ((0.5, 300.0), (6.0, 95.0), (6.2, 100.0), (6.4, 130.0))])
    refused = [dict(record(1.0 + k / 10), ok=False, status=503) for k in range(30)]
    # (d) 10 img/s until 20 s, (e) 11 img/s from 20 s to 40 s.
    overloaded = report(batches([(1.0 + k, 10) for k in range(8)])
                        + batches([(21.0 + k, 11) for k in range(8)]) + refused)
    # At saturation the model took 1.9 cores, the web tier 0.011, Redis 0.0011, wrk 0.0022.
    cpu = {"model": 1.9, "web": 0.011, "redis": 0.0011, "load": 0.0022, "other": 0.01,
           "idle": 0.05, "stolen": 0.3}
    rounds = [round_figures(bare(scale), saturated, single, overloaded, 0.9, 20.0, 40.0, cpu, 16)
              for scale in (1.0, 1.1, 0.9)]

    assert rounds[0]["bare_best_batch_size"] == 16
    assert rounds[0]["ratio"] == pytest.approx(11 / 12, rel=0.01)
    assert rounds[0]["overload_ratio"] == pytest.approx(10 / 12, rel=0.01)
    assert rounds[0]["full_ratio"] == pytest.approx(11 / 12, rel=0.01)
    assert rounds[0]["overload_first_refusal_s"] == pytest.approx(0.5)
    assert rounds[0]["overload_refused"] == 30 and rounds[0]["overload_other_failures"] == 0
    assert rounds[0]["bare_batch1_ms"] == pytest.approx(100.0)  # paired, not (a)'s own
    assert rounds[0]["latency_overhead_ms"] == pytest.approx(20.0)
    # CPU per image at 11 img/s: the bare model at the service's batch size took 1.8 cores for
    # 12 img/s, 150 ms an image; the service's model process 1.9 cores, 172.7 ms an image.
    ms = rounds[0]["ms_per_image"]
    assert ms["web"] == pytest.approx(1.0) and ms["redis"] == pytest.approx(0.1)
    assert ms["load"] == pytest.approx(0.2)
    assert ms["bare_model"] == pytest.approx(150.0)
    assert ms["model_beyond_bare"] == pytest.approx(1900 / 11 - 150.0)
    assert ms["outside_forward"] == pytest.approx(1.1 + 1900 / 11 - 150.0)
    assert "idle" not in ms and "stolen" not in ms
    summary = summarize_rounds(rounds)
    assert summary["bare_best_img_per_s"] == pytest.approx(12.0)
    assert summary["ratio"] == pytest.approx(11 / 12, rel=0.01)
    assert summary["bare_img_per_s"] == {1: pytest.approx(10.0), 16: pytest.approx(12.0)}


def test_the_cpu_split_names_each_part_of_the_service_and_counts_new_processes_from_zero():
    from bench.cpu import cores_between, process_role

    python = "/srv/.venv/bin/python"
    assert process_role("redis-server", ["redis-server *:6379"]) == "redis"
    assert process_role("python", [python, "-m", "gunicorn", "-c", "serving/web/gunicorn.conf.py",
                                   "serving.web.app:create_app()"]) == "web"
    assert process_role("gunicorn", ["/srv/.venv/bin/gunicorn", "run_keras_server:app"]) == "web"
    assert process_role("python", [python, "/srv/run_keras_server.py", "model"]) == "model"
    assert process_role("python", [python, "/srv/run_keras_server.py", "model-forks", "5"]) \
        == "model"
    assert process_role("python", [python, "/srv/run_keras_server.py"]) is None  # the launcher
    assert process_role("python", [python, "stress_test.py", "--url", "gunicorn"]) is None

    first = {"at": 100.0, "busy": 1000.0, "idle": 500.0, "stolen": 40.0,
             "processes": {1: (None, 3.0), 2: ("model", 50.0), 3: ("web", 7.0),
                           4: ("redis", 1.0), 6: ("load", 2.0)}}
    last = {"at": 110.0, "busy": 1018.0, "idle": 502.0, "stolen": 43.0,
            "processes": {1: (None, 3.1), 2: ("model", 65.0), 3: ("web", 8.0), 4: ("redis", 1.2),
                          5: ("web", 0.6), 6: ("load", 2.5)}}  # a web process started in between

    cores = cores_between(first, last)

    assert cores == pytest.approx({"model": 1.5, "web": 0.16, "redis": 0.02, "load": 0.05,
                                   "other": 0.07, "idle": 0.2, "stolen": 0.3})


def test_a_cpu_split_over_no_time_is_empty_rather_than_a_division_by_zero():
    from bench.cpu import cpu_split

    # (e)'s split when --overload-seconds is no longer than (d): it starts where it ends.
    with cpu_split(os.getpid(), 0.05, 0.05) as split:
        time.sleep(0.5)
    assert split == {}


def test_recommend_picks_the_fastest_cell_under_the_p99_target():
    from bench.figures import recommend

    cells = [{"batch_size": 4, "img_per_s": 9.0, "p99_ms": 900.0},
             {"batch_size": 16, "img_per_s": 12.0, "p99_ms": 2500.0},
             {"batch_size": 8, "img_per_s": 11.0, "p99_ms": 1500.0},
             {"batch_size": 32, "img_per_s": None, "p99_ms": None}]

    assert recommend(cells, 2000.0)["batch_size"] == 8
    assert recommend(cells, None)["batch_size"] == 16
    assert recommend(cells, 500.0) is None


def test_the_benchmark_pins_the_model_only_where_a_core_is_left_for_the_rest():
    from bench.benchmark import parse_args

    cores = sorted(os.sched_getaffinity(0))
    with pytest.raises(SystemExit):
        parse_args(["--model-cores", str(len(cores))])
    assert parse_args([]).model_cores is None
    if len(cores) > 1:
        args = parse_args(["--model-cores", "1"])
        assert (args.model_cores, args.other_cores) == (cores[:1], cores[1:])
