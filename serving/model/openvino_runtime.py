"""The OpenVINO runtime: a Keras model converted, its forward pass on CPU streams, its precision,
and its check against Keras."""
import functools
import hashlib
import json
import logging
import os
import threading

import numpy as np

from serving.model.catalog import ModelLoadError
from serving.model.classifier import CHECK_TOP_K, PREPROCESSING
from serving.model.model_cache import cached, store

log = logging.getLogger(__name__)


# The start-up check of a converted model: on a seeded sample batch no probability may differ from
# Keras' by more than this, and each image's top CHECK_TOP_K labels must agree.
OPENVINO_ATOL = 1e-4

# OpenVINO's consent file for its usage telemetry, as its `opt_in_out` tool writes it.
TELEMETRY_CONSENT = os.path.join(os.path.expanduser("~"), "intel", "openvino_telemetry")


def decline_telemetry():
    """Turn OpenVINO's usage telemetry off, as `opt_in_out --opt_out` does, unless the user has
    chosen already; call it before anything imports openvino.

    Left on, `import openvino` and each conversion send events to Google Analytics from a process
    forked for each: the forks run on while their loader is held, and the thread that starts them
    stays in a fork server, which must have none when it forks.
    """
    if os.path.exists(TELEMETRY_CONSENT):
        return
    try:
        os.makedirs(os.path.dirname(TELEMETRY_CONSENT), exist_ok=True)
        with open(TELEMETRY_CONSENT, "w") as consent:
            consent.write("0")
    except OSError as exc:
        log.warning("could not turn OpenVINO's telemetry off in %s: %s", TELEMETRY_CONSENT, exc)


def use_openvino(classifier, key, threads, cache_dir, required, lanes=1):
    """Switch the classifier's forward pass to OpenVINO once the converted model matches Keras.

    If conversion or the check fails, RUNTIME=openvino refuses to serve (ModelLoadError), while
    RUNTIME=auto logs why and serves with Keras.
    """
    try:
        model = openvino_model(classifier.model, classifier.preprocess_name, key, cache_dir)
        forward = openvino_forward(model, threads, lanes)
        for split in forward.copies:
            check_agreement(classifier, functools.partial(forward.run, split=split))
    except Exception as exc:
        if required:
            raise ModelLoadError(f"RUNTIME=openvino cannot serve {classifier.name}: {exc}") from exc
        log.warning("serving %s with Keras, not OpenVINO: %s", classifier.name, exc)
        return
    classifier.forward, classifier.runtime = forward, "openvino"
    classifier.openvino_model, classifier.cache_key = model, key  # for other precisions
    classifier.model = classifier.serving = None  # the Keras copy's memory is not needed any more


