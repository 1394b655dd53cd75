"""Checks of the text the service puts into answers and headers."""
import os


def model_name(model):
    """A model's name in the Open Inference Protocol: a named model's (MODEL=resnet50), or its
    file's name without the extension."""
    return os.path.splitext(os.path.basename(model))[0]


def header_value_problem(text):
    """Why `text` cannot be an HTTP header's value as the service sends it (None if it can): 1 to
    128 printable ASCII characters, no space at either end. gunicorn refuses anything else and
    answers with a page of its own instead of the service's answer."""
    if not 0 < len(text) <= 128:
        return "must be 1 to 128 characters"
    if not (text.isascii() and text.isprintable()) or text != text.strip():
        return "must be printable ASCII characters (no space at either end)"
    return None


def is_whole_number(text):
    """Whether text is a whole number in ASCII digits that int() takes: at most 18 of them (str's
    isdigit() alone takes "٣" and "²", and int() refuses over 4300 digits)."""
    return text.isascii() and text.isdigit() and len(text) <= 18
