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
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.bare import BATCH_SIZES, MODEL_SEED, BareModel, calibration_images  # noqa: E402
from bench.cpu import cpu_split  # noqa: E402
from bench.figures import cell_figures, recommend, round_figures, summarize_rounds  # noqa: E402
from bench.machine import machine_info, write_json  # noqa: E402
from bench.service import (KNOBS, run_load, run_paired_single, run_wrk,  # noqa: E402
                           running_service, settings_used, web_connections)

# (b): four batches' worth of clients, and at least this many: with fewer, a batch's clients are
# still in the web tier when the next batch could start, and the model waits on the load
# generator rather than the other way round.
SATURATION_CLIENTS = 64
SATURATION_BATCHES = 4


# --- Runs ----------------------------------------------------------------------------------

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


# --- Output --------------------------------------------------------------------------------

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


# --- Command line --------------------------------------------------------------------------

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
