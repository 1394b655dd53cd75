"""Warming a model up and choosing its batch size by measuring it."""
import logging
import statistics
import time

import numpy as np

from serving.model.meters import alternating
from serving.model.openvino_runtime import OpenVINOForward

log = logging.getLogger(__name__)


def warm_up(classifier, batch_size, time_limit_s):
    """Forward passes at the batch sizes a worker meets first, choosing the size when batch_size
    is "auto"; returns the batch size."""
    shape = classifier.input_shape
    if batch_size == "auto":
        batch_size = choose_batch_size(classifier, shape, time_limit_s)
    for size in sorted({1, batch_size}):
        pixels = np.zeros((size, *shape), np.uint8)
        classifier.predict_batch(pixels)
        if isinstance(classifier.forward, OpenVINOForward):
            classifier.forward.warm_streams(pixels)
    return batch_size


# BATCH_SIZE=auto: sizes 1, 2, 4, ... are added while one round of them takes at most
# AUTO_ROUND_S; AUTO_ROUNDS interleaved rounds time them all. Start-up pays at most about
# (AUTO_ROUNDS + 2) x AUTO_ROUND_S (two untimed passes per size first).
AUTO_ROUNDS = 7
AUTO_ROUND_S = 2.0


# Sizes this close to the best median throughput count as tied, and the largest of them wins: on
# a flat curve, sizes of the same speed trade places from run to run by a few percent, and the
# service gains from the larger ones (each batch also costs the worker a claim and a store in
# Redis). bench/batch_choice.py checks the choice against a sweep of every size.
AUTO_TOLERANCE = 0.05


def choose_batch_size(classifier, input_shape, time_limit_s, largest=256):
    """Time batch sizes in interleaved rounds; the largest size whose median images/s is within
    AUTO_TOLERANCE of the best wins.

    Rounds alternate their order, so a drift of the machine's speed touches every size alike, and
    medians over rounds ignore a stall in one of them. Medians still differ by a few per cent
    between sizes of equal speed, and the sizes that are truly slower are the small ones, where
    throughput still climbs steeply: taking the largest of the tied sizes keeps the choice on the
    plateau, where a noisy timing can only swap sizes of the same speed. Sizes stop at largest, at
    a batch slower than time_limit_s, or when a round would pass AUTO_ROUND_S.
    """
    rng = np.random.default_rng(0)
    batches, round_s = {}, 0.0
    size = 1
    while size <= largest:
        batch = rng.integers(0, 256, (size, *input_shape), np.uint8)
        classifier.predict_batch(batch)  # the first pass at a new shape builds kernels
        seconds = time_call(classifier.predict_batch, batch)
        if batches and (seconds > time_limit_s or round_s + seconds > AUTO_ROUND_S):
            break
        batches[size], round_s = batch, round_s + seconds
        size *= 2
    rates = {n: [] for n in batches}
    for number in range(AUTO_ROUNDS):
        for n in alternating(batches, number):
            rates[n].append(n / time_call(classifier.predict_batch, batches[n]))
    medians = {n: statistics.median(r) for n, r in rates.items()}
    best = max(medians.values())
    chosen = max(n for n in medians if medians[n] >= (1 - AUTO_TOLERANCE) * best)
    log.info("BATCH_SIZE=auto chose %d; medians of %d rounds:\n%s", chosen, AUTO_ROUNDS,
             "\n".join(f"  {n:4d} images  {n / rate * 1000:8.1f} ms  {rate:8.1f} img/s  "
                       f"{rate / best:6.3f} of the best{'  <- chosen' if n == chosen else ''}"
                       for n, rate in medians.items()))
    return chosen


def time_call(function, *args):
    started = time.perf_counter()
    function(*args)
    return time.perf_counter() - started
