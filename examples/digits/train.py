"""Train a small CNN on scikit-learn's bundled digits and save it for the service.

    python examples/digits/train.py --out models/digits
    MODEL=models/digits/digits.keras LABELS=models/digits/labels.txt PREPROCESS=scale_0_1 \
        python run_keras_server.py
    curl -F image=@models/digits/heldout/0000.png http://localhost:5000/predict

It writes digits.keras, labels.txt, the held-out digits as 8x8 grayscale PNG files in heldout/
with their true labels in heldout/labels.json, and 300 of the training digits in calibration/, for
INT8 (PRECISION=int8 CALIBRATION_IMAGES=models/digits/calibration). Training takes seconds on a
CPU.
"""
import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image


def load_digits_uint8():
    """The 1,797 digits as uint8 images (8x8, 0-255) and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.round(digits.images * 255 / 16).astype(np.uint8), digits.target


def build_model():
    import keras

    return keras.Sequential([
        keras.Input((8, 8, 1)),
        keras.layers.Conv2D(16, 3, padding="same", activation="relu"),
        keras.layers.Conv2D(32, 3, padding="same", activation="relu"),
        keras.layers.MaxPooling2D(),
        keras.layers.Flatten(),
        keras.layers.Dense(64, activation="relu"),
        keras.layers.Dense(10, activation="softmax"),
    ])


def train(out, seed=0, epochs=30):
    """Train on 80% of the digits, save the model and the held-out 20%; returns test accuracy."""
    import keras
    from sklearn.model_selection import train_test_split

    keras.utils.set_random_seed(seed)
    images, labels = load_digits_uint8()
    train_x, test_x, train_y, test_y = train_test_split(images, labels, test_size=0.2,
                                                        random_state=0, stratify=labels)
    model = build_model()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    # The service's `scale_0_1` preprocessing: uint8 pixels / 255.
    model.fit(train_x[..., None] / 255.0, train_y, epochs=epochs, batch_size=32, verbose=0)
    _, accuracy = model.evaluate(test_x[..., None] / 255.0, test_y, verbose=0)

    out = Path(out)
    (out / "heldout").mkdir(parents=True, exist_ok=True)
    (out / "calibration").mkdir(exist_ok=True)
    model.save(out / "digits.keras")
    (out / "labels.txt").write_text("".join(f"{digit}\n" for digit in range(10)))
    for i, image in enumerate(test_x):
        Image.fromarray(image, "L").save(out / "heldout" / f"{i:04d}.png")
    for i, image in enumerate(train_x[:300]):  # images like the ones served: INT8's calibration
        Image.fromarray(image, "L").save(out / "calibration" / f"{i:04d}.png")
    (out / "heldout" / "labels.json").write_text(json.dumps([int(y) for y in test_y]))
    return accuracy


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="models/digits", help="folder to write the model into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights' initialization")
    parser.add_argument("--epochs", type=int, default=30)
    args = parser.parse_args()
    accuracy = train(args.out, args.seed, args.epochs)
    print(f"held-out accuracy {accuracy:.3f}; model in {args.out}/digits.keras")


if __name__ == "__main__":
    main()
