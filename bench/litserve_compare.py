"""This service against LitServe, one after the other on this machine: the same model (ResNet50,
seeded random weights, as OpenVINO IR with the same preprocessing inside), the same runtime and
precision, the same decoding of uploads, the same load generator (wrk, bench/wrk_predict.lua: a
closed loop of 4 batches of clients posting the sample image as the tutorial's form).

    python bench/litserve_compare.py            # FP32, the fastest 16-bit precision here, INT8
    python bench/litserve_compare.py --precisions f32 --rounds 1 --seconds 20

INT8 is the service's own NNCF quantization, calibrated on CALIBRATION_IMAGES or else on crops
of photos (bench/bare.py's calibration_images); LitServe serves the very model the service does.

LitServe (a pinned version) runs in a virtual environment of its own, bench/.litserve-venv, made
at the first run with the same versions of OpenVINO, numpy, Pillow and OpenCV as the service's.
Both get the batch size the service's BATCH_SIZE=auto chooses at the precision, the same batch
window (BATCH_TIMEOUT_MS), one model process, and two HTTP server processes (the service's
WEB_WORKERS); LitServe also its faster queue (ZeroMQ). Rounds alternate the two, so that a drift
of the machine's speed touches both. Images per second are counted from the answers that came in
each load's measured part; p50 and p99 are wrk's, over the whole load.
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
from bench.bare import MODEL_SEED, calibration_images  # noqa: E402
from bench.machine import machine_info, write_json  # noqa: E402
from bench.service import free_port, run_wrk, running_service  # noqa: E402
from serving.model.precision import HINTS  # noqa: E402

LITSERVE = "litserve==0.2.19"
# Starlette's form parser, which LitServe's multipart requests need and do not install.
MULTIPART = "python-multipart==0.0.32"
VENV = HERE / ".litserve-venv"
# What the LitServe server imports of the service (classifier, helpers), at the service's versions.
SHARED = ("openvino", "numpy", "pillow", "simplejpeg", "opencv-python-headless", "pybase64")


def pins(names):
    """The service's pinned versions (requirements.txt) of these packages."""
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return [line.strip() for line in lines if line.split("==")[0].strip() in names]


