"""Helpers for your own scripts, under the names the classic tutorial's helpers.py used: an image
prepared as the service prepares it, and arrays in and out of base64 as the service sends them.
The service's own code lives in the `serving` package; this module only points into it."""
from serving.errors import ServiceError
from serving.images import open_image, prepare_image
from serving.wire.job_format import decode_array, encode_array

__all__ = ["ServiceError", "open_image", "prepare_image", "encode_array", "decode_array",
           "base64_encode_image", "base64_decode_image"]


def base64_encode_image(array):
    """The tutorial's name for encode_array: a uint8 array as base64 text."""
    return encode_array(array)


def base64_decode_image(text, dtype, shape):
    """The tutorial's name for decode_array: base64 text back to an array of dtype and shape."""
    return decode_array(text, shape, dtype)
