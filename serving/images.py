"""Image bytes to uint8 pixels, and what decoding them costs in memory, with the budget that
bounds it. The web tier reads uploads' headers with it; the model worker decodes into its batch.
Nothing here imports Flask or Keras."""
import contextlib
import io
import threading
import time

import cv2
import numpy as np
import simplejpeg
from PIL import Image, ImageOps

from serving.errors import ServiceError

# Pillow's own bomb check would raise only past twice its limit; ours (MAX_IMAGE_PIXELS) is applied
# explicitly before decoding, so the library's is switched off to keep one rule.
Image.MAX_IMAGE_PIXELS = None

WHITE = (255, 255, 255, 255)
SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}
ORIENTATION = 0x0112  # EXIF: 5 to 8 turn the picture by a quarter
PILLOW_BYTES_PER_PIXEL = 4  # the widest of Pillow's modes (RGBA, RGBX, I, F)
PILLOW_MAX_BLOCK = 1 << 30  # Pillow takes a block size in a C int, in whole pages


def hold_images_in_one_block(max_pixels):
    """Have Pillow keep the pixels of any image up to max_pixels in one allocation.

    Pillow allocates pixels in blocks, 16 MiB by default. glibc maps an allocation above 32 MiB on
    its own and unmaps it when freed, but keeps smaller ones it freed in the arena of the thread
    that used them: large images decoded in turn by different threads would each leave their
    blocks behind, and the process would hold its decoding budget several times over.
    """
    pages = -(-max_pixels * PILLOW_BYTES_PER_PIXEL // 4096)
    Image.core.set_block_size(max(Image.core.get_block_size(), min(pages * 4096, PILLOW_MAX_BLOCK)))


class MemoryBudget:
    """Bytes that work in this process may hold at once (decoding images, parsing bodies), held
    under a total."""

    def __init__(self, total_bytes):
        self.total = self.free = total_bytes
        self.changed = threading.Condition()  # gevent's in a monkey-patched web process

    @contextlib.contextmanager
    def reserve(self, nbytes, deadline):
        """Hold nbytes of the budget for the body: 413 if more than all of it, 503 if not free
        before the deadline (time.time())."""
        if nbytes > self.total:
            raise ServiceError(f"decoding this image takes about {nbytes >> 20} MiB, more than the "
                               f"{self.total >> 20} MiB a process may spend (DECODE_BUDGET_BYTES)",
                               413)
        with self.changed:
            if not self.changed.wait_for(lambda: self.free >= nbytes, deadline - time.time()):
                raise ServiceError("the service is busy decoding other images; retry shortly", 503,
                                   {"Retry-After": "1"})
            self.free -= nbytes
        try:
            yield
        finally:
            with self.changed:
                self.free += nbytes
                self.changed.notify_all()


def prepare_image(data, size, channels=3, max_pixels=None, formats=None, out=None):
    """Decode image bytes into a uint8 array of shape (height, width, channels) for the model.

    `size` is (width, height). `out`, if given, is filled instead of a new array. Raises
    ServiceError(400/413) for anything that is not a usable image.
    """
    image = open_image(data, max_pixels, formats)
    decode_reduced(image, size, channels)
    return decode_image(image, data, size, channels, out)


def open_image(data, max_pixels=None, formats=None):
    """Read an image's header (no pixels yet): 400 unless it is an image in an accepted format,
    413 if it has more than max_pixels (decompression bombs)."""
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
    return image


def decode_reduced(image, size, channels):
    """Set a JPEG to decode at 1/2, 1/4 or 1/8 scale straight from the DCT, no smaller than `size`
    (far cheaper for photos); returns decoding_bytes of what decoding it then takes."""
    full_size = image.size
    try:
        image.draft("RGB" if channels == 3 else "L", tuple(size))
    except Exception as exc:
        raise ServiceError(f"cannot read the image header: {exc}", 400) from exc
    return decoding_bytes(image, full_size)


# Peak bytes per pixel while an image decodes. Pillow holds a multi-band pixel in 4 bytes, and
# decoding makes up to four such copies at full size (measured most for WebP, its decoder's own
# buffers). A JPEG is decoded row by row into one such image, at the scale set by decode_reduced,
# except a progressive one (below).
DECODING_BYTES_PER_PIXEL = 16
JPEG_BYTES_PER_PIXEL = 8


def decoding_bytes(image, full_size=None):
    """Peak bytes that decoding an image opened by open_image takes, estimated from its header.
    full_size: its size before decode_reduced (None: not set to decode reduced)."""
    full_size = full_size or image.size
    if image.format != "JPEG":
        return full_size[0] * full_size[1] * DECODING_BYTES_PER_PIXEL
    cost = image.width * image.height * JPEG_BYTES_PER_PIXEL
    if image.info.get("progressive") or image.info.get("progression"):
        cost += jpeg_coefficient_bytes(image, full_size)
    return cost


def jpeg_coefficient_bytes(image, full_size):
    """Bytes of a progressive JPEG's DCT coefficients: libjpeg holds those of the whole image, at
    full size whatever the scale it outputs (2 bytes a coefficient, 64 per 8 x 8 block of each
    component, in whole MCUs)."""
    layers = getattr(image, "layer", None) or [(0, 1, 1, 0)] * len(image.getbands())
    h_max, v_max = max(layer[1] for layer in layers), max(layer[2] for layer in layers)
    mcu_columns = -(-full_size[0] // (8 * h_max))
    mcu_rows = -(-full_size[1] // (8 * v_max))
    blocks = sum(mcu_columns * h * mcu_rows * v for _, h, v, _ in layers)
    return blocks * 64 * 2


def decode_image(image, data, size, channels=3, out=None):
    """Decode an image opened by open_image (from `data`) into the model's input (see
    prepare_image)."""
    try:
        return _decode(image, data, size, channels, out)
    except Exception as exc:  # truncated or corrupt data surfaces only while decoding
        raise ServiceError(f"cannot decode the image: {exc}", 400) from exc


def _decode(image, data, size, channels, out):
    width, height = size
    orientation = image.getexif().get(ORIENTATION, 1)
    upright = (height, width) if orientation in (5, 6, 7, 8) else size  # the stored image's
    if image.format == "JPEG" and image.mode in ("RGB", "L"):
        pixels = decode_jpeg(data, upright, channels, orientation)
    else:
        pixels = decode_with_pillow(image, upright, channels)
    if out is None:
        out = np.empty((height, width, channels), np.uint8)
    target = out
    if channels == 1:  # OpenCV takes one channel as a plane
        pixels, target = pixels.reshape(pixels.shape[:2]), out.reshape(height, width)
    if pixels.shape[:2] == (height, width):
        target[...] = pixels
    else:
        cv2.resize(pixels, (width, height), dst=target, interpolation=cv2.INTER_LINEAR)
    return out


def decode_jpeg(data, upright, channels, orientation):
    """A JPEG's pixels, decoded by libjpeg-turbo's TurboJPEG API (simplejpeg) straight at its
    smallest scale no smaller than `upright` (width, height), then turned as its EXIF orientation
    says. strict: data that libjpeg would only warn about (a truncated file) is refused."""
    pixels = simplejpeg.decode_jpeg(data, colorspace="RGB" if channels == 3 else "GRAY",
                                    min_width=upright[0], min_height=upright[1], strict=True)
    turned = EXIF_TURNS.get(orientation)
    return np.ascontiguousarray(turned(pixels)) if turned else pixels


# EXIF orientations 2 to 8 as turns of a (height, width, ...) array, as Pillow's exif_transpose
# makes them: mirrored, upside down, flipped, transposed, a quarter turn clockwise, transversed, a
# quarter turn anticlockwise.
EXIF_TURNS = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


def decode_with_pillow(image, upright, channels):
    """Any format's pixels by Pillow, reduced towards `upright` (width, height), upright."""
    image.load()
    # Reduce each side by a whole factor first (a box average), to between once and twice the
    # target: the conversions below then touch a small image, and the bilinear resize, which
    # reads two pixels along each side, still sees every pixel. Palette, bilevel and 16-bit
    # pixels cannot be averaged as they are: they are widened or narrowed first.
    if image.mode in ("P", "1"):
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif image.mode in SIXTEEN_BIT_MODES:
        image = to_mode(image, "L")
    factor = (max(1, image.width // upright[0]), max(1, image.height // upright[1]))
    if factor != (1, 1):
        image = image.reduce(factor)
    ImageOps.exif_transpose(image, in_place=True)
    return np.asarray(to_mode(image, "RGB" if channels == 3 else "L"), dtype=np.uint8)


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
