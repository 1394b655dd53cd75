"""The model's runtimes: OpenVINO computes what Keras computes, and a model it cannot convert
gets the documented behaviour (RUNTIME=openvino refuses, RUNTIME=auto serves with Keras)."""
import logging
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import ROOT
from serving.model import classifier
from serving.model.model_cache import CACHE_KEEP, SCRATCH_PREFIX, STALE_SCRATCH_S
from serving.model.openvino_runtime import check_agreement, openvino_model, use_openvino
from serving.model.classifier import Classifier
from serving.model.catalog import ModelLoadError
from serving.model.loader import load_classifier


def random_pixels(count, shape, seed=7):
    return np.random.default_rng(seed).integers(0, 256, (count, *shape), np.uint8)


def assert_same_answers(keras_probabilities, openvino_probabilities):
    assert np.abs(keras_probabilities - openvino_probabilities).max() <= 1e-4
    top5 = [np.argsort(-p, axis=1)[:, :5] for p in (keras_probabilities, openvino_probabilities)]
    assert (top5[0] == top5[1]).all()


def test_openvino_equals_keras_on_resnet50_with_seeded_weights(tmp_path):
    by_keras = load_classifier("resnet50", "none", seed=1234, runtime="keras")
    by_openvino = load_classifier("resnet50", "none", seed=1234, runtime="openvino",
                                  cache_dir=str(tmp_path))
    pixels = random_pixels(8, (224, 224, 3))

    assert (by_keras.runtime, by_openvino.runtime) == ("keras", "openvino")
    assert_same_answers(by_keras.predict_batch(pixels), by_openvino.predict_batch(pixels))
    assert len(list(tmp_path.glob("*.xml"))) == 1  # converted once, cached
    again = load_classifier("resnet50", "none", seed=1234, runtime="openvino",
                            cache_dir=str(tmp_path))
    assert len(list(tmp_path.glob("*.xml"))) == 1
    assert_same_answers(by_keras.predict_batch(pixels), again.predict_batch(pixels))


def test_with_two_lanes_a_batch_is_split_across_streams_with_the_same_answers(tmp_path):
    by_keras = load_classifier("resnet50", "none", seed=1234, runtime="keras")
    by_openvino = load_classifier("resnet50", "none", seed=1234, runtime="openvino",
                                  cache_dir=str(tmp_path), lanes=2)
    inputs = pixels = random_pixels(9, (224, 224, 3))  # uint8: the model does its preprocessing
    forward = by_openvino.forward

    assert [forward.compiled[split].get_property("NUM_STREAMS") for split in (False, True)] \
        == [1, 2]
    assert_same_answers(by_keras.predict_batch(pixels), forward.run(inputs, split=True))
    assert_same_answers(by_keras.predict_batch(pixels), forward.run(inputs, split=False))
    assert_same_answers(by_keras.predict_batch(pixels[:1]), forward.run(inputs[:1], split=True))

    chosen, run = [], forward.run

    def run_and_start_another_pass_during_the_first(inputs, split):
        chosen.append((len(inputs), split))
        if len(chosen) == 1:
            forward(inputs)
        return run(inputs, split)

    forward.run = run_and_start_another_pass_during_the_first
    forward(inputs[:1])
    forward(inputs[:1])
    forward(inputs)
    # One image alone on every core, one beside it on a stream, alone again, a batch split.
    assert chosen == [(1, False), (1, True), (1, False), (9, True)]


def test_the_cache_tells_models_apart(tmp_path):
    one = load_classifier("mobilenet_v2", "none", seed=1, runtime="openvino",
                          cache_dir=str(tmp_path))
    two = load_classifier("mobilenet_v2", "none", seed=2, runtime="openvino",
                          cache_dir=str(tmp_path))

    assert (one.runtime, two.runtime) == ("openvino", "openvino")
    weights = [path.read_bytes() for path in tmp_path.glob("*.bin")]
    assert len(weights) == 2 and weights[0] != weights[1]


def test_the_cache_keeps_the_models_used_last_and_removes_the_others(tmp_path, tiny_model):
    model = tiny_model["model"]
    versions = [f"version-{n}" for n in range(CACHE_KEEP + 2)]
    for version in versions[:CACHE_KEEP]:
        openvino_model(model, "none", version, str(tmp_path))
    openvino_model(model, "none", versions[0], str(tmp_path))  # served again: used last
    for version in versions[CACHE_KEEP:]:
        openvino_model(model, "none", version, str(tmp_path))

    kept = sorted([versions[0], *versions[3:]])
    assert sorted(path.stem for path in tmp_path.glob("*.xml")) == kept
    assert sorted(path.stem for path in tmp_path.glob("*.bin")) == kept
    assert [path.name for path in tmp_path.iterdir() if path.is_dir()] == []


