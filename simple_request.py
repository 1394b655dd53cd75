"""Send one image to the service and print its ranked predictions.

    python simple_request.py dog.jpg [--url http://localhost:5000/predict] [--top-k 5]

Exits 0 with the predictions, or non-zero with the server's error message.
"""
import argparse
import sys

import requests

DEFAULT_URL = "http://localhost:5000/predict"


class PredictionError(Exception):
    """The service refused or could not finish the request; `status` is the HTTP status (0: none)."""

    def __init__(self, message, status=0):
        super().__init__(f"{message} (HTTP {status})" if status else message)
        self.message = message
        self.status = status


def predict(image_path, url=DEFAULT_URL, top_k=None, timeout_s=60):
    """POST the image as multipart field `image`; return the list of {label, probability}."""
    params = {"top_k": top_k} if top_k else None
    try:
        with open(image_path, "rb") as image:
            response = requests.post(url, files={"image": image}, params=params, timeout=timeout_s)
    except requests.RequestException as exc:
        raise PredictionError(f"cannot reach {url}: {exc}") from exc
    try:
        body = response.json()
    except ValueError:
        raise PredictionError(f"the server answered without JSON: {response.text[:200]!r}",
                              response.status_code) from None
    if not response.ok or not body.get("success"):
        raise PredictionError(body.get("error", "request failed"), response.status_code)
    return body["predictions"]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Classify one image with the Keras REST service.")
    parser.add_argument("image", help="path of the image file to classify")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the /predict URL (default {DEFAULT_URL})")
    parser.add_argument("--top-k", type=int, default=None, help="how many predictions to return")
    args = parser.parse_args(argv)
    try:
        predictions = predict(args.image, args.url, args.top_k)
    except (PredictionError, OSError) as exc:
        print(f"Request failed: {exc}", file=sys.stderr)
        return 1
    for rank, prediction in enumerate(predictions, start=1):
        print(f"{rank}. {prediction['label']}: {prediction['probability']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
