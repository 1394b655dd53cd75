"""Several images in one /predict request (repeated `image` fields), with real processes:
answers in order, one batch for a full request, errors per image, the bounds.
"""
from concurrent.futures import ThreadPoolExecutor

import requests

import settings
from conftest import (LASTING_HEARTBEAT, assert_own_predictions, distinct_images, frozen_workers,
                      tiny_settings, wait_until)


def post_images(url, files, timeout=60, headers=None, **params):
    fields = [("image", (name, data)) for name, data in files]
    return requests.post(f"{url}/predict", files=fields, params=params, headers=headers,
                         timeout=timeout)


def assert_predicted(result, data, tiny_model):
    assert result["success"], result
    assert_own_predictions(result["predictions"], data, tiny_model)


def test_answers_in_order_and_a_full_request_is_one_batch(service, tiny_model):
    service.worker(BATCH_SIZE=8, **tiny_settings(tiny_model))
    url = service.web().url
    images = distinct_images(8)
    response = post_images(url, [(f"{n}.png", data) for n, data in enumerate(images)], top_k=10)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["success"] is True and len(answer["results"]) == 8
    for result, data in zip(answer["results"], images):
        assert_predicted(result, data, tiny_model)
        assert result["batch_size"] == 8  # the request's 8 jobs, pushed at once, in one pass
        assert result["inference_ms"] > 0 and result["queue_wait_ms"] >= 0
    # One image keeps the tutorial's answer exactly.
    single = post_images(url, [("one.png", images[3])]).json()
    assert set(single) == {"success", "predictions"}


def test_a_bad_file_fails_alone(service, tiny_model):
    service.worker(**tiny_settings(tiny_model))
    url = service.web().url
    images = distinct_images(2)
    response = post_images(url, [("a.png", images[0]), ("notes.txt", b"not an image"),
                                 ("b.png", images[1])], top_k=10)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["success"] is False
    first, bad, last = answer["results"]
    assert_predicted(first, images[0], tiny_model)
    assert_predicted(last, images[1], tiny_model)
    assert bad["success"] is False and bad["status"] == 400
    assert "not an image" in bad["error"]
    # No image classified: the request fails with the first one's status.
    none = post_images(url, [("a.txt", b"no"), ("b.txt", b"nor this")])
    assert none.status_code == 400 and none.json()["success"] is False
    assert [result["status"] for result in none.json()["results"]] == [400, 400]


def test_the_bounds_count_images(service, tiny_model, redis_client, keys):
    """At the default settings: more than MAX_IMAGES_PER_REQUEST gets 413; a request whose images
    do not all fit under MAX_QUEUE_LENGTH is refused whole, and one that fits is taken whole."""
    service.worker(**LASTING_HEARTBEAT, **tiny_settings(tiny_model))
    url = service.web().url
    with frozen_workers(redis_client, keys):  # the queue stays as this test fills it
        image = distinct_images(1)[0]
        too_many = post_images(url, [("i.png", image)] * (settings.MAX_IMAGES_PER_REQUEST + 1))
        assert too_many.status_code == 413, too_many.text
        assert "MAX_IMAGES_PER_REQUEST" in too_many.json()["error"]

        room = 5
        fillers = [f"filler-{n}" for n in range(settings.MAX_QUEUE_LENGTH - room)]
        redis_client.rpush(keys.queue, *fillers)
        refused = post_images(url, [("i.png", image)] * (room + 1))
        assert refused.status_code == settings.OVERLOAD_STATUS, refused.text
        assert f"no room for {room + 1} images" in refused.json()["error"]
        assert redis_client.llen(keys.queue) == settings.MAX_QUEUE_LENGTH - room  # none enqueued

        # These fit: all five are queued, then withdrawn at their deadline, unanswered.
        with ThreadPoolExecutor(1) as pool:
            request = pool.submit(post_images, url, [("i.png", image)] * room,
                                  headers={"X-Request-Timeout-S": "10"})
            wait_until(lambda: redis_client.llen(keys.queue) == settings.MAX_QUEUE_LENGTH,
                       timeout=10, what="the request's images on the queue")
            taken = request.result()
        assert taken.status_code == 504, taken.text
        assert [result["status"] for result in taken.json()["results"]] == [504] * room
        assert redis_client.llen(keys.queue) == settings.MAX_QUEUE_LENGTH - room
        redis_client.delete(keys.queue)  # the fillers, before the worker goes on
