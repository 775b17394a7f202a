"""Every HTTP route, driven in process through Flask's test client over a fake model: answers,
status codes, error bodies, headers (X-Request-ID, Retry-After, Allow) and counters. Images come
from an HTTP server on 127.0.0.1 that the settings allow; private hosts are only refused."""

from __future__ import annotations

import io
import json
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from common import api
from common.config import Settings
from http_app.app import create_app
from testkit.fake_model import CATEGORIES, FakeModel
from testkit.images import encode, scene

PNG = encode(scene(64, 48), "PNG")


@pytest.fixture
def make_app(run_dir, images):
    def make(model: FakeModel | None = None, **env: str):
        values = {"RUN_DIR": str(run_dir), "ALLOWED_PRIVATE_TARGETS": f"127.0.0.1:{images.port}"} | env
        settings = Settings.from_env(values)
        app = create_app(settings, model if model is not None else FakeModel())
        return app.test_client()

    return make


@pytest.fixture
def client(make_app):
    return make_app()


def counter(client, name: str) -> float:
    text = client.get("/metrics").get_data(as_text=True)
    for family in text_string_to_metric_families(text):
        if family.name == name:
            return family.samples[0].value
    return 0.0


def error_of(response, status: int, code: str) -> str:
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert body["error"]["code"] == code and "Traceback" not in body["error"]["message"]
    return body["error"]["message"]


# -- /predict ------------------------------------------------------------------------------


def test_predict_answers_names_and_counts_every_call(client, images):
    before = counter(client, "app_http_inference_count")
    answer = client.post("/predict", json={"url": images.url("/img/scene.png")})
    assert answer.status_code == 200 and answer.get_json() == {"objects": ["cat", "dog"]}
    client.post("/predict", data="not json")
    assert counter(client, "app_http_inference_count") == before + 2


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ("not json", 400, "invalid_request"),
        ("[1]", 400, "invalid_request"),
        ("{}", 400, "invalid_request"),
        ('{"url": 5}', 400, "invalid_request"),
        ('{"url": "0"}', 400, "invalid_request"),
        ('{"url": "ftp://example.com/a.jpg"}', 400, "invalid_request"),
        ('{"url": "http://a:99999/x"}', 400, "invalid_request"),
        ('{"url": "http://10.0.0.1/x.jpg"}', 403, "forbidden_target"),
        ('{"url": "http://169.254.169.254/latest"}', 403, "forbidden_target"),
    ],
)
def test_predict_refuses_bad_bodies(client, body, status, code):
    message = error_of(client.post("/predict", data=body, content_type="application/json"), status, code)
    if status == 403:
        assert "ALLOWED_PRIVATE_TARGETS" in message


def test_predict_maps_the_image_hosts_failures(client, images):
    error_of(client.post("/predict", json={"url": images.url("/img/text")}), 422, "not_an_image")
    error_of(client.post("/predict", json={"url": images.url("/img/missing")}), 502, "upstream_failed")
    error_of(client.post("/predict", json={"url": "http://x" * 20000}), 413, "too_large")


def test_a_request_id_is_kept_when_sane_and_made_otherwise(client, images):
    url = images.url("/img/scene.png")
    kept = client.post("/predict", json={"url": url}, headers={"X-Request-ID": "abc-123"})
    assert kept.headers["X-Request-ID"] == "abc-123"
    made = client.post("/predict", json={"url": url}, headers={"X-Request-ID": "bad id\x7f"})
    assert made.headers["X-Request-ID"] not in ("", "bad id\x7f")
    refused = client.post("/v1/detect", json={}, headers={"X-Request-ID": "r-1"})
    assert refused.status_code == 400 and refused.headers["X-Request-ID"] == "r-1"


def test_a_model_that_failed_to_load_is_503_and_readyz_says_why(make_app, images):
    client = make_app(FakeModel(state="failed", message="set WEIGHTS_FILE"))
    message = error_of(client.post("/predict", json={"url": images.url("/img/scene.png")}), 503, "not_ready")
    assert "WEIGHTS_FILE" in message
    ready = client.get("/readyz")
    assert ready.status_code == 503 and ready.get_json() == {
        "status": "failed",
        "message": "set WEIGHTS_FILE",
    }
    error_of(client.get("/v1/model"), 503, "not_ready")
    assert client.get("/healthz").get_json() == {"status": "alive"}


