"""The service's OpenAPI document (/openapi.json) and its interactive docs page (/docs).

spectree builds the document from the app's routes: each view's docstring, and the request and
answer models below, which `documented` attaches to it. Every route appears, documented or not.
The docs page is spectree's Swagger UI with its assets inlined (the `offline` extra, offapi), so
it loads without any network but the service's.

The models only document: requests are checked by the views themselves, whose errors keep the
service's own shape."""
from typing import Literal

from flask import jsonify
from pydantic import BaseModel, ConfigDict, Field, RootModel
from spectree import Response, SpecTree
from spectree.model_adapter.pydantic_adapter import BaseFile
from spectree.page import PAGE_TEMPLATES

import settings


class Failure(BaseModel):
    """The last-resort answer of any route: `success` is absent under /v2."""
    success: Literal[False] | None = None
    error: str = Field(description="internal server error")


# spectree adds the answer for its own validation errors to every route; the service never
# validates through it, so that slot documents the 500 any route may answer.
spec = SpecTree("flask", title="Keras REST API with Redis batching", version="1",
                description="Image classification behind POST /predict, batched through Redis; "
                "also the Open Inference Protocol (KServe v2 REST) under /v2.",
                validation_error_status=500, validation_error_model=Failure)


def documented(**models):
    """Attach request and answer models to a view, for the document only: the view itself
    serves (spectree's validating wrapper would re-read every answer, and cannot pass a file
    through). spectree finds a view's models along its __wrapped__ chain."""
    def attach(view):
        holder = spec.validate(skip_validation=True, **models)(view)
        del holder.__wrapped__  # no cycle: the view leads to the holder, not back
        view.__wrapped__ = holder
        return view
    return attach


def register(app):
    """Serve the document at /openapi.json and the docs page at /docs."""
    page = PAGE_TEMPLATES["swagger"].format(spec_url="/openapi.json", spec_path="docs",
                                            **spec.config.swagger_oauth2_config())
    # Swagger UI shows a badge from validator.swagger.io for a document on a host other than
    # localhost: offline means no such request.
    setting = "dom_id: '#swagger-ui',"
    if page.count(setting) != 1:
        raise RuntimeError("spectree's Swagger UI page has changed: check the docs page")
    page = page.replace(setting, setting + " validatorUrl: null,")

    @app.get("/openapi.json")
    @documented(**PAGE)
    def api_document():
        """This document: OpenAPI 3.1, built from the app's routes."""
        return jsonify(spec.spec)  # of the app that serves the request (flask.current_app)

    @app.get("/docs")
    @documented(**PAGE)
    def api_docs():
        """The interactive docs of this document (Swagger UI, served offline)."""
        return page


class Prediction(BaseModel):
    label: str
    probability: float = Field(ge=0, le=1)


class Predictions(BaseModel):
    """The answer for one image: the classic tutorial's shape, unchanged. Where the time went is in
    the headers X-Queue-Wait-Ms, X-Inference-Ms, X-Batch-Size, X-Model-Worker, X-Model-Version,
    X-Model-Precision."""
    success: Literal[True]
    predictions: list[Prediction] = Field(description="most probable first, top_k of them")


class ImageResult(BaseModel):
    """One image of several: its predictions and timing, or its own error and status."""
    success: bool
    predictions: list[Prediction] | None = None
    queue_wait_ms: float | None = Field(None, description="from enqueue to its batch's claim")
    inference_ms: float | None = Field(None, description="the forward pass of its batch")
    batch_size: int | None = Field(None, description="images in that forward pass")
    model_version: str | None = None
    precision: str | None = Field(None, description="fp32, bf16, fp16 or int8")
    error: str | None = None
    status: int | None = Field(None, description="the HTTP status this image alone would get")


class SeveralResults(BaseModel):
    """The answer for several images: one result each, in the order of the fields."""
    success: bool = Field(description="true when every image was classified")
    results: list[ImageResult]


class PredictAnswer(RootModel[Predictions | SeveralResults]):
    """One image: the tutorial's answer; several: one result per image."""


class Error(BaseModel):
    success: Literal[False]
    error: str = Field(description="what went wrong, for a person to read")


class Upload(BaseModel):
    image: list[BaseFile] = Field(description=(
        "one image file, or several (repeat the field, at most MAX_IMAGES_PER_REQUEST = "
        f"{settings.MAX_IMAGES_PER_REQUEST}); formats: {', '.join(settings.ALLOWED_FORMATS)}"))


class TopK(BaseModel):
    top_k: int | None = Field(None, ge=1, description=f"predictions per image ({settings.TOP_K})")