def set_precision(classifier, precision, calibration, threads, cache_dir, lanes=1):
    """Serve at `precision`: fp32 as loaded; bf16, fp16 or int8 (quantized on the images of the
    folder `calibration`) once checked against fp32 (see precision.py); auto, the fastest of fp32
    and the CPU's 16-bit precisions that passes. Reduced precision is OpenVINO's: with Keras,
    auto is fp32 and any other refuses to serve. Raises ModelLoadError, saying why."""
    from serving.model import precision as reduced

    if precision == "fp32":
        return
    if classifier.runtime != "openvino":
        if precision == "auto":
            log.info("PRECISION=auto: fp32, the only precision of the Keras runtime here")
            return
        raise ModelLoadError(f"PRECISION={precision} needs the OpenVINO runtime (RUNTIME=auto on "
                             f"a CPU, or RUNTIME=openvino); {classifier.name} runs on Keras")
    if precision == "int8" and not calibration:
        raise ModelLoadError("PRECISION=int8 needs CALIBRATION_IMAGES, a folder of a few hundred "
                             "images like the ones served: it never quantizes on random data")
    import openvino

    try:
        pixels, source, digest = reduced.check_images(classifier.input_shape, calibration)
    except (OSError, reduced.PrecisionRefused) as exc:
        raise ModelLoadError(f"CALIBRATION_IMAGES={calibration!r}: {exc}") from exc
    offered = reduced.hardware_precisions(openvino.Core())
    if precision in reduced.CAPABILITIES and precision not in offered:
        raise ModelLoadError(f"PRECISION={precision}: this CPU has no {precision} units (OpenVINO "
                             f"finds {', '.join(offered) or 'no 16-bit ones'}); use fp32, int8 "
                             "or auto")
    candidates = offered if precision == "auto" else [precision]
    forwards, checks = {"fp32": classifier.forward}, {}
    for name in candidates:
        model = classifier.openvino_model if name != "int8" else reduced.quantized(
            classifier.openvino_model, classifier.cache_key, cache_dir, pixels, digest)
        forward = openvino_forward(model, threads, lanes, reduced.HINTS[name])
        try:
            checks[name] = reduced.checked(name, classifier.forward, forward, pixels, source)
        except reduced.PrecisionRefused as refusal:
            if precision != "auto":
                raise ModelLoadError(f"PRECISION={precision} refused: {refusal}") from refusal
            log.warning("PRECISION=auto: not %s: %s", name, refusal)
            continue
        forwards[name] = forward
    if precision != "auto":
        chosen = precision
    elif len(forwards) > 1:
        chosen = reduced.fastest(forwards, pixels)
    else:
        chosen = "fp32"
        log.info("PRECISION=auto: fp32, the only precision that passed its check here")
    classifier.forward, classifier.precision = forwards[chosen], chosen
    classifier.precision_check = checks.get(chosen)


def openvino_model(keras_model, preprocess, key, cache_dir):
    """An OpenVINO model of a Keras model, uint8 pixels in: converted once and cached as IR in
    cache_dir, its preprocessing put in front."""
    import openvino

    xml = os.path.join(cache_dir, f"{key}.xml")
    if not cached(xml):
        store(xml, lambda path: keras_model.export(path, format="openvino", verbose=False))
        log.info("converted the model to OpenVINO: %s", xml)
    return with_openvino_preprocessing(openvino.Core().read_model(xml), preprocess)


def openvino_forward(model, threads, lanes=1, hint="f32"):
    """An OpenVINO forward pass of an OpenVINO model for `lanes` threads, computing at the
    inference precision `hint`."""
    import openvino

    # The hint is always given: on a CPU with bf16 units OpenVINO would otherwise compute in bf16,
    # whose probabilities differ from FP32's in the third decimal.
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": hint}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    core = openvino.Core()
    alone = core.compile_model(model, "CPU", config)
    if lanes < 2 or 0 < threads < lanes:  # one lane, or too few threads for a stream each
        return OpenVINOForward(alone, alone)
    # One stream per lane, the threads split between them.
    return OpenVINOForward(alone, core.compile_model(
        model, "CPU", {**config, "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": lanes}))


def with_openvino_preprocessing(model, preprocess):
    """An OpenVINO model with its preprocessing (PREPROCESSING) in front, by OpenVINO's
    PrePostProcessor: uint8 pixels in, channels last."""
    import openvino
    from openvino.preprocess import PrePostProcessor

    reverse, mean, scale = PREPROCESSING[preprocess]
    steps = PrePostProcessor(model)
    steps.input().tensor().set_element_type(openvino.Type.u8).set_layout(openvino.Layout("NHWC"))
    steps.input().model().set_layout(openvino.Layout("NHWC"))
    steps.input().preprocess().convert_element_type(openvino.Type.f32)
    if reverse:
        steps.input().preprocess().reverse_channels()
    if np.any(mean):
        steps.input().preprocess().mean(list(mean) if isinstance(mean, tuple) else float(mean))
    if scale != 1:
        steps.input().preprocess().scale(float(scale))
    return steps.build()


