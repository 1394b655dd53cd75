"""Image decoding and serialization helpers, through helpers.py (the facade for users' scripts)."""
import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from conftest import image_bytes
from helpers import ServiceError, decode_array, encode_array, prepare_image


@pytest.mark.parametrize("mode, fmt", [("RGB", "JPEG"), ("L", "PNG"), ("LA", "PNG"), ("P", "PNG"),
                                       ("RGBA", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"),
                                       ("RGB", "WEBP"), ("RGB", "BMP"), ("RGB", "GIF"),
                                       ("RGB", "TIFF")])
def test_every_mode_becomes_uint8_rgb_of_the_model_size(mode, fmt):
    pixels = prepare_image(image_bytes(mode, size=(300, 200), fmt=fmt), (224, 160), 3)
    assert pixels.shape == (160, 224, 3) and pixels.dtype == np.uint8


def test_grayscale_model_gets_one_channel():
    assert prepare_image(image_bytes("RGB"), (8, 8), 1).shape == (8, 8, 1)


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    assert (prepare_image(buffer.getvalue(), (4, 4)) == 255).all()


def test_palette_transparency_becomes_white():
    image = Image.new("P", (4, 4), 0)
    image.putpalette([10, 20, 30] * 256)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=0)
    assert (prepare_image(buffer.getvalue(), (4, 4)) == 255).all()


def test_sixteen_bit_scales_to_eight():
    image = Image.fromarray(np.full((4, 4), 65535, np.uint16))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    assert (prepare_image(buffer.getvalue(), (4, 4)) == 255).all()


def test_exif_orientation_is_applied():
    # A 40x20 picture, left half black, tagged "rotate 90 degrees clockwise to display".
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, 20:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", exif=exif, quality=100)
    upright = prepare_image(buffer.getvalue(), (20, 40))
    assert upright[:15].mean() < 30 and upright[25:].mean() > 225  # black on top after rotating


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_turns_a_jpeg_as_pillow_does(orientation):
    # Four quadrants of their own colours, 64 x 48 as stored; JPEGs are decoded apart from Pillow.
    stored = np.zeros((48, 64, 3), np.uint8)
    stored[:24, :32], stored[:24, 32:], stored[24:, :32] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    stored[24:, 32:] = 255
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, "JPEG", exif=exif, quality=95)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(buffer.getvalue()))))
    height, width = expected.shape[:2]
    got = prepare_image(buffer.getvalue(), (width // 2, height // 2))

    def quadrants(pixels):
        h, w = pixels.shape[0] // 2, pixels.shape[1] // 2
        return np.array([pixels[:h, :w].mean((0, 1)), pixels[:h, w:].mean((0, 1)),
                         pixels[h:, :w].mean((0, 1)), pixels[h:, w:].mean((0, 1))])

    assert got.shape == (height // 2, width // 2, 3)
    assert np.abs(quadrants(got) - quadrants(expected)).max() < 25


def test_large_jpeg_is_decoded_at_reduced_scale_to_the_same_size():
    pixels = prepare_image(image_bytes(size=(4000, 3000)), (224, 224))
    assert pixels.shape == (224, 224, 3)


@pytest.mark.parametrize("data, status", [(b"", 400), (b"GIF89a" + b"\0" * 10, 400),
                                          (b"plain text", 400)])
def test_unusable_bytes_raise_service_error(data, status):
    with pytest.raises(ServiceError) as error:
        prepare_image(data, (32, 32))
    assert error.value.status == status


def test_too_many_pixels_is_413_before_decoding():
    with pytest.raises(ServiceError) as error:
        prepare_image(image_bytes(size=(2000, 2000)), (32, 32), max_pixels=1_000_000)
    assert error.value.status == 413


def test_format_outside_the_allowed_list_is_refused():
    with pytest.raises(ServiceError):
        prepare_image(image_bytes(fmt="BMP"), (32, 32), formats=["JPEG", "PNG"])


def test_array_round_trip_is_exact():
    array = np.random.default_rng(0).integers(0, 256, (7, 5, 3), dtype=np.uint8)
    assert (decode_array(encode_array(array), array.shape) == array).all()


def test_animated_gif_uses_its_first_frame():
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    pixels = prepare_image(buffer.getvalue(), (8, 8)).astype(int)
    assert (pixels[..., 0] > 200).all() and (pixels[..., 2] < 50).all()
