"""Loading a Keras image classifier and running one forward pass per batch.

Only the model worker imports this module: the web tier never pays for importing TensorFlow.
"""
import json
import logging
import os

import numpy as np

log = logging.getLogger(__name__)

IMAGENET_CLASS_INDEX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data",
                                    "imagenet_class_index.json")

# Named models from keras.applications: constructor name and its preprocessing.
APPLICATIONS = {
    "resnet50": ("ResNet50", "resnet50"),
    "mobilenet_v2": ("MobileNetV2", "mobilenet_v2"),
}


class ModelLoadError(RuntimeError):
    """The model, its weights or its labels cannot be loaded; the message says how to fix it."""


def preprocessing(name):
    """The batch preprocessing function called `name`, taking and returning float32 arrays."""
    from keras.applications import mobilenet_v2, resnet50

    functions = {
        "resnet50": resnet50.preprocess_input,
        "mobilenet_v2": mobilenet_v2.preprocess_input,
        "scale_0_1": lambda x: x / 255.0,
        "none": lambda x: x,
    }
    return functions[name]


class Classifier:
    """A loaded model with its labels and preprocessing; predicts whole batches."""

    def __init__(self, model, labels, preprocess, name, weights, version="1"):
        _, height, width, channels = model.input_shape
        if model.output_shape[-1] != len(labels):
            raise ModelLoadError(f"the model has {model.output_shape[-1]} outputs but "
                                 f"{len(labels)} labels were given")
        self.model = model
        self.labels = labels
        self.preprocess = preprocessing(preprocess)
        self.preprocess_name = preprocess
        self.name = name
        self.weights = weights
        self.version = version
        self.size = (width, height)
        self.channels = channels

    def predict_batch(self, pixels):
        """Class probabilities for a uint8 batch of shape (n, height, width, channels)."""
        inputs = self.preprocess(pixels.astype(np.float32))
        probabilities = np.asarray(self.model.predict_on_batch(inputs))
        if probabilities.shape != (len(pixels), len(self.labels)):
            raise RuntimeError(f"model returned shape {probabilities.shape} for "
                               f"{len(pixels)} inputs")
        return probabilities

    def top_predictions(self, probabilities, k):
        """The k most probable labels of one image, in the tutorial's response shape."""
        best = np.argsort(probabilities)[::-1][:k]
        return [{"label": self.labels[i], "probability": float(probabilities[i])} for i in best]


def load_classifier(model, weights, labels="", preprocess="", seed=0, threads=0, version="1"):
    """Load a named keras.applications model or a saved model file, ready to predict."""
    import tensorflow as tf

    if threads:
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
    return Classifier(keras_model, load_labels(labels), preprocess, model, weights, version)


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
        return keras.models.load_model(path, compile=False)
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


def device_name():
    """Where forward passes run: the first GPU if TensorFlow sees one, else the CPU."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return gpus[0].name.replace("/physical_device:", "") if gpus else "CPU"