class OpenVINOForward:
    """Runs each pass on one of two compiled copies of the model: `alone`, one stream on every
    core, for a single image when no other pass is running; `streams`, one stream per lane, for
    every other pass, its batch split into one part per stream.

    On the one-stream copy a pass runs a thread on every core, and its threads wait for each
    other after every layer: when a neighbour (the web tier, Redis) takes a core from one thread,
    all of that pass's threads wait, and two such passes at once would each want every core. On
    the streams, each part is computed by its stream's threads alone, and the parts of passes in
    two lanes queue for the streams: a stream that finishes its part takes the next one, so no
    core waits for another pass to end. A single image alone still uses every core, for the
    latency of light load. Each thread (batch lane) has its own infer requests.
    """

    def __init__(self, alone, streams):
        self.compiled = {False: alone, True: streams}
        self.streams = streams.get_property("NUM_STREAMS") if streams is not alone else 1
        self.copies = (False, True) if self.streams > 1 else (False,)  # run()'s `split`
        self.local, self.lock, self.running = threading.local(), threading.Lock(), 0

    def __call__(self, inputs):
        with self.lock:
            split = self.running > 0 or len(inputs) > 1
            self.running += 1
        try:
            return self.run(inputs, split and self.streams > 1)
        finally:
            with self.lock:
                self.running -= 1

    def warm_streams(self, inputs):
        """A pass on every stream at once at the shape of this batch's parts: a stream's first
        pass at a new shape builds its kernels (ResNet50 at 16: 1.5 s instead of 1.1)."""
        if self.streams < 2:
            return
        part = np.array_split(inputs, min(self.streams, len(inputs)))[0]
        requests = [self.compiled[True].create_infer_request() for _ in range(self.streams)]
        for request in requests:  # started together, each takes a stream of its own
            request.start_async([part], share_inputs=True)
        for request in requests:
            request.wait()

    def run(self, inputs, split):
        """One pass on the one-stream copy, or split into a part per stream of the other."""
        requests = self.local.__dict__.setdefault("requests", {})
        if split not in requests:
            requests[split] = [self.compiled[split].create_infer_request()
                               for _ in range(self.streams if split else 1)]
        # The runtime reads the batch where it lies (share_inputs): the caller does not change
        # it until the pass has ended.
        if not split:
            return requests[False][0].infer([inputs], share_inputs=True)[0]
        parts = np.array_split(inputs, min(self.streams, len(inputs)))
        for request, part in zip(requests[True], parts):
            request.start_async([part], share_inputs=True)
        outputs = []
        for request, _ in zip(requests[True], parts):
            request.wait()
            outputs.append(request.get_output_tensor(0).data.copy())
        return np.concatenate(outputs)


def check_agreement(classifier, forward, images=4, seed=0):
    """Raise if `forward` disagrees with the Keras model on a seeded batch of random images."""
    pixels = np.random.default_rng(seed).integers(
        0, 256, (images, classifier.size[1], classifier.size[0], classifier.channels), np.uint8)
    expected = np.asarray(classifier.serving.predict_on_batch(pixels))
    got = np.asarray(forward(pixels))
    if got.shape != expected.shape:
        raise ModelLoadError(f"the converted model returns shape {got.shape}, not "
                             f"{expected.shape}")
    difference = float(np.abs(got - expected).max())
    k = min(CHECK_TOP_K, expected.shape[1])
    # A label counts as agreeing if Keras rates it within the tolerance of its own k-th best:
    # two labels tied to 1e-7 may swap places without either runtime being wrong.
    kth = np.sort(expected, axis=1)[:, -k][:, None]
    top = np.argsort(-got, axis=1)[:, :k]
    agree = bool((np.take_along_axis(expected, top, axis=1) >= kth - OPENVINO_ATOL).all())
    log.info("OpenVINO against Keras on %d images: largest difference %.1e, top-%d %s",
             images, difference, k, "agrees" if agree else "differs")
    if difference > OPENVINO_ATOL or not agree:
        raise ModelLoadError(f"the converted model differs from Keras by up to {difference:.1e} "
                             f"(allowed {OPENVINO_ATOL:.0e}); top-{k} agreement: {agree}")


def cache_key(model, weights, seed, version):
    """Name of a converted model: what was loaded (file contents, not paths), the version, and
    the converters' versions."""
    import keras
    import openvino

    def identity(name):
        if not os.path.isfile(name):
            return name
        with open(name, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    parts = [identity(model), identity(weights), seed if weights == "none" else "", version,
             keras.__version__, openvino.__version__]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]
