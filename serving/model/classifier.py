"""Loading a Keras image classifier and running one forward pass per batch.

Only the model worker imports this module: the web tier never pays for importing TensorFlow."""
import os
import threading

import numpy as np

# One GPU holds more than one process here: a reload loads the new version beside the serving one,
# and `reload` checks the model where it runs. TensorFlow and JAX would each take most of the GPU's
# memory when they start, leaving the next too little; they take it as needed instead, unless the
# environment says otherwise. Set before either is imported (every import of Keras is below).
os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


from serving.model.catalog import APPLICATIONS, ModelLoadError

CHECK_TOP_K = 5


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


def device_name():
    """Where forward passes run: the first GPU if Keras' backend sees one, else the CPU."""
    if keras_backend() == "jax":  # Keras on JAX: used where TensorFlow's CUDA is missing
        import jax

        gpus = [device for device in jax.devices() if device.platform == "gpu"]
        return f"GPU:{gpus[0].id}" if gpus else "CPU"
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    return gpus[0].name.replace("/physical_device:", "") if gpus else "CPU"
