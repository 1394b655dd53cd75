"""The benchmark's figures from its timings and load reports (pure functions): throughput from the
answered batches, one round's ratios and CPU per image, medians over rounds, the sweep's cells."""
import statistics

from stress_test import percentile


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
