"""Helpers for your own scripts: an image prepared as the service prepares it, and arrays in and
out of base64 as the service sends them. The service's own code lives in the `serving` package;
this module only points into it (the package never imports it)."""
from serving.errors import ServiceError
from serving.images import open_image, prepare_image
from serving.wire.job_format import decode_array, encode_array

__all__ = ["ServiceError", "open_image", "prepare_image", "encode_array", "decode_array"]
