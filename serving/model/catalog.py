"""What a model spec may name, known without loading a model or importing numpy: the named
applications, the labels' files, and the error that refuses a model. `reload` checks a spec with
it beside serving workers, where every import costs the forward passes CPU."""
import json
import os

from serving import ROOT

IMAGENET_CLASS_INDEX = os.path.join(ROOT, "data", "imagenet_class_index.json")

# Named models from keras.applications: constructor name and its preprocessing.
APPLICATIONS = {
    "resnet50": ("ResNet50", "resnet50"),
    "mobilenet_v2": ("MobileNetV2", "mobilenet_v2"),
}


class ModelLoadError(RuntimeError):
    """The model, its weights or its labels cannot be loaded; the message says how to fix it."""


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
