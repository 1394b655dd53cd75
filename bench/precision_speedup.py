"""The bare model's speed at each precision the CPU offers, measured side by side in one run.

    python bench/precision_speedup.py                       # 3 rounds, every precision offered
    python bench/precision_speedup.py --precisions fp32 bf16 --rounds 5

ResNet50 (random weights, seed 1234) is loaded once per precision, each in a process of its own
as the worker loads it (bench/bare.py, the bare model of bench/benchmark.py: uint8 batches of 1
to 32 through the runtime's preprocessing), and the processes are timed one at a time, in an order
that alternates from round to round, so that every precision sees the machine at about the same
moments. It prints each precision's best images per second (its best batch size) in every round,
and its speed-up over FP32 taken within each round, with the medians; the record goes to --out.
INT8 is calibrated on crops of photos (bench/bare.py's calibration_images), unless
CALIBRATION_IMAGES names a folder.
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.bare import ROOT, BareModel, calibration_images  # noqa: E402
from bench.machine import machine_info  # noqa: E402


def offered_precisions():
    """FP32, the 16-bit precisions OpenVINO's CPU plugin offers here, and INT8."""
    import openvino

    offered = openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return ["fp32", *(p for p in ("bf16", "fp16") if p.upper() in offered), "int8"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precisions", nargs="+", choices=("fp32", "bf16", "fp16", "int8"),
                        help="default: FP32, the CPU's 16-bit precisions, INT8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="per batch size and round")
    parser.add_argument("--out", help="the JSON record (default: bench/results/<date>-<host>-"
                                      "precisions.json)")
    args = parser.parse_args(argv)
    precisions = args.precisions or offered_precisions()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "int8" in precisions and not os.environ.get("CALIBRATION_IMAGES"):
        os.environ["CALIBRATION_IMAGES"] = calibration_images(
            tempfile.mkdtemp(prefix="calib-"))
    models = {}
    try:
        for precision in precisions:  # each process reads PRECISION as it starts
            print(f"loading the bare model at {precision}...", flush=True)
            os.environ["PRECISION"] = precision
            models[precision] = BareModel("openvino")
        rounds = []
        for n in range(args.rounds):
            order = precisions if n % 2 == 0 else precisions[::-1]
            measured = {p: models[p].measure(args.seconds) for p in order}
            best = {p: max(sizes.values(), key=lambda s: s["img_per_s"]) | {
                "batch_size": max(sizes, key=lambda size: sizes[size]["img_per_s"])}
                for p, sizes in measured.items()}
            rounds.append({"img_per_s": {p: {size: m["img_per_s"] for size, m in sizes.items()}
                                         for p, sizes in measured.items()},
                           "best": {p: (b["img_per_s"], b["batch_size"]) for p, b in best.items()}})
            print(f"round {n + 1}: " + ", ".join(
                f"{p} {b['img_per_s']:.1f} img/s (batch {b['batch_size']})"
                for p, b in best.items()), flush=True)
    finally:
        for model in models.values():
            model.stop()
    summary = {}
    for p in precisions:
        summary[p] = {"best_img_per_s": statistics.median(r["best"][p][0] for r in rounds),
                      "speedup_over_fp32": statistics.median(
                          r["best"][p][0] / r["best"]["fp32"][0] for r in rounds)
                      if "fp32" in precisions else None,
                      "rounds": [r["best"][p][0] for r in rounds]}
        speedup = summary[p]["speedup_over_fp32"]
        print(f"{p:5s} best {summary[p]['best_img_per_s']:7.1f} img/s (rounds "
              f"{' '.join(f'{x:.1f}' for x in summary[p]['rounds'])})"
              + (f", {speedup:.2f}x FP32" if speedup else ""))
    record = machine_info() | {
        "command": " ".join(["bench/precision_speedup.py", *(argv or sys.argv[1:])]),
        "seconds_per_size": args.seconds,
        "summary": summary, "rounds": rounds}
    out = args.out or str(ROOT / "bench" / "results" /
                          f"{time.strftime('%Y-%m-%d')}-{os.uname().nodename}-precisions.json")
    Path(out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
