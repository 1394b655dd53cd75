"""Deadlines across hosts whose clocks disagree: a web process and a model worker whose clocks are
a minute apart (libfaketime sets one process's clock off; Redis keeps the right time) still
answer every request, because both count deadlines on Redis's clock; the skewed process says so
in its log and in its metrics.
"""
import glob
import re

import pytest
import requests

from conftest import (assert_own_predictions, distinct_images, free_port, post_image,
                      tiny_settings, wait_until)


def skewed_by(seconds):
    """Environment that sets a process's clock `seconds` off (its children's too)."""
    library = glob.glob("/usr/lib/*/faketime/libfaketime.so.1")
    assert library, "libfaketime is missing: `make faketime` installs it"
    # (Its monotonic clock moves with it: with the real one kept, libfaketime fails Python's
    # time.sleep.)
    return {"LD_PRELOAD": library[0], "FAKETIME": f"{seconds:+d}"}


def offsets(text):
    """The keras_clock_offset_seconds samples of a metrics page."""
    return [float(value) for value in re.findall(
        r"^keras_clock_offset_seconds(?:\{[^}]*\})? (\S+)$", text, re.M)]


@pytest.mark.parametrize("skewed", ["model worker ahead", "web process behind"])
def test_a_host_a_minute_off_answers_every_request_and_says_so(service, tiny_model, skewed):
    worker_port = free_port()
    ahead = skewed == "model worker ahead"
    worker = service.worker(WORKER_METRICS_PORT=worker_port, **tiny_settings(tiny_model),
                            **(skewed_by(60) if ahead else {}))
    web = service.web(**({} if ahead else skewed_by(-60)))

    for data in distinct_images(4):  # a 30 s deadline on a clock a minute off: 504, unless fixed
        response = post_image(web.url, data, "image.png")
        assert response.status_code == 200, response.text
        assert_own_predictions(response.json()["predictions"], data, tiny_model)

    if ahead:  # Redis's clock is a minute behind the worker's
        scrape = requests.get(f"http://127.0.0.1:{worker_port}/metrics", timeout=5).text
        assert offsets(scrape) and all(-62 < offset < -58 for offset in offsets(scrape)), scrape
        wait_until(lambda: "clock is 60." in worker.log_path.read_text(),
                   what="the worker to log the skew")
        assert re.search(r"clock is 60\.\d+ s ahead of Redis's", worker.log_path.read_text())
    else:
        scrape = requests.get(f"{web.url}/metrics", timeout=5).text
        assert offsets(scrape) and all(58 < offset < 62 for offset in offsets(scrape)), scrape
        assert re.search(r"clock is 60\.\d+ s behind Redis's", web.log_path.read_text())