def test_a_failing_model_is_a_500_without_its_traceback(make_app, images):
    client = make_app(FakeModel(error=RuntimeError("secret detail")))
    message = error_of(client.post("/predict", json={"url": images.url("/img/scene.png")}), 500, "internal")
    assert "secret" not in message
    assert client.get("/healthz").status_code == 200  # still serving


def test_a_full_stack_sheds_with_retry_after_before_fetching(make_app, images):
    gate = threading.Event()
    model = FakeModel(gate=gate)
    client = make_app(model, MAX_QUEUE_WAIT="0")  # one pass running plus one waiting
    images.add("/img/shed.png", PNG, "image/png")
    url = images.url("/img/shed.png")
    held = [
        threading.Thread(target=client.post, args=("/predict",), kwargs={"json": {"url": url}}) for _ in "ab"
    ]
    for thread in held:
        thread.start()
    assert model.in_pass.acquire(timeout=10)
    deadline = time.monotonic() + 10
    while True:  # the second request has its slot once it waits for the model's pass
        fetched = len(images.requests_for("/img/shed.png"))
        if fetched >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    shed = client.post("/predict", json={"url": url + "?third"})
    gate.set()
    for thread in held:
        thread.join(10)
    error_of(shed, 503, "overloaded")
    assert int(shed.headers["Retry-After"]) >= 1
    assert not images.requests_for("/img/shed.png?third")


# -- /v1/detect ----------------------------------------------------------------------------


def test_detect_by_url_with_masks(client, images):
    answer = client.post("/v1/detect", json={"url": images.url("/img/scene.png"), "masks": "both"})
    assert answer.status_code == 200
    body = answer.get_json()
    assert (body["width"], body["height"]) == (64, 48)
    assert [item["label"] for item in body["instances"]] == ["cat", "dog"]
    first = body["instances"][0]
    assert first["box"] == [1.0, 2.0, 30.0, 40.0] and set(first["mask"]) == {"polygons", "rle"}
    plain = client.post("/v1/detect", json={"url": images.url("/img/scene.png")}).get_json()
    assert "mask" not in plain["instances"][0]


def test_detect_takes_an_upload_a_raw_body_and_query_options(client):
    form = client.post("/v1/detect", data={"image": (io.BytesIO(PNG), "a.png"), "masks": "rle"})
    assert form.status_code == 200 and set(form.get_json()["instances"][0]["mask"]) == {"rle"}
    raw = client.post("/v1/detect?threshold=0.4&classes=person,cat", data=PNG, content_type="image/png")
    assert [item["label"] for item in raw.get_json()["instances"]] == ["cat", "person"]
    repeated = client.post(
        "/v1/detect?classes=dog&classes=cat", data=PNG, content_type="application/octet-stream"
    )
    assert [item["label"] for item in repeated.get_json()["instances"]] == ["cat", "dog"]


def test_query_options_complete_a_json_body_which_wins(client, images):
    url = images.url("/img/scene.png")
    answer = client.post("/v1/detect?threshold=0.4&classes=dog", json={"url": url, "classes": ["person"]})
    assert [item["label"] for item in answer.get_json()["instances"]] == ["person"]


