"""Pure helpers shared by the web tier, the model worker and the tests.

Image bytes to pixels, pixels to and from base64, Redis key names, and the service's one error
type. Nothing here imports Flask or Keras.
"""
import io
import os
from urllib.parse import unquote, urlsplit

import numpy as np
import pybase64
from PIL import Image, ImageOps

# Pillow's own bomb check would raise only past twice its limit; ours (MAX_IMAGE_PIXELS) is applied
# explicitly before decoding, so the library's is switched off to keep one rule.
Image.MAX_IMAGE_PIXELS = None

WHITE = (255, 255, 255, 255)
SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}


class ServiceError(Exception):
    """A request refused or unfinished: `message` goes to the client with HTTP `status`."""

    def __init__(self, message, status=400, headers=None, body=None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.headers = headers or {}
        self.body = body or {}  # more fields of the error's JSON body


def prepare_image(data, size, channels=3, max_pixels=None, formats=None):
    """Decode image bytes into a uint8 array of shape (height, width, channels) for the model.

    `size` is (width, height). Raises ServiceError(400/413) for anything that is not a usable image.
    """
    return decode_image(open_image(data, size, channels, max_pixels, formats), size, channels)


def open_image(data, size, channels=3, max_pixels=None, formats=None):
    """Read an image's header (no pixels yet), refusing bombs; JPEGs are set to decode reduced."""
    if not data:
        raise ServiceError("the uploaded file is empty", 400)
    try:
        image = Image.open(io.BytesIO(data), formats=formats)
    except Image.UnidentifiedImageError as exc:
        allowed = ", ".join(formats) if formats else "any format Pillow reads"
        raise ServiceError(f"the upload is not an image in an accepted format ({allowed})", 400) from exc
    except Exception as exc:  # Pillow raises many types on hostile headers
        raise ServiceError(f"cannot read the image header: {exc}", 400) from exc
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise ServiceError(
            f"image is {image.width}x{image.height} pixels, more than the {max_pixels} allowed", 413
        )
    try:
        # JPEG can decode at 1/2, 1/4 or 1/8 scale straight from the DCT: far cheaper for photos.
        image.draft("RGB" if channels == 3 else "L", (max(size), max(size)))
    except Exception as exc:
        raise ServiceError(f"cannot read the image header: {exc}", 400) from exc
    return image


# Peak bytes per pixel while an image decodes. Pillow holds a multi-band pixel in 4 bytes, and
# decoding makes up to four such copies at full size: measured 15.2 for WebP (its decoder's own
# buffers), 8.6 for palette images with transparency, 7.7 for RGBA, 4 for RGB.
DECODING_BYTES_PER_PIXEL = 16


def decoding_bytes(image):
    """Peak bytes that decoding an image opened by open_image takes, estimated from its header."""
    return image.width * image.height * DECODING_BYTES_PER_PIXEL


def decode_image(image, size, channels=3):
    """Decode an image opened by open_image into the model's input (see prepare_image)."""
    try:
        return _decode(image, size, channels)
    except Exception as exc:  # truncated or corrupt data surfaces only while decoding
        raise ServiceError(f"cannot decode the image: {exc}", 400) from exc


def _decode(image, size, channels):
    image.load()
    # Reduce by a whole factor first (a box average), so that the conversions below touch a small
    # image, and the bilinear resize still sees at least twice the target. Palette, bilevel and
    # 16-bit pixels cannot be averaged as they are: they are widened or narrowed first.
    if image.mode in ("P", "1"):
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode in SIXTEEN_BIT_MODES:
        image = to_mode(image, "L")
    factor = min(image.size) // (2 * max(size))
    if factor > 1:
        image = image.reduce(factor)
    image = ImageOps.exif_transpose(image)
    image = to_mode(image, "RGB" if channels == 3 else "L")
    if image.size != tuple(size):
        image = image.resize(tuple(size), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.uint8)
    return pixels.reshape(pixels.shape[0], pixels.shape[1], channels)


def to_mode(image, mode):
    """Convert any Pillow mode to `mode` ("RGB" or "L"): alpha over white, 16-bit scaled to 8."""
    if image.mode in SIXTEEN_BIT_MODES:
        wide = np.asarray(image)  # uint16 (or int32 for mode I): no wider copy
        image = Image.fromarray((np.clip(wide, 0, 65535) // 257).astype(np.uint8), "L")
    elif image.mode == "F":
        image = Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or (
        image.mode == "P" and "transparency" in image.info
    ):
        image = Image.alpha_composite(Image.new("RGBA", image.size, WHITE), image.convert("RGBA"))
    return image if image.mode == mode else image.convert(mode)


# Every image crosses base64 twice on its way to the model. pybase64's SIMD codec takes about
# 0.01 ms each way for ResNet50's 150 kB of pixels, where the standard library's took 0.38 ms to
# encode and 0.49 ms to decode them, in the path of every request. (Its decoder is fast only when
# validating: text that is not strict base64 raises binascii.Error.)

def encode_array(array, dtype=np.uint8):
    """Serialize an array as base64 text of its little-endian bytes (JSON-safe). Pixels travel as
    uint8: a quarter of float32's bytes."""
    little = np.dtype(dtype).newbyteorder("<")
    return pybase64.b64encode_as_string(np.ascontiguousarray(array, dtype=little))


def decode_array(text, shape, dtype=np.uint8):
    """Inverse of encode_array: base64 text and a shape back to an array."""
    array = np.frombuffer(pybase64.b64decode(text, validate=True),
                          dtype=np.dtype(dtype).newbyteorder("<"))
    return array.reshape(shape)


def model_name(model):
    """A model's name in the Open Inference Protocol: a named model's (MODEL=resnet50), or its
    file's name without the extension."""
    return os.path.splitext(os.path.basename(model))[0]


def is_whole_number(text):
    """Whether text is a whole number in ASCII digits that int() takes: at most 18 of them (str's
    isdigit() alone takes "٣" and "²", and int() refuses over 4300 digits)."""
    return text.isascii() and text.isdigit() and len(text) <= 18


def sentinel_address(url):
    """(sentinels [(host, port)], master name, db, username, password) of a URL
    redis+sentinel://[user:password@]host:port[,host:port...]/MASTER[/db]; ValueError if bad."""
    nodes, path, username, password = nodes_url(url)
    master, db = (path + ["0"])[:2] if path else (None, None)
    if not master or len(path) > 2 or not is_whole_number(db):
        raise ValueError("expected redis+sentinel://host:port[,host:port...]/MASTER_NAME[/db]")
    return nodes, master, int(db), username, password


def cluster_address(url):
    """(nodes [(host, port)], username, password) of a URL
    redis+cluster://[user:password@]host:port[,host:port...]; ValueError if bad."""
    nodes, path, username, password = nodes_url(url)
    if path not in ([], ["0"]):
        raise ValueError("a Redis Cluster has one database, 0")
    return nodes, username, password


def nodes_url(url):
    """A URL naming several Redis nodes: (nodes, path parts, username, password)."""
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ValueError("options (?...) are not read from this URL")
    nodes = []
    for address in parts.netloc.rpartition("@")[2].split(","):
        host, colon, port = address.rpartition(":")
        if not (colon and host and is_whole_number(port) and 0 < int(port) < 65536):
            raise ValueError(f"{address!r} is not host:port")
        nodes.append((host.strip("[]"), int(port)))
    path = [unquote(part) for part in parts.path.split("/") if part]
    return (nodes, path, unquote(parts.username) if parts.username else None,
            unquote(parts.password) if parts.password else None)


class Keys:
    """Every Redis key the service uses, built from one prefix (the queue's name).

    On Redis Cluster a script or a transaction may touch only keys of one hash slot. The queue's
    own key is its name (what KEDA's scaler and operators watch); every other key starts with
    the hash tag {name}, which hashes as the bare name does: all of a queue's keys share its slot.
    """

    def __init__(self, queue):
        self.queue = queue
        self.tag = f"{{{queue}}}"
        self.workers = f"{self.tag}:workers"
        # The model rollouts (see rollout.py): the model every worker should serve, the
        # accepted versions (newest last, for start-ups and --rollback), the rollouts' counter,
        # and each rollout's refusals by worker.
        self.model = f"{self.tag}:model"
        self.model_history = f"{self.tag}:model:history"
        self.model_rollouts = f"{self.tag}:model:rollouts"

    def refusals(self, rollout):
        return f"{self.tag}:model:refusals:{rollout}"

    def result(self, job_id):
        return f"{self.tag}:result:{job_id}"

    def job(self, job_id):
        """A queued job's marker: it exists until the job's deadline (see jobqueue.ENQUEUE)."""
        return f"{self.tag}:job:{job_id}"

    def processing(self, worker_id):
        return f"{self.tag}:processing:{worker_id}"

    def heartbeat(self, worker_id):
        return f"{self.tag}:worker:{worker_id}"
