"""Is BATCH_SIZE=auto a good choice on this machine, in every start?

    python bench/batch_choice.py                  # 5 starts, sizes 1-32 in 5 rounds
    python bench/batch_choice.py --starts 3 --rounds 7

First it starts the whole service (`python run_keras_server.py`, ResNet50 with seeded random
weights, the default runtime) with BATCH_SIZE=auto several times, one after another, and records
the size each start chose. Then, with no service running, it loads the same model as the worker
does and times every batch size from 1 to --largest in alternating rounds (forwards, then
backwards, so that a drift of the machine's speed touches every size alike). A size is good when
its median images/s is within 5% of the best size's. Exit status 0 when every choice was good.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.bare import MODEL, MODEL_SEED  # noqa: E402
from bench.machine import machine_info, write_json  # noqa: E402
from bench.service import running_service  # noqa: E402

GOOD = 0.95  # a good size reaches this share of the best size's images/s


def choices(starts, workdir):
    """The batch size each of `starts` fresh services chose, and the runtime they serve with."""
    chosen, runtime = [], None
    for number in range(1, starts + 1):
        started = time.monotonic()
        with running_service({"BATCH_SIZE": "auto"}, workdir) as (_, heartbeat, _):
            chosen.append(int(heartbeat["batch_size"]))
            runtime = heartbeat.get("runtime")
        print(f"start {number}: BATCH_SIZE=auto chose {chosen[-1]} ({runtime}; ready in "
              f"{time.monotonic() - started:.0f} s)", flush=True)
    return chosen, runtime


def time_every_size(runtime, largest, rounds):
    """Median images/s of each batch size 1..largest over alternating rounds of one pass each."""
    import numpy as np

    import settings
    from serving.model.meters import alternating
    from serving.model.loader import load_classifier

    classifier = load_classifier(MODEL, "none", seed=MODEL_SEED, threads=settings.MODEL_THREADS,
                                 runtime=runtime, cache_dir=settings.OPENVINO_CACHE_DIR)
    shape = (classifier.size[1], classifier.size[0], classifier.channels)
    rng = np.random.default_rng(MODEL_SEED)
    batches = {n: rng.integers(0, 256, (n, *shape), np.uint8) for n in range(1, largest + 1)}
    for batch in batches.values():
        classifier.predict_batch(batch)  # the first pass at a new size is not timed
    rates = {n: [] for n in batches}
    for number in range(rounds):
        for n in alternating(batches, number):
            started = time.perf_counter()
            classifier.predict_batch(batches[n])
            rates[n].append(n / (time.perf_counter() - started))
        print(f"round {number + 1} of {rounds} timed", flush=True)
    return {n: statistics.median(r) for n, r in rates.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=5, help="service starts (5)")
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds of all sizes (5)")
    parser.add_argument("--largest", type=int, default=32, help="largest size timed (32)")
    parser.add_argument("--out", help="JSON path (bench/results/<date>-<host>-batch-choice.json)")
    args = parser.parse_args(argv)
    machine = machine_info()
    out = args.out or ROOT / "bench" / "results" / (
        f"{time.strftime('%Y-%m-%d')}-{machine['host']}-batch-choice.json")

    chosen, runtime = choices(args.starts, tempfile.mkdtemp(prefix="batch-choice-"))
    medians = time_every_size(runtime, args.largest, args.rounds)
    best = max(medians.values())
    good = sorted(n for n, rate in medians.items() if rate >= GOOD * best)
    print(f"\nResNet50 (random weights, seed {MODEL_SEED}), {runtime}; machine: {machine['cpu']} "
          f"(family {machine['cpu_family']}, model {machine['cpu_model']}; "
          f"{' '.join(machine['vector_flags'])}), {machine['cores']} cores\n"
          f"size  img/s  of best  (medians of {args.rounds} alternating rounds)")
    for n, rate in medians.items():
        marks = ("good" if n in good else "") + ("  <- chosen" * chosen.count(n))
        print(f"{n:4d}  {rate:5.1f}  {rate / best:7.3f}  {marks}")
    verdict = all(n in good for n in chosen)
    print(f"\nchoices of {args.starts} starts: {chosen}; good sizes (within "
          f"{(1 - GOOD) * 100:.0f}% of the best): {good}\nevery choice good: "
          f"{'yes' if verdict else 'NO'}")
    write_json(out, {**machine, "runtime": runtime, "chosen": chosen, "rounds": args.rounds,
                     "img_per_s": medians, "good": good, "every_choice_good": verdict})
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