class Deadline(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    x_request_timeout_s: float | None = Field(None, gt=0, alias="X-Request-Timeout-S", description=(
        f"seconds this request may take, at most REQUEST_TIMEOUT_S = {settings.REQUEST_TIMEOUT_S}"))


PREDICT = dict(form=Upload, query=TopK, headers=Deadline, tags=["Classification"], resp=Response(
    HTTP_200=PredictAnswer,
    HTTP_400=(Error, "no image field, an unreadable image or a bad parameter"),
    HTTP_413=(Error, "too large: the body, an image's pixels, or too many images"),
    HTTP_503=(Error, "no warm model worker yet, or the queue is full (both with Retry-After), or "
                     "Redis failed"),
    HTTP_504=(Error, "no result within the deadline")))


class Health(BaseModel):
    success: Literal[True]
    instance: str
    pid: int


class Readiness(BaseModel):
    success: bool
    workers: list[dict] = Field(description="the live model workers' heartbeats")
    error: str | None = None


class ModelInfo(BaseModel):
    success: Literal[True]
    model: dict = Field(description="name, version, input_shape, labels, runtime, precision "
                        "and its check against fp32, ...")
    versions: list[str] = Field(description="versions served now (two during a rollout)")


OPERATIONS = ["Operations"]
HEALTH = dict(resp=Response(HTTP_200=Health), tags=OPERATIONS)
READY = dict(resp=Response(HTTP_200=Readiness, HTTP_503=(Readiness, "no warm model worker")),
             tags=OPERATIONS)
MODEL = dict(resp=Response(HTTP_200=ModelInfo, HTTP_503=(Error, "no warm model worker")),
             tags=OPERATIONS)
METRICS = dict(resp=Response(HTTP_200=(None, "Prometheus' text format")), tags=OPERATIONS)
PAGE = dict(resp=Response(HTTP_200=(None, "HTML, JavaScript, CSS or JSON")), tags=["Pages"])


class ProtocolError(BaseModel):
    error: str


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class Live(BaseModel):
    live: bool


class Ready(BaseModel):
    ready: bool


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str]
    platform: str
    precision: str = Field(description="fp32, bf16, fp16 or int8 (an addition to the protocol)")
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]


class ModelReady(BaseModel):
    name: str
    ready: bool


class InputTensor(BaseModel):
    name: Literal["image", "pixels"] = Field(description=(
        "`image`: BYTES [N] of encoded image files (base64 strings in JSON); `pixels`: UINT8 "
        "[N, height, width, channels] at the model's input size"))
    shape: list[int]
    datatype: Literal["BYTES", "UINT8"]
    parameters: dict | None = Field(None, description="binary_data_size: its bytes after the "
                                    "JSON header (binary tensor data extension)")
    data: list | None = None


class RequestedOutput(BaseModel):
    name: Literal["probabilities"]
    parameters: dict | None = Field(None, description=(
        "classification: K, the top K as BYTES \"value:index:label\"; binary_data: true"))


class InferRequest(BaseModel):
    id: str | None = None
    parameters: dict | None = Field(None, description="binary_data_output: true")
    inputs: list[InputTensor] = Field(min_length=1, max_length=1)
    outputs: list[RequestedOutput] | None = None


class OutputTensor(BaseModel):
    name: str
    shape: list[int]
    datatype: Literal["FP32", "BYTES"]
    parameters: dict | None = None
    data: list | None = None


class InferResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    outputs: list[OutputTensor]


def protocol(**answers):
    """Answers of a /v2 route, with the protocol's error shape."""
    return dict(tags=["Open Inference Protocol"], resp=Response(**{
        code: (ProtocolError, text) if isinstance(text, str) else text
        for code, text in answers.items()}))


V2_SERVER = protocol(HTTP_200=ServerMetadata)
V2_LIVE = protocol(HTTP_200=Live)
V2_READY = protocol(HTTP_200=Ready, HTTP_503="no warm model worker")
V2_MODEL = protocol(HTTP_200=ModelMetadata, HTTP_404="no such model or version",
                    HTTP_503="no warm model worker")
V2_MODEL_READY = protocol(HTTP_200=ModelReady, HTTP_404="no such model or version",
                          HTTP_503="no warm model worker")
V2_INFER = dict(json=InferRequest, headers=Deadline, **protocol(
    HTTP_200=InferResponse,
    HTTP_400="a malformed request, tensor or image",
    HTTP_404="no such model or version",
    HTTP_413="too large: the body or the batch",
    HTTP_503="no warm model worker yet, or the queue is full (both with Retry-After), or Redis "
             "failed",
    HTTP_504="no result within the deadline"))
