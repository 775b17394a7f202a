"""Every gRPC method, called through a real channel on an in-process server (``build_server``, as
the gRPC process runs it) over a fake model: answers, status codes and details, the request id
in the initial metadata, the pushback when full, unparsable and oversized messages, the course
counter, and the health and reflection services beside them."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from common import metrics
from common.config import Settings
from common.pipeline import DetectionService
from grpc_app import convert
from grpc_app.server import build_server
from grpc_app.servicer import SERVICE_NAME
from grpc_app.stubs import inference_pb2, inference_pb2_grpc
from testkit.fake_model import FakeModel
from testkit.images import encode, scene
from testkit.stack import free_port

PNG = encode(scene(64, 48), "PNG")


class Running:
    def __init__(self, settings: Settings, model: FakeModel):
        self.settings, self.model = settings, model
        metrics.init_multiprocess(settings)  # as serve() does first
        self.server, self.health = build_server(settings, DetectionService(settings, model))
        self.channel = grpc.insecure_channel(f"127.0.0.1:{settings.grpc_port}")
        self.stub = inference_pb2_grpc.InstanceDetectorStub(self.channel)

    def close(self) -> None:
        self.channel.close()
        self.server.stop(None).wait()


@pytest.fixture
def start(run_dir, images):
    running: list[Running] = []

    def make(model: FakeModel | None = None, **env: str) -> Running:
        values = {
            "RUN_DIR": str(run_dir),
            "ALLOWED_PRIVATE_TARGETS": f"127.0.0.1:{images.port}",
            "BIND_HOST": "127.0.0.1",
            "GRPC_PORT": str(free_port()),
        } | env
        running.append(Running(Settings.from_env(values), model if model is not None else FakeModel()))
        return running[-1]

    yield make
    for item in running:
        item.close()


@pytest.fixture
def grpc_server(start):
    return start()


def status_of(call, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as failure:
        call()
    assert failure.value.code() == code, failure.value.details()
    assert "Traceback" not in failure.value.details()
    return failure.value.details()


def grpc_count(settings: Settings) -> float:
    text = metrics.render_latest(settings)[0].decode()
    for family in text_string_to_metric_families(text):
        if family.name == "app_grpc_inference_count":
            return family.samples[0].value
    return 0.0


def url_input(images, path: str):
    return inference_pb2.ImageInput(url=images.url(path))


# -- Predict -------------------------------------------------------------------------------


def test_predict_answers_names_and_counts_every_call(grpc_server, images):
    before = grpc_count(grpc_server.settings)
    answer = grpc_server.stub.Predict(inference_pb2.InstanceDetectorInput(url=images.url("/img/scene.png")))
    assert list(answer.objects) == ["cat", "dog"]
    status_of(lambda: grpc_server.stub.Predict(inference_pb2.InstanceDetectorInput(url="nope")),
              grpc.StatusCode.INVALID_ARGUMENT)
    assert grpc_count(grpc_server.settings) == before + 2


@pytest.mark.parametrize(
    ("url", "code", "detail"),
    [
        ("", grpc.StatusCode.INVALID_ARGUMENT, "invalid_request"),
        ("ftp://example.com/a.jpg", grpc.StatusCode.INVALID_ARGUMENT, "http or https"),
        ("http://10.0.0.1/a.jpg", grpc.StatusCode.PERMISSION_DENIED, "ALLOWED_PRIVATE_TARGETS"),
        ("/img/text", grpc.StatusCode.INVALID_ARGUMENT, "not_an_image"),
        ("/img/missing", grpc.StatusCode.FAILED_PRECONDITION, "upstream_failed"),
    ],
)
def test_predict_errors_are_statuses(grpc_server, images, url, code, detail):
    url = images.url(url) if url.startswith("/") else url
    details = status_of(lambda: grpc_server.stub.Predict(inference_pb2.InstanceDetectorInput(url=url)), code)
    assert detail in details
    assert list(grpc_server.stub.Predict(
        inference_pb2.InstanceDetectorInput(url=images.url("/img/scene.png"))
    ).objects) == ["cat", "dog"]  # still serving


def test_bytes_that_are_not_a_message_and_oversized_messages(start):
    running = start(MAX_REQUEST_BYTES="1024")
    raw = running.channel.unary_unary(f"/{SERVICE_NAME}/Predict")  # bytes in, bytes out
    details = status_of(lambda: raw(b"\x0a\x02\xff\xfe"), grpc.StatusCode.INVALID_ARGUMENT)  # url not UTF-8
    assert "not a valid request of Predict" in details
    big = inference_pb2.InstanceDetectorInput(url="http://example.com/" + "a" * 2000).SerializeToString()
    assert "larger than 1024 bytes" in status_of(lambda: raw(big), grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_the_request_id_is_returned_in_the_initial_metadata(grpc_server, images):
    request = inference_pb2.InstanceDetectorInput(url=images.url("/img/scene.png"))
    _, call = grpc_server.stub.Predict.with_call(request, metadata=(("x-request-id", "abc-123"),))
    assert dict(call.initial_metadata())["x-request-id"] == "abc-123"
    _, call = grpc_server.stub.Predict.with_call(request, metadata=(("x-request-id", "no spaces allowed"),))
    made = dict(call.initial_metadata())["x-request-id"]
    assert made and made != "no spaces allowed"


@pytest.mark.parametrize(
    ("model", "code", "detail"),
    [
        (FakeModel(state="loading", message="loading weights"), grpc.StatusCode.UNAVAILABLE, "not_ready"),
        (FakeModel(state="failed", message="bad checkpoint"), grpc.StatusCode.UNAVAILABLE, "bad checkpoint"),
        (FakeModel(error=RuntimeError("secret detail")), grpc.StatusCode.INTERNAL, "see the service log"),
    ],
    ids=["loading", "failed", "raising"],
)
def test_a_model_that_cannot_answer(start, images, model, code, detail):
    running = start(model)
    request = inference_pb2.InstanceDetectorInput(url=images.url("/img/scene.png"))
    details = status_of(lambda: running.stub.Predict(request), code)
    assert detail in details and "secret" not in details


def test_a_full_server_sheds_with_pushback_before_fetching(start, images):
    gate = threading.Event()
    model = FakeModel(gate=gate)
    running = start(model, MAX_QUEUE_WAIT="0")  # one pass running plus one waiting
    images.add("/img/grpc-shed.png", PNG, "image/png")
    request = inference_pb2.InstanceDetectorInput(url=images.url("/img/grpc-shed.png"))
    held = [running.stub.Predict.future(request) for _ in "ab"]
    assert model.in_pass.acquire(timeout=10)
    deadline = time.monotonic() + 10
    while len(images.requests_for("/img/grpc-shed.png")) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    third = inference_pb2.InstanceDetectorInput(url=images.url("/img/grpc-shed.png") + "?third")
    with pytest.raises(grpc.RpcError) as failure:
        running.stub.Predict(third)
    gate.set()
    assert [list(future.result(10).objects) for future in held] == [["cat", "dog"]] * 2
    assert failure.value.code() == grpc.StatusCode.UNAVAILABLE and "overloaded" in failure.value.details()
    pushback = dict(failure.value.trailing_metadata())["grpc-retry-pushback-ms"]
    assert int(pushback) >= 1000
    assert not images.requests_for("/img/grpc-shed.png?third")


# -- Detect --------------------------------------------------------------------------------


def test_detect_by_url_and_by_upload_with_options(grpc_server, images):
    options = inference_pb2.DetectOptions(threshold=0.3, masks=inference_pb2.MASK_FORMAT_BOTH)
    answer = grpc_server.stub.Detect(
        inference_pb2.DetectRequest(image=url_input(images, "/img/scene.png"), options=options)
    )
    assert (answer.width, answer.height) == (64, 48)
    assert [item.label for item in answer.instances] == ["cat", "dog", "person"]
    first = answer.instances[0]
    assert (first.box.x1, first.box.y1, first.box.x2, first.box.y2) == (1.0, 2.0, 30.0, 40.0)
    assert first.mask.polygons and first.mask.rle.counts
    uploaded = grpc_server.stub.Detect(inference_pb2.DetectRequest(
        image=inference_pb2.ImageInput(data=PNG), options=inference_pb2.DetectOptions(classes=[" dog", ""])
    ))
    assert [item.label for item in uploaded.instances] == ["dog"] and not uploaded.instances[0].HasField("mask")


@pytest.mark.parametrize(
    ("request_message", "code", "detail"),
    [
        (inference_pb2.DetectRequest(), grpc.StatusCode.INVALID_ARGUMENT, "neither 'url' nor 'data'"),
        (inference_pb2.DetectRequest(image=inference_pb2.ImageInput(data=b"")),
         grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (inference_pb2.DetectRequest(image=inference_pb2.ImageInput(data=b"GIF89a nonsense")),
         grpc.StatusCode.INVALID_ARGUMENT, "not_an_image"),
        (inference_pb2.DetectRequest(image=inference_pb2.ImageInput(data=PNG),
                                     options=inference_pb2.DetectOptions(classes=["unicorn"])),
         grpc.StatusCode.INVALID_ARGUMENT, "unknown classes 'unicorn'"),
        (inference_pb2.DetectRequest(image=inference_pb2.ImageInput(data=PNG),
                                     options=inference_pb2.DetectOptions(threshold=1.5)),
         grpc.StatusCode.INVALID_ARGUMENT, "MIN_SCORE_THRESHOLD"),
        (inference_pb2.DetectRequest(image=inference_pb2.ImageInput(data=PNG),
                                     options=inference_pb2.DetectOptions(masks=7)),
         grpc.StatusCode.INVALID_ARGUMENT, "unknown mask format 7"),
    ],
    ids=["no-image", "empty-upload", "not-an-image", "unknown-class", "threshold", "mask-format"],
)
def test_detect_errors_are_statuses(grpc_server, request_message, code, detail):
    assert detail in status_of(lambda: grpc_server.stub.Detect(request_message), code)


def test_an_upload_over_its_limit(start):
    running = start(FETCH_MAX_BYTES="100")
    request = inference_pb2.DetectRequest(image=inference_pb2.ImageInput(data=PNG + b"\0" * 200))
    assert "larger than 100 bytes" in status_of(
        lambda: running.stub.Detect(request), grpc.StatusCode.RESOURCE_EXHAUSTED
    )


# -- DetectBatch ---------------------------------------------------------------------------


def test_detect_batch_streams_each_image_and_its_errors(grpc_server, images):
    request = inference_pb2.DetectBatchRequest(
        images=[
            url_input(images, "/img/scene.png"),
            inference_pb2.ImageInput(url="ftp://example.com/a.jpg"),
            inference_pb2.ImageInput(data=PNG),
            inference_pb2.ImageInput(),
        ],
        options=inference_pb2.DetectOptions(masks=inference_pb2.MASK_FORMAT_RLE),
    )
    call = grpc_server.stub.DetectBatch(request, metadata=(("x-request-id", "batch-7"),))
    results = list(call)
    assert dict(call.initial_metadata())["x-request-id"] == "batch-7"
    assert [result.index for result in results] == [0, 1, 2, 3]
    assert [result.WhichOneof("result") for result in results] == ["detection", "error", "detection", "error"]
    assert results[1].error.code == "invalid_request" and "http or https" in results[1].error.message
    detected = convert.detection_answer(results[0].detection, "rle").json_dict()
    assert [item["label"] for item in detected["instances"]] == ["cat", "dog"]
    assert set(detected["instances"][0]["mask"]) == {"rle"}


@pytest.mark.parametrize(
    ("images_count", "code", "detail"),
    [(0, grpc.StatusCode.INVALID_ARGUMENT, "no images"), (4, grpc.StatusCode.RESOURCE_EXHAUSTED, "MAX_BATCH")],
)
def test_a_batch_is_refused_whole(start, images_count, code, detail):
    running = start(MAX_BATCH_IMAGES="3")
    request = inference_pb2.DetectBatchRequest(images=[inference_pb2.ImageInput(data=PNG)] * images_count)
    assert detail in status_of(lambda: list(running.stub.DetectBatch(request)), code)
    assert running.model.passes == 0


# -- health and reflection ------------------------------------------------------------------


def test_health_and_reflection_list_the_service(grpc_server):
    health = health_pb2_grpc.HealthStub(grpc_server.channel)
    for name in ("", SERVICE_NAME):  # NOT_SERVING until the readiness loop of serve() says otherwise
        answer = health.Check(health_pb2.HealthCheckRequest(service=name))
        assert answer.status == health_pb2.HealthCheckResponse.NOT_SERVING
    grpc_server.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    assert health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME)).status == (
        health_pb2.HealthCheckResponse.SERVING
    )
    reflection = reflection_pb2_grpc.ServerReflectionStub(grpc_server.channel)
    answers = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = {service.name for service in next(answers).list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
