"""The forward pass's precision (PRECISION): FP32 as the model was given, BF16 or FP16 where the CPU
has units for them (OpenVINO's inference precision), INT8 quantized by NNCF's post-training
quantization from the user's own images (CALIBRATION_IMAGES). Every precision but FP32 is checked
against FP32 before it serves: top-1 agreement and the largest probability difference, on the
calibration images (or a seeded set where there are none). `auto` takes the fastest of FP32 and the
CPU's 16-bit precisions that passes, timed here at start, as BATCH_SIZE=auto times batch sizes.

Reduced precision is OpenVINO's: the model worker imports this module with the runtime."""
import hashlib
import json
import logging
import os
import statistics
import time

import numpy as np

from serving.model.meters import alternating
from serving.model.model_cache import cached, store

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16", "int8")
# OpenVINO's inference precision for each. INT8 computes its quantized layers in int8 and the rest
# in FP32, so that its check measures the quantization alone.
HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}
# The 16-bit precisions `auto` may take, by the capability OpenVINO reports for the CPU.
CAPABILITIES = {"bf16": "BF16", "fp16": "FP16"}
CALIBRATION_LIMIT = 300  # images read from CALIBRATION_IMAGES at most (NNCF's default subset)
SEEDED_IMAGES = 64  # the check's images without CALIBRATION_IMAGES
AUTO_ROUNDS = 3  # interleaved timings of each candidate for `auto`
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp")


class PrecisionRefused(RuntimeError):
    """A precision cannot serve: no calibration images for INT8, or its check failed."""


def hardware_precisions(core):
    """The 16-bit precisions this CPU has units for (OpenVINO's OPTIMIZATION_CAPABILITIES)."""
    capabilities = core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return [name for name, capability in CAPABILITIES.items() if capability in capabilities]


def read_images(folder, input_shape, limit=CALIBRATION_LIMIT):
    """The images of a folder (sorted by name, at most `limit`), decoded as uploads are, and a
    digest of what was read; PrecisionRefused if there are none."""
    from serving.errors import ServiceError
    from serving.images import prepare_image

    height, width, channels = input_shape
    names = sorted(name for name in os.listdir(folder) if name.lower().endswith(IMAGE_SUFFIXES))
    digest, pixels = hashlib.sha256(), []
    for name in names[:limit]:
        with open(os.path.join(folder, name), "rb") as f:
            data = f.read()
        try:
            pixels.append(prepare_image(data, (width, height), channels))
        except ServiceError as refusal:
            log.warning("calibration image %s left out: %s", name, refusal.message)
            continue
        digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    if not pixels:
        raise PrecisionRefused(f"CALIBRATION_IMAGES={folder!r} holds no image this model reads")
    return np.stack(pixels), digest.hexdigest()


def check_images(input_shape, folder):
    """The images a reduced precision is checked on: the calibration images, else a seeded set of
    random ones. Returns (pixels, what they are, their digest)."""
    if folder:
        pixels, digest = read_images(folder, input_shape)
        return pixels, f"{len(pixels)} images of CALIBRATION_IMAGES", digest
    pixels = np.random.default_rng(0).integers(0, 256, (SEEDED_IMAGES, *input_shape), np.uint8)
    return pixels, f"{SEEDED_IMAGES} seeded random images", "seeded"


def compare(reference, candidate, pixels, batch=16):
    """How a forward pass agrees with a reference one on `pixels`: the share of images whose top
    label is the same, and the largest difference of any probability."""
    agree, difference = 0, 0.0
    for start in range(0, len(pixels), batch):
        expected = np.asarray(reference(pixels[start:start + batch]))
        got = np.asarray(candidate(pixels[start:start + batch]))
        agree += int((expected.argmax(axis=1) == got.argmax(axis=1)).sum())
        difference = max(difference, float(np.abs(expected - got).max()))
    return {"top1_agreement": agree / len(pixels), "max_difference": difference}


def quantized(model, base_key, cache_dir, pixels, digest):
    """The INT8 version of an OpenVINO model (its preprocessing inside), by NNCF's post-training
    quantization on `pixels`; cached in cache_dir, named by everything that changes it."""
    import nncf
    import openvino

    key = hashlib.sha256(json.dumps([base_key, digest, nncf.__version__, openvino.__version__,
                                     len(pixels)]).encode()).hexdigest()[:24]
    xml = os.path.join(cache_dir, f"{key}-int8.xml")
    if cached(xml):
        log.info("INT8 model from the cache: %s", xml)
        return openvino.Core().read_model(xml)
    started = time.monotonic()
    model = nncf.quantize(model, nncf.Dataset(pixels, lambda image: image[None]),
                          subset_size=len(pixels))
    store(xml, lambda path: openvino.save_model(model, path))
    log.info("quantized to INT8 on %d calibration images in %.1f s: %s", len(pixels),
             time.monotonic() - started, xml)
    return model


def minimum_agreement(precision):
    """The least top-1 agreement with FP32 that `precision` must keep (settings.py)."""
    import settings

    return settings.MIN_TOP1_AGREEMENT_INT8 if precision == "int8" else settings.MIN_TOP1_AGREEMENT


def checked(precision, reference, candidate, pixels, source):
    """The check of `candidate` (a forward pass at `precision`) against FP32's `reference`,
    logged; PrecisionRefused if its top-1 agreement is under the setting's minimum."""
    report = {"precision": precision, **compare(reference, candidate, pixels), "images": source,
              "minimum_top1_agreement": minimum_agreement(precision)}
    passed = report["top1_agreement"] >= report["minimum_top1_agreement"]
    log.info("%s against FP32 on %s: top-1 agreement %.4f (at least %.4f), largest probability "
             "difference %.2e: %s", precision, source, report["top1_agreement"],
             report["minimum_top1_agreement"], report["max_difference"],
             "passes" if passed else "refused")
    if not passed:
        raise PrecisionRefused(f"{precision} agrees with FP32 on the top label of "
                               f"{report['top1_agreement']:.2%} of {source}, under the "
                               f"{report['minimum_top1_agreement']:.2%} required")
    return report


def fastest(forwards, pixels, rounds=AUTO_ROUNDS):
    """The precision whose forward pass is the fastest on a batch of `pixels`, timed in
    interleaved rounds (medians), with the table logged."""
    batch = pixels[:16]
    for forward in forwards.values():
        forward(batch)  # the first pass at a new shape builds kernels: not timed
    rates = {name: [] for name in forwards}
    for number in range(rounds):
        for name in alternating(forwards, number):
            started = time.perf_counter()
            forwards[name](batch)
            rates[name].append(len(batch) / (time.perf_counter() - started))
    medians = {name: statistics.median(rate) for name, rate in rates.items()}
    chosen = max(medians, key=medians.get)
    log.info("PRECISION=auto chose %s; images/s at a batch of %d, medians of %d rounds: %s",
             chosen, len(batch), rounds,
             ", ".join(f"{name} {rate:.1f}" for name, rate in medians.items()))
    return chosen
