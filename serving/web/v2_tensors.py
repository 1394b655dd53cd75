"""The input tensor of an Open Inference Protocol request: its shape and datatype checked, its
elements read as image files or as uint8 pixels."""
import base64
import binascii
import math
import struct
import warnings

import numpy as np

import settings
from serving.errors import ServiceError

INPUTS = {"image": "BYTES", "pixels": "UINT8"}


def input_tensor(header, binary):
    """The request's one input: (name, shape, data): data is the binary bytes or the JSON data."""
    if len(header["inputs"]) != 1 or not isinstance(header["inputs"][0], dict):
        raise ServiceError("send one input: 'image' (BYTES, encoded image files) or 'pixels' "
                           "(UINT8, [N, height, width, channels])", 400)
    tensor = header["inputs"][0]
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(name, str) or name not in INPUTS:
        raise ServiceError(f"unknown input {name!r}: send 'image' (BYTES) or 'pixels' (UINT8)", 400)
    if datatype != INPUTS[name]:
        raise ServiceError(f"input {name!r} must be {INPUTS[name]}, not {datatype}", 400)
    if not (isinstance(shape, list) and shape and all(is_count(n) for n in shape)):
        raise ServiceError(f"input {name!r}: shape must be a list of sizes, not {shape!r}", 400)
    check_batch(shape)
    size = parameters(tensor).get("binary_data_size")
    if size is not None:
        if size != len(binary):
            raise ServiceError(f"input {name!r} declares binary_data_size {size}, but "
                               f"{len(binary)} bytes follow the JSON header", 400)
        return name, shape, binary
    if binary:
        raise ServiceError(f"{len(binary)} bytes follow the JSON header, but no input declares "
                           "binary_data_size", 400)
    if not isinstance(tensor.get("data"), (list, np.ndarray)):
        raise ServiceError(f"input {name!r} carries no data (a JSON list, or binary data)", 400)
    return name, shape, tensor["data"]


def check_batch(shape):
    """An input's batch (its shape's first size) must be 1 to MAX_IMAGES_PER_REQUEST."""
    if not 1 <= shape[0] <= settings.MAX_IMAGES_PER_REQUEST:
        raise ServiceError(f"a batch of {shape[0]} images: send 1 to "
                           f"{settings.MAX_IMAGES_PER_REQUEST} (MAX_IMAGES_PER_REQUEST)",
                           413 if shape[0] else 400)


def check_pixels_shape(shape, input_shape):
    """A `pixels` input's shape must be [N, the model's input]."""
    if len(shape) != 4 or tuple(shape[1:]) != tuple(input_shape):
        raise ServiceError(f"input 'pixels' must have shape [N, {', '.join(map(str, input_shape))}]"
                           f" (the model's input), not {shape}", 400)


def is_count(value):
    """A JSON whole number from 0 up (true and false are not)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def parameters(entry):
    """The parameters object of a request, input or output entry ({} if none)."""
    found = entry.get("parameters") or {}
    if not isinstance(found, dict):
        raise ServiceError("parameters must be a JSON object", 400)
    return found


def pixels_of(shape, data, input_shape):
    """The images of a `pixels` input: uint8 arrays of the model's input shape."""
    check_pixels_shape(shape, input_shape)
    count = math.prod(shape)
    if isinstance(data, bytes):
        array = np.frombuffer(data, np.uint8)
    else:
        try:
            array = np.asarray(data).ravel()
        except ValueError as exc:  # ragged nesting
            raise ServiceError(f"input 'pixels': {exc}", 400) from exc
        if array.size and (array.dtype.kind not in "iu" or array.min() < 0 or array.max() > 255):
            raise ServiceError("input 'pixels' must hold whole numbers from 0 to 255", 400)
    if array.size != count:
        raise ServiceError(f"input 'pixels' of shape {shape} needs {count} values, not "
                           f"{array.size}", 400)
    return list(array.astype(np.uint8).reshape(shape))


def files_of(shape, data):
    """The encoded image files of an `image` input, as bytes."""
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise ServiceError(f"input 'image' must have shape [N] (or [N, 1]), not {shape}", 400)
    if isinstance(data, bytes):
        files = split_bytes(data, shape[0])
    else:
        items = [item for element in data
                 for item in (element if isinstance(element, list) else [element])]
        if len(items) != shape[0]:  # before any is decoded
            raise ServiceError(f"input 'image' of shape {shape} carries {len(items)} files", 400)
        try:
            files = [base64.b64decode(item, validate=True) for item in items]
        except (TypeError, ValueError, binascii.Error) as exc:
            raise ServiceError("input 'image' in JSON must hold each file in base64", 400) from exc
    if len(files) != shape[0]:
        raise ServiceError(f"input 'image' of shape {shape} carries {len(files)} files", 400)
    return files


def split_bytes(raw, count):
    """The elements of a binary BYTES tensor: each a 4-byte little-endian length, then its bytes;
    400 past `count` of them."""
    elements, offset = [], 0
    while offset < len(raw):
        if len(elements) == count:
            raise ServiceError(f"binary BYTES data holds more than its {count} elements", 400)
        if offset + 4 > len(raw):
            raise ServiceError("binary BYTES data ends inside an element's length", 400)
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + length > len(raw):
            raise ServiceError("binary BYTES data ends inside an element", 400)
        elements.append(raw[offset:offset + length])
        offset += length
    return elements


# Byte classes of a JSON list of whole numbers: digit, comma, [, ], whitespace, anything else.
DIGIT, COMMA, OPEN, CLOSE, SPACE, OTHER = range(6)
CLASSES = np.full(256, OTHER, np.int8)
CLASSES[list(b"0123456789")], CLASSES[ord(",")] = DIGIT, COMMA
CLASSES[ord("[")], CLASSES[ord("]")], CLASSES[list(b" \t\r\n")] = OPEN, CLOSE, SPACE
# Which class may follow which, whitespace left out (a number's digits follow each other).
FOLLOWS = np.zeros((4, 4), bool)
for before, after in ((DIGIT, DIGIT), (DIGIT, COMMA), (DIGIT, CLOSE), (COMMA, DIGIT),
                      (COMMA, OPEN), (OPEN, DIGIT), (OPEN, OPEN), (CLOSE, COMMA), (CLOSE, CLOSE)):
    FOLLOWS[before, after] = True


def whole_numbers(text, start, lists):
    """The whole numbers of the JSON list that opens at text[start], in order, and where it ends;
    None unless it is well-formed JSON of whole numbers in `lists` lists (nested or not).

    numpy reads them and leaves the GIL to the event loop meanwhile, where json.loads would hold
    it for the whole body. Anything else (a sign, a fraction, a string, an empty list) is left
    to json.loads, whose errors say what is wrong."""
    chars = np.frombuffer(text, np.uint8, offset=start)
    brackets = np.flatnonzero((chars == ord("[")) | (chars == ord("]")))
    depth = np.cumsum(np.where(chars[brackets] == ord("["), 1, -1))
    closed = np.flatnonzero(depth == 0)
    if not len(closed) or (closed[0] + 1) // 2 not in lists:
        return None
    end = brackets[closed[0]] + 1
    classes = CLASSES[chars[:end]]
    tokens = classes[classes != SPACE]
    if (tokens == OTHER).any() or not FOLLOWS[tokens[:-1], tokens[1:]].all():
        return None
    plain = chars[:end].copy()
    plain[brackets[:closed[0] + 1]] = ord(" ")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            numbers = np.fromstring(plain.tobytes(), np.int64, sep=",")
        except (ValueError, DeprecationWarning):
            return None
    return numbers, start + end
