"""Loading a classifier: a Keras model with its labels and preprocessing, on the runtime and
precision asked for."""
import logging
import os

from serving.model.catalog import APPLICATIONS, ModelLoadError, load_labels
from serving.model.classifier import (
    Classifier,
    build_application,
    device_name,
    keras_backend,
    load_model_file,
)
from serving.model.openvino_runtime import (
    cache_key,
    set_precision,
    use_openvino,
)

log = logging.getLogger(__name__)


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
