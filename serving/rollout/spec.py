"""A model version's spec: read from the settings, its files checked, its model loaded."""
import json
import os

import settings
from serving.model.catalog import APPLICATIONS, ModelLoadError

# glibc gives each thread that allocates an arena of its own, up to 8 per core, and each arena
# keeps some of what it frees. A model process's threads (the runtime's pools, the lanes, the
# decoding pool) share two (unless set otherwise), so that what they keep does not grow with the
# machine's cores.
MALLOC_ARENAS = "2"


def spec_from_settings():
    """The model the settings name (served until a `reload` records another)."""
    return {"model": settings.MODEL, "weights": settings.MODEL_WEIGHTS, "labels": settings.LABELS,
            "preprocess": settings.PREPROCESS, "version": settings.MODEL_VERSION,
            "precision": settings.PRECISION, "calibration_images": settings.CALIBRATION_IMAGES}


def spec_text(spec):
    """A spec as heartbeats carry it: JSON with sorted keys, so equal specs compare equal."""
    return json.dumps({name: str(value) for name, value in spec.items()}, sort_keys=True)


def files_named(spec):
    """The files (and folders) a model spec names: its model, weights, labels and calibration
    images, where they are paths rather than names (resnet50, imagenet, none, ...)."""
    paths = [spec["model"]] if spec["model"] not in APPLICATIONS else []
    paths += [spec["weights"]] if spec["weights"] not in ("imagenet", "none") else []
    return paths + [spec[name] for name in ("labels", "calibration_images") if spec.get(name)]


def check_files(spec):
    """ModelLoadError unless every file the spec names is under MODELS_DIR or is one this
    process's own settings name: whoever can write to Redis must not make the workers load (and,
    with a legacy model's layers, run) whatever file they can reach."""
    root = os.path.realpath(settings.MODELS_DIR)
    own = {os.path.realpath(path) for path in files_named(spec_from_settings())}
    for path in files_named(spec):
        real = os.path.realpath(path)
        if real not in own and os.path.commonpath([real, root]) != root:
            raise ModelLoadError(f"{path} is not under MODELS_DIR ({root}): a version given by "
                                 "`reload` may only name files there")


def load_model(spec):
    """Load the classifier a model spec describes, once check_files passes it (raises
    catalog.ModelLoadError)."""
    from serving.model.loader import load_classifier

    check_files(spec)
    # (A spec recorded by a version before precisions takes the worker's own settings.)
    return load_classifier(spec["model"], spec["weights"], spec["labels"], spec["preprocess"],
                           settings.MODEL_SEED, settings.MODEL_THREADS, spec["version"],
                           settings.RUNTIME, settings.OPENVINO_CACHE_DIR,
                           settings.BATCHES_IN_FLIGHT, spec.get("precision") or settings.PRECISION,
                           spec.get("calibration_images", settings.CALIBRATION_IMAGES))
