"""Loading a Keras image classifier and running one forward pass per batch.

Only the model worker imports this module: the web tier never pays for importing TensorFlow.
"""
import functools
import hashlib
import json
import logging
import os
import statistics
import tempfile
import threading
import time

import numpy as np

log = logging.getLogger(__name__)

# One GPU holds more than one process here: a reload loads the new version beside the serving one,
# and `reload` checks the model where it runs. TensorFlow and JAX would each take most of the GPU's
# memory when they start, leaving the next too little; they take it as needed instead, unless the
# environment says otherwise. Set before either is imported (every import of Keras is below).
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

IMAGENET_CLASS_INDEX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                                    "imagenet_class_index.json")

# Named models from keras.applications: constructor name and its preprocessing.
APPLICATIONS = {
    "resnet50": ("ResNet50", "resnet50"),
    "mobilenet_v2": ("MobileNetV2", "mobilenet_v2"),
}


# The start-up check of a converted model: on a seeded sample batch no probability may differ from
# Keras' by more than this, and each image's top CHECK_TOP_K labels must agree.
OPENVINO_ATOL = 1e-4
CHECK_TOP_K = 5


class ModelLoadError(RuntimeError):
    """The model, its weights or its labels cannot be loaded; the message says how to fix it."""


# Each preprocessing as (reverse the channels?, mean, scale): the model takes (pixels - mean) / scale,
# in float32, of its uint8 pixels (with their channels' order reversed first, RGB to BGR). The
# named models' are keras.applications' own: ResNet50's "caffe" mode, MobileNetV2's "tf" mode.
PREPROCESSING = {
    "resnet50": (True, (103.939, 116.779, 123.68), 1.0),
    "mobilenet_v2": (False, 127.5, 127.5),
    "scale_0_1": (False, 0.0, 255.0),
    "none": (False, 0.0, 1.0),
}


class Classifier:
    """A loaded model with its labels and preprocessing; predicts whole batches of uint8 pixels.

    The preprocessing runs inside the runtime, as part of the model (Keras layers, OpenVINO's
    PrePostProcessor): the worker hands over the pixels as the queue carried them, a quarter of
    float32's bytes, and does no work per pixel itself.
    """

    def __init__(self, model, labels, preprocess, name, weights, version="1"):
        _, height, width, channels = model.input_shape
        if model.output_shape[-1] != len(labels):
            raise ModelLoadError(f"the model has {model.output_shape[-1]} outputs but "
                                 f"{len(labels)} labels were given")
        self.model = model  # float32 in, preprocessed: what OpenVINO converts
        self.serving = with_preprocessing(model, preprocess)  # uint8 pixels in
        self.forward = self.serving.predict_on_batch  # uint8 batch in, probabilities out
        if keras_backend() == "jax":
            import jax

            self.forward = padded_in_turns(self.forward, jax.device_put)
        self.runtime = "keras"
        self.precision, self.precision_check = "fp32", None  # see set_precision
        self.labels = labels
        self.preprocess_name = preprocess
        self.name = name
        self.weights = weights
        self.version = version
        self.size = (width, height)
        self.channels = channels
        self.input_shape = (height, width, channels)  # of one image, as the queue's jobs carry

    def predict_batch(self, pixels):
        """Class probabilities for a uint8 batch of shape (n, height, width, channels)."""
        probabilities = np.asarray(self.forward(pixels))
        if probabilities.shape != (len(pixels), len(self.labels)):
            raise RuntimeError(f"model returned shape {probabilities.shape} for "
                               f"{len(pixels)} inputs")
        return probabilities

    def top_predictions(self, probabilities, k):
        """The k most probable labels of one image, in the tutorial's response shape."""
        best = np.argsort(probabilities)[::-1][:k]
        return [{"label": self.labels[i], "probability": float(probabilities[i])} for i in best]

    def classification(self, probabilities, k):
        """The k most probable classes of one image as the Open Inference Protocol's
        classification extension writes them: "value:index:label"."""
        best = np.argsort(probabilities)[::-1][:k]
        return [f"{np.format_float_positional(np.float32(probabilities[i]))}:{i}:{self.labels[i]}"
                for i in best]


def load_classifier(model, weights, labels="", preprocess="", seed=0, threads=0, version="1",
                    runtime="keras", cache_dir="", lanes=1, precision="fp32", calibration=""):
    """Load a named keras.applications model or a saved model file, ready to predict with
    `runtime` (auto, keras or openvino) at `precision` (see set_precision; `calibration`: a
    folder of images) from `lanes` threads at once."""
    if threads and keras_backend() == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
    if model in APPLICATIONS:
        keras_model = build_application(model, weights, seed)
        preprocess = preprocess or APPLICATIONS[model][1]
    elif os.path.isfile(model):
        keras_model = load_model_file(model)
        preprocess = preprocess or "none"
    else:
        raise ModelLoadError(f"MODEL={model!r} is neither one of {', '.join(APPLICATIONS)} nor "
                             "an existing .keras/.h5 file")
    classifier = Classifier(keras_model, load_labels(labels), preprocess, model, weights, version)
    if runtime == "openvino" or (runtime == "auto" and device_name() == "CPU"):
        key = cache_key(model, weights, seed, version)
        use_openvino(classifier, key, threads, cache_dir, required=runtime == "openvino",
                     lanes=lanes)
    set_precision(classifier, precision, calibration, threads, cache_dir, lanes)
    return classifier