KILLED_WHILE_CONVERTING = """
import os, signal, sys
from serving.model.model_cache import store
def save(path):
    with open(path[:-4] + ".bin", "wb") as weights:
        weights.write(bytes(1 << 20))
    os.kill(os.getpid(), signal.SIGKILL)
store(os.path.join(sys.argv[1], "killed.xml"), save)
"""


def test_a_conversion_killed_half_way_leaves_nothing_in_the_cache_after_an_hour(tmp_path,
                                                                                 tiny_model):
    """A process killed while it converted (a reload superseded, a worker stopped) leaves its
    scratch folder: the next model stored removes it once an hour has passed, and leaves alone
    one that a conversion going on now writes."""
    killed = subprocess.run([sys.executable, "-c", KILLED_WHILE_CONVERTING, str(tmp_path)],
                            cwd=ROOT)
    [left] = [path for path in tmp_path.iterdir() if path.is_dir()]
    hour_ago = time.time() - STALE_SCRATCH_S - 60
    os.utime(left, (hour_ago, hour_ago))
    converting_now = tmp_path / (SCRATCH_PREFIX + "now")
    converting_now.mkdir()

    openvino_model(tiny_model["model"], "none", "version-1", str(tmp_path))

    assert killed.returncode == -signal.SIGKILL
    assert [path.name for path in tmp_path.iterdir() if path.is_dir()] == [converting_now.name]
    assert not list(tmp_path.glob("killed.*"))


def unconvertible_classifier():
    """A small Keras model with a step OpenVINO has no operation for (a Python function)."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(0)
    inputs = keras.Input((8, 8, 1))
    features = keras.layers.Flatten()(inputs)
    features = keras.layers.Lambda(lambda x: tf.ensure_shape(
        tf.numpy_function(np.tanh, [x], tf.float32, stateful=False), x.shape),
        output_shape=(64,))(features)
    outputs = keras.layers.Dense(3, activation="softmax")(features)
    model = keras.Model(inputs, outputs)
    return Classifier(model, ["a", "b", "c"], "scale_0_1", "odd.keras", "none")


def test_runtime_openvino_refuses_a_model_it_cannot_convert_saying_why(tmp_path):
    odd = unconvertible_classifier()
    with pytest.raises(ModelLoadError, match="RUNTIME=openvino cannot serve odd.keras: .+"):
        use_openvino(odd, "odd", 0, str(tmp_path), required=True)


def test_runtime_auto_serves_a_model_it_cannot_convert_with_keras_and_says_so(tmp_path, caplog):
    odd = unconvertible_classifier()
    pixels = random_pixels(2, (8, 8, 1))
    expected = odd.predict_batch(pixels)

    with caplog.at_level(logging.WARNING, logger="serving.model.openvino_runtime"):
        use_openvino(odd, "odd", 0, str(tmp_path), required=False)

    assert odd.runtime == "keras"
    assert "serving odd.keras with Keras, not OpenVINO" in caplog.text
    assert np.array_equal(odd.predict_batch(pixels), expected)


def test_a_conversion_that_disagrees_with_keras_is_refused(tmp_path):
    # A forward pass that differs from Keras by 1e-3 in one probability fails the start-up check.
    model = load_classifier("resnet50", "none", seed=1234, runtime="keras")

    def off_by_a_little(inputs):
        probabilities = np.array(model.serving.predict_on_batch(inputs))
        probabilities[0, 0] += 1e-3
        return probabilities

    with pytest.raises(ModelLoadError, match="differs from Keras by up to 1.0e-03"):
        check_agreement(model, off_by_a_little)


def test_keras_on_jax_gets_batches_padded_to_a_power_of_two_one_at_a_time():
    sizes, running, most_at_once = [], [], []

    def forward(inputs):  # a stand-in forward pass that records how it was called
        running.append(1)
        most_at_once.append(len(running))
        time.sleep(0.01)  # long enough for the other threads to call in
        running.pop()
        sizes.append(len(inputs))
        return inputs.sum(axis=(1, 2, 3)) + np.arange(len(inputs))

    padded = classifier.padded_in_turns(forward)
    inputs = np.ones((3, 2, 2, 1), np.float32)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(padded, [inputs] * 8))

    assert sizes == [4] * 8 and max(most_at_once) == 1
    assert all(np.array_equal(result, [4.0, 5.0, 6.0]) for result in results)