@pytest.mark.parametrize(
    ("request_args", "code"),
    [
        ({"json": {"url": "http://127.0.0.1/x", "treshold": 0.5}}, "invalid_request"),
        ({"json": {"url": "http://127.0.0.1/x", "threshold": 0.01}}, "invalid_request"),
        ({"json": {"url": "http://127.0.0.1/x", "threshold": "0.5"}}, "invalid_request"),
        ({"json": {"url": "http://127.0.0.1/x", "threshold": True}}, "invalid_request"),
        ({"json": {"url": "http://127.0.0.1/x", "masks": "outline"}}, "invalid_request"),
        ({"json": {"url": "http://127.0.0.1/x", "classes": "cat"}}, "invalid_request"),
        ({"json": {"url": "http://127.0.0.1/x", "classes": ["unicorn"]}}, "invalid_request"),
        ({"json": {"url": "http://127.0.0.1/x"}, "query_string": {"mask": "rle"}}, "invalid_request"),
        ({"data": {"image": (io.BytesIO(PNG), "a.png"), "url": "http://x/y"}}, "invalid_request"),
        ({"data": {"threshold": ["0.5", "0.6"], "image": (io.BytesIO(PNG), "a.png")}}, "invalid_request"),
        ({"data": {"url": "http://x/y"}, "content_type": "multipart/form-data"}, "invalid_request"),
        ({"data": {"picture": (io.BytesIO(PNG), "a.png")}}, "invalid_request"),
        ({"data": b"", "content_type": "image/png"}, "not_an_image"),
        ({"data": b"GIF89a-truncated", "content_type": "image/gif"}, "not_an_image"),
    ],
)
def test_detect_refuses_bad_requests(client, request_args, code):
    response = client.post("/v1/detect", **request_args)
    error_of(response, 400 if code == "invalid_request" else 422, code)


def test_an_unknown_class_is_refused_before_fetching(client, images):
    error_of(
        client.post("/v1/detect", json={"url": images.url("/img/never"), "classes": ["kite"]}),
        400,
        "invalid_request",
    )
    assert not images.requests_for("/img/never")


def test_uploads_over_their_limits_are_413(make_app):
    client = make_app(MAX_UPLOAD_BYTES="4096", FETCH_MAX_BYTES="2048")
    error_of(client.post("/v1/detect", data=b"\0" * 5000, content_type="image/png"), 413, "too_large")
    error_of(client.post("/v1/detect", data={"image": (io.BytesIO(b"\0" * 3000), "a.png")}), 413, "too_large")


# -- /v1/detect/batch ----------------------------------------------------------------------


def lines(response) -> list[dict]:
    assert response.status_code == 200 and response.mimetype == "application/x-ndjson"
    return [json.loads(line) for line in response.get_data(as_text=True).splitlines()]


def test_a_batch_answers_one_line_per_image(client, images):
    urls = [images.url("/img/scene.png"), "nope", 7, images.url("/img/text")]
    answer = lines(client.post("/v1/detect/batch", json={"urls": urls, "masks": "polygons"}))
    assert [line["index"] for line in answer] == [0, 1, 2, 3]
    assert [item["label"] for item in answer[0]["instances"]] == ["cat", "dog"]
    assert "polygons" in answer[0]["instances"][0]["mask"]
    assert [line["error"]["code"] for line in answer[1:]] == [
        "invalid_request",
        "invalid_request",
        "not_an_image",
    ]


def test_a_multipart_batch_mixes_urls_and_uploads(client, images):
    form = {"url": [images.url("/img/scene.png")], "image": [(io.BytesIO(PNG), "a.png")], "classes": "dog"}
    answer = lines(client.post("/v1/detect/batch", data=form))
    assert [[item["label"] for item in line["instances"]] for line in answer] == [["dog"], ["dog"]]


def test_a_batch_refused_whole_gets_one_json_error(make_app, images):
    client = make_app(MAX_BATCH_IMAGES="2")
    images.add("/img/batch-refused.png", PNG, "image/png")
    url = images.url("/img/batch-refused.png")
    error_of(client.post("/v1/detect/batch", json={"urls": []}), 400, "invalid_request")
    error_of(client.post("/v1/detect/batch", json={"urls": [url] * 3}), 413, "too_large")
    multipart = "multipart/form-data"
    error_of(
        client.post("/v1/detect/batch", data={"url": [url] * 3}, content_type=multipart), 413, "too_large"
    )
    error_of(client.post("/v1/detect/batch", data={}, content_type=multipart), 400, "invalid_request")
    error_of(client.post("/v1/detect/batch", data=PNG, content_type="image/png"), 400, "invalid_request")
    as_text = {"url": url, "image": "not a file"}  # an image part without a filename
    refused = client.post("/v1/detect/batch", data=as_text, content_type=multipart)
    assert "as a file" in error_of(refused, 400, "invalid_request")
    error_of(
        client.post("/v1/detect/batch", json={"urls": [url], "classes": ["kite"]}), 400, "invalid_request"
    )
    assert not images.requests_for("/img/batch-refused.png")