def with_preprocessing(model, preprocess):
    """A Keras model of `model` with its preprocessing (PREPROCESSING) in front: uint8 pixels in."""
    import keras

    reverse, mean, scale = PREPROCESSING[preprocess]
    pixels = keras.Input(model.input_shape[1:], dtype="uint8")
    inputs = keras.ops.cast(pixels, "float32")
    if reverse:
        inputs = keras.ops.flip(inputs, axis=-1)
    if np.any(mean):
        inputs = inputs - np.asarray(mean, np.float32)
    if scale != 1:
        inputs = inputs / np.float32(scale)
    return keras.Model(pixels, model(inputs))


def build_application(name, weights, seed):
    """Build a keras.applications model with ImageNet, file or seeded random weights."""
    import keras

    constructor = getattr(keras.applications, APPLICATIONS[name][0])
    if weights == "none":
        keras.utils.set_random_seed(seed)  # same seed, same weights in every process
        return constructor(weights=None)
    if weights == "imagenet":
        try:
            return constructor(weights="imagenet")
        except Exception as exc:
            raise ModelLoadError(
                f"cannot load the ImageNet weights of {name} ({exc}). Give this machine internet "
                "access once (Keras caches them in ~/.keras/models), or download the weights file "
                "elsewhere and set MODEL_WEIGHTS=/path/to/weights.h5, or set MODEL_WEIGHTS=none "
                "for random weights (tests and benchmarks only)") from exc
    if not os.path.isfile(weights):
        raise ModelLoadError(f"MODEL_WEIGHTS={weights!r}: no such file; use 'imagenet', 'none' or "
                             "the path of a weights file")
    model = constructor(weights=None)
    try:
        model.load_weights(weights)
    except Exception as exc:
        raise ModelLoadError(f"cannot load weights from {weights}: {exc}") from exc
    return model


def load_model_file(path):
    """Load a saved Keras model (.keras or .h5) for inference."""
    import keras

    try:
        # safe_mode: a legacy .h5 file's Lambda layers hold Python code, which is not run.
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the Keras model {path}: {exc}") from exc


def load_labels(path):
    """Labels by output index: ImageNet's shipped index by default, else a text or JSON file."""
    path = path or IMAGENET_CLASS_INDEX
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ModelLoadError(f"cannot read labels from {path}: {exc}") from exc
    if not path.endswith(".json"):
        return [line.strip() for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if isinstance(data, list):
        return [str(label) for label in data]
    # Keras' class-index format: {"0": ["n01440764", "tench"], ...} or plain {"0": "tench"}.
    entries = [data[str(i)] for i in range(len(data))]
    return [entry[-1] if isinstance(entry, list) else str(entry) for entry in entries]


def padded_in_turns(forward, to_device=lambda batch: batch):
    """A forward pass fit for Keras on JAX: batches padded to a power of two, one at a time.

    JAX compiles the model again for every new batch size (seconds each): padded, a worker meets a
    handful of sizes, all compiled while it warms up. And Keras on JAX swaps the model's state
    arrays during a call: two lanes calling at once fail ("Array has been deleted"). A batch is
    sent to the device (to_device, jax.device_put) before it waits for its turn, so that its
    transfer overlaps the other lane's pass.
    """
    turns = threading.Lock()

    def padded_forward(inputs):
        size = 1 << (len(inputs) - 1).bit_length()
        padding = np.zeros((size - len(inputs), *inputs.shape[1:]), inputs.dtype)
        batch = to_device(np.concatenate([inputs, padding]))
        with turns:
            return np.asarray(forward(batch))[:len(inputs)]
    return padded_forward


def keras_backend():
    """The backend Keras runs on (KERAS_BACKEND): tensorflow unless set otherwise."""
    import keras

    return keras.backend.backend()


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
    import precision as reduced

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
    if not os.path.isfile(xml):
        os.makedirs(cache_dir, exist_ok=True)
        # Workers starting together may convert at once: each writes its own folder and renames
        # the weights, then the graph (the file the check above looks for) into place.
        with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
            keras_model.export(os.path.join(scratch, "model.xml"), format="openvino",
                               verbose=False)
            os.replace(os.path.join(scratch, "model.bin"), xml[:-4] + ".bin")
            os.replace(os.path.join(scratch, "model.xml"), xml)
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


def device_name():
    """Where forward passes run: the first GPU if Keras' backend sees one, else the CPU."""
    if keras_backend() == "jax":  # Keras on JAX: used where TensorFlow's CUDA is missing
        import jax

        gpus = [device for device in jax.devices() if device.platform == "gpu"]
        return f"GPU:{gpus[0].id}" if gpus else "CPU"
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return gpus[0].name.replace("/physical_device:", "") if gpus else "CPU"


# --- Warm-up and batch sizing -------------------------------------------------------------

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
# Sizes this close to the best median throughput count as tied, and the largest of them wins. On
# a flat curve, sizes of the same speed differ by 3-4% between runs (OpenVINO here: 28.8 img/s at
# 4 and 27.9 at 8-32, all within 2% of each other in another timing), and the service gains from
# the larger ones: each batch also costs the worker a claim and a store in Redis. 5% is what
# bench/batch_choice.py counts as a good size.
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
        for n in (batches if number % 2 == 0 else reversed(batches)):
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
