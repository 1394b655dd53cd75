"""LitServe serving this service's model, for bench/litserve_compare.py: the same OpenVINO IR, its
preprocessing inside (OpenVINO's PrePostProcessor, as the service built it), the same precision,
the same decoding of uploads (serving.images.prepare_image), the same answer. It runs in
LitServe's own virtual environment (bench/.litserve-venv), which litserve_compare.py makes.

    .litserve-venv/bin/python bench/litserve_server.py --port 8000 --xml MODEL.xml --precision f32
"""
import argparse
import sys
from pathlib import Path

import litserve
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from serving.model.catalog import load_labels
from serving.images import prepare_image


class ClassifierAPI(litserve.LitAPI):
    """ResNet50 on ImageNet's labels: a multipart/form-data field `image` in, the top 5 out."""

    def __init__(self, xml, precision, **batching):
        super().__init__(**batching)
        self.xml, self.precision = xml, precision

    def setup(self, device):
        import openvino

        core = openvino.Core()
        self.compiled = core.compile_model(core.read_model(self.xml), "CPU", {
            "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": self.precision})
        self.request = self.compiled.create_infer_request()
        self.labels = load_labels("")

    def decode_request(self, request):
        upload = request["image"]
        return prepare_image(upload.file.read() if hasattr(upload, "file") else upload,
                             (224, 224), 3)

    def batch(self, inputs):
        return np.stack(inputs)

    def predict(self, pixels):
        return self.request.infer([pixels])[0].copy()

    def unbatch(self, output):
        return list(output)

    def encode_response(self, probabilities):
        best = np.argsort(probabilities)[::-1][:5]
        return {"success": True, "predictions": [
            {"label": self.labels[i], "probability": float(probabilities[i])} for i in best]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--xml", required=True,
                        help="the model's OpenVINO IR, uint8 pixels in (preprocessing inside)")
    parser.add_argument("--precision", default="f32", help="OpenVINO's inference precision hint")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batch-timeout-ms", type=float, default=5.0)
    parser.add_argument("--api-servers", type=int, default=2,
                        help="HTTP server processes (as many as the service's web processes)")
    args = parser.parse_args()
    api = ClassifierAPI(args.xml, args.precision, max_batch_size=args.batch_size,
                        batch_timeout=args.batch_timeout_ms / 1000)
    # One inference worker, as the service has one model process; LitServe's faster queue
    # between its HTTP servers and the worker (ZeroMQ).
    server = litserve.LitServer(api, accelerator="cpu", workers_per_device=1, fast_queue=True)
    server.run(host="127.0.0.1", port=args.port, num_api_servers=args.api_servers,
               generate_client_file=False)


if __name__ == "__main__":
    main()