# -- the other routes ----------------------------------------------------------------------


def test_model_description_health_and_metrics(client):
    model = client.get("/v1/model").get_json()
    assert model["categories"][:2] == ["person", "bicycle"] and model["mask_formats"][0] == "none"
    assert model["score_threshold"] == 0.75 and model["max_batch_images"] == 32
    assert client.get("/readyz").get_json() == {"status": "ready", "message": "model loaded"}
    assert client.get("/metrics").mimetype == "text/plain"


def test_loading_is_not_ready(make_app):
    client = make_app(FakeModel(state="loading", message="loading weights"))
    assert client.get("/readyz").status_code == 503
    options = client.get("/openapi.json").get_json()["components"]["schemas"]["Options"]
    assert "enum" not in json.dumps(options["properties"]["classes"])  # not known yet


def test_unknown_paths_and_methods_are_json_errors_with_allow(client):
    error_of(client.get("/nope"), 404, "not_found")
    not_allowed = client.put("/v1/detect")
    error_of(not_allowed, 405, "method_not_allowed")
    assert set(not_allowed.headers["Allow"].replace(" ", "").split(",")) == {"POST", "OPTIONS"}
    assert "GET" in client.delete("/healthz").headers["Allow"]
    head = client.head("/healthz")
    assert head.status_code == 200 and head.data == b""
    assert client.options("/predict").headers["Allow"]


def test_the_page_and_the_docs_are_served(client):
    assert client.get("/").mimetype == "text/html"
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/docs").mimetype == "text/html"
    assert client.get("/docs/init.js").mimetype == "text/javascript"
    assert client.get("/docs/assets/swagger-ui.css").mimetype == "text/css"
    error_of(client.get("/docs/assets/nope.js"), 404, "not_found")


def test_the_schema_documents_every_route_with_the_configured_limits(make_app):
    client = make_app(MAX_BATCH_IMAGES="7", MIN_SCORE_THRESHOLD="0.3", MAX_URL_LENGTH="100")
    document = client.get("/openapi.json").get_json()
    app_paths = {
        rule.rule.replace("<path:", "{").replace("<", "{").replace(">", "}")
        for rule in client.application.url_map.iter_rules()
    }
    assert app_paths == set(document["paths"])
    schemas = document["components"]["schemas"]
    assert schemas["BatchRequest"]["properties"]["urls"]["maxItems"] == 7
    assert schemas["DetectRequest"]["properties"]["url"]["maxLength"] == 100
    assert schemas["Options"]["properties"]["threshold"]["minimum"] == 0.3
    classes = schemas["Options"]["properties"]["classes"]["anyOf"][0]
    assert classes["items"]["enum"] == ["person", "bicycle", "car", "cat", "dog"]
    parameters = {item["name"]: item for item in document["paths"]["/v1/detect"]["post"]["parameters"]}
    assert {"threshold", "classes", "masks", "X-Request-ID"} <= set(parameters)
    assert parameters["classes"]["schema"]["maxItems"] == api.query_classes_limit(CATEGORIES)


def test_a_query_string_names_no_more_classes_than_fit_its_request_line(client, images):
    limit = api.query_classes_limit(CATEGORIES)
    url = images.url("/img/scene.png")
    fits = client.post("/v1/detect", json={"url": url}, query_string=[("classes", "dog")] * limit)
    assert [item["label"] for item in fits.get_json()["instances"]] == ["dog"]
    over = client.post("/v1/detect", json={"url": url}, query_string=[("classes", "dog")] * (limit + 1))
    assert f"at most {limit} classes" in error_of(over, 400, "invalid_request")