def litserve_python():
    """The LitServe environment's python, made (or made again) when the versions change."""
    wanted = "\n".join([LITSERVE, MULTIPART, *pins(SHARED)])
    stamp = VENV / "installed.txt"
    if not stamp.exists() or stamp.read_text() != wanted:
        print(f"making {VENV} ({LITSERVE}) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
        subprocess.run([str(VENV / "bin" / "pip"), "install", "--quiet", *wanted.split()],
                       check=True)
        stamp.write_text(wanted)
    return str(VENV / "bin" / "python")


def openvino_model(cache_dir, out, calibration=None):
    """The OpenVINO IR of ResNet50 (seeded) as the service serves it, preprocessing inside, saved
    at `out`: converted by the service's own code into its cache and, given a folder of calibration
    images, quantized to INT8 by it (the service then reads the same model from the cache)."""
    script = f"""import sys, openvino
from serving.model.loader import load_classifier
from serving.model.precision import check_images, quantized
classifier = load_classifier("resnet50", "none", seed={MODEL_SEED}, runtime="openvino",
                             cache_dir=sys.argv[1])
model = classifier.openvino_model
if sys.argv[3]:
    pixels, _, digest = check_images(classifier.input_shape, sys.argv[3])
    model = quantized(model, classifier.cache_key, sys.argv[1], pixels, digest)
openvino.save_model(model, sys.argv[2])
"""
    subprocess.run([sys.executable, "-c", script, cache_dir, out, calibration or ""], cwd=ROOT,
                   check=True, capture_output=True)
    return out


def fastest_precision():
    """OpenVINO's fastest 16-bit precision on this CPU: bf16 where the CPU has bf16 units, else f16
    where it has those, else f32."""
    import openvino

    capabilities = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "bf16" if "BF16" in capabilities else "f16" if "FP16" in capabilities else "f32"


@contextmanager
def litserve(python, xml, precision, batch_size, batch_timeout_ms, workdir):
    """The LitServe server on a free port until the block ends; yields its URL."""
    port = free_port()
    log = open(Path(workdir) / f"litserve-{port}.log", "wb")
    process = subprocess.Popen(
        [python, str(HERE / "litserve_server.py"), "--port", str(port), "--xml", xml,
         "--precision", precision, "--batch-size", str(batch_size), "--batch-timeout-ms",
         str(batch_timeout_ms)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"LitServe exited; see {log.name}")
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError(f"LitServe was not ready within 300 s; see {log.name}")
        yield url
    finally:
        os.killpg(process.pid, 15)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


def measure(url, connections, seconds, warmup_s, workdir):
    """Images per second answered after warmup_s (each answer one image), wrk's p50 and p99."""
    report = run_wrk(url, connections, seconds, workdir)
    answered = [r["t_s"] for r in report["requests"] if r["ok"]]
    start = min(answered, default=0) + warmup_s
    counted = [t for t in answered if start <= t]
    rate = (len(counted) - 1) / (counted[-1] - counted[0]) if len(counted) > 1 else None
    return {"img_per_s": rate, "p50_ms": report["latency_ms"]["p50"],
            "p99_ms": report["latency_ms"]["p99"], "failed": report["summary"]["failed"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--precisions", type=lambda text: text.split(","),
                        help="OpenVINO precisions to compare at, comma-separated (f32, bf16, f16, "
                             "int8; default: f32, the fastest 16-bit one here, int8)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30.0, help="of each load (30)")
    parser.add_argument("--warmup-seconds", type=float, default=5.0)
    parser.add_argument("--out", default=str(HERE / "results" / time.strftime(
        "%Y-%m-%d-litserve.json")))
    args = parser.parse_args(argv)
    precisions = args.precisions or list(dict.fromkeys(["f32", fastest_precision(), "int8"]))
    workdir = tempfile.mkdtemp(prefix="litserve-compare-")
    cache_dir = os.environ.get("OPENVINO_CACHE_DIR") or str(Path(workdir) / "openvino")
    calibration = None  # made only for INT8
    if "int8" in precisions:
        calibration = os.environ.get("CALIBRATION_IMAGES") or calibration_images(
            tempfile.mkdtemp(prefix="calib-", dir=workdir))
    python = litserve_python()
    results, machine, models = {}, machine_info(), {}
    for precision in precisions:
        served = {"f32": "fp32", "f16": "fp16"}.get(precision, precision)  # service's PRECISION
        quantized = served == "int8"  # the one IR of its own; the others run the FP32 IR
        if quantized not in models:
            models[quantized] = openvino_model(
                cache_dir, str(Path(workdir) / f"litserve-{'int8' if quantized else 'fp32'}.xml"),
                calibration if quantized else None)
        xml = models[quantized]
        service_env = {"RUNTIME": "openvino", "OPENVINO_CACHE_DIR": cache_dir, "PRECISION": served,
                       **({"CALIBRATION_IMAGES": calibration} if quantized else {})}
        rounds = results[precision] = {"service": [], "litserve": []}
        for number in range(1, args.rounds + 1):
            with running_service(service_env, workdir) as (url, heartbeat, _):
                batch_size = int(heartbeat["batch_size"])
                connections = max(64, 4 * batch_size)
                rounds["service"].append(measure(url, connections, args.seconds,
                                                 args.warmup_seconds, workdir))
            with litserve(python, xml, HINTS[served], batch_size, 5.0, workdir) as url:
                rounds["litserve"].append(measure(url, connections, args.seconds,
                                                  args.warmup_seconds, workdir))
            print(f"{precision} round {number} (batch {batch_size}, {connections} clients): "
                  + ", ".join(f"{name} {line(rounds[name][-1])}" for name in rounds), flush=True)
        rounds["batch_size"], rounds["connections"] = batch_size, connections
    print(f"\nmachine: {machine['cpu']} (family {machine['cpu_family']}, model "
          f"{machine['cpu_model']}; {' '.join(machine['vector_flags'])}), {machine['cores']} cores")
    summary = {}
    for precision, rounds in results.items():
        summary[precision] = {name: {**{figure: statistics.median(r[figure] for r in rounds[name])
                                        for figure in ("img_per_s", "p50_ms", "p99_ms")},
                                     "failed": sum(r["failed"] for r in rounds[name])}
                              for name in ("service", "litserve")}
        medians = summary[precision]
        medians["ratio"] = statistics.median(
            s["img_per_s"] / litserve["img_per_s"]
            for s, litserve in zip(rounds["service"], rounds["litserve"]))
        print(f"{precision}: service {line(medians['service'])} | LitServe "
              f"{line(medians['litserve'])} | service / LitServe {medians['ratio']:.2f}x "
              f"(medians of {args.rounds} rounds)")
    write_json(args.out, {**machine, "litserve": LITSERVE, "rounds_run": args.rounds,
                          "seconds": args.seconds, "results": results, "summary": summary})
    return 0


def line(figures):
    rate = figures["img_per_s"]
    return (f"{rate:.1f} img/s" if rate else "no answers") + (
        f", p50 {figures['p50_ms']:.0f} ms, p99 {figures['p99_ms']:.0f} ms, "
        f"{figures['failed']} failed")


if __name__ == "__main__":
    sys.exit(main())
