"""The OpenAPI schema (``GET /openapi.json``) is true of the running app: schemathesis generates
requests for every operation, valid and invalid ones, sends them to the real stack and checks that
no answer is a server error and that each has a documented status, content type, body and
headers. Also: the schema documents every route the app has, and the docs page loads with its
files from the app itself.

Generated URLs are refused (400 when they are not http(s) URLs, 403 when the SSRF guard refuses
their host), but the generated uploads and raw bodies include real 1×1 images, so 200 answers
(detections and NDJSON lines) are checked too."""

from __future__ import annotations

import ast
import json
import re

import jsonschema
import requests
import schemathesis
from flask import Flask
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from http_app import openapi, page
from testkit import REPO

# Generated uploads are real images, and each costs a forward pass (about 2 s on one CPU thread):
# batches of more (the boundary cases of 31 and 32 images) would take minutes, so they are not sent.
# Big batches are still sent as JSON (their URLs fail fast); test_detect.py covers real batches.
MAX_UPLOADS = 4

# positive_data_acceptance is left out on purpose: a schema cannot say which URLs the SSRF guard
# lets through or which bytes are an image, so valid-looking requests are rightly refused.
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    negative_data_rejection,
]
# 502 and 504 are documented answers about the image host, not failures of the server: here, with
# no internet, the schema's example URL cannot be resolved.
NOT_SERVER_ERRORS = ["2xx", "3xx", "4xx", "502", "504"]
# Invalid data is refused with one of these: 413 is how a batch over MAX_BATCH_IMAGES is refused,
# 414 how gunicorn refuses a request line over 4094 bytes.
REJECTED = ["400", "404", "405", "413", "414", "422"]


# Loaded from the file at collection, so that every operation is a test of its own (schemathesis's
# lazy fixture loader does not work with this pytest); the test below checks that the app serves
# this very file, and each call goes to the session's stack.
api_schema = schemathesis.openapi.from_path(openapi.SCHEMA_PATH)
api_schema.config.checks.negative_data_rejection.expected_statuses = REJECTED
api_schema.config.checks.not_a_server_error.expected_statuses = NOT_SERVER_ERRORS


def _uploads(case) -> int:
    images = case.body.get("image") if isinstance(case.body, dict) else None
    return len(images) if isinstance(images, list) else 0


def ndjson_lines_conform(ctx, response, case):
    """Each line of a batch's NDJSON answer is a JSON object as the schema's ``BatchLine`` says
    (schemathesis has no NDJSON reader, so it would not look inside)."""
    content_type = (response.headers.get("content-type") or [""])[0]
    if response.status_code != 200 or not content_type.startswith("application/x-ndjson"):
        return None
    document = case.operation.schema.raw_schema
    validator = jsonschema.Draft4Validator(
        {"$ref": "#/components/schemas/BatchLine", "components": document["components"]}
    )
    lines = response.content.decode().splitlines()
    assert lines, "a batch answered 200 with no lines"
    for line in lines:
        validator.validate(json.loads(line))
    return None


@api_schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
def test_app_keeps_to_its_schema(case, stack):
    if case.media_type == "multipart/form-data" and _uploads(case) > MAX_UPLOADS:
        return  # see MAX_UPLOADS
    checks = CHECKS
    if case.media_type == "multipart/form-data":
        # A form carries only text: a field mutated to another type ({} for a URL) is sent as the
        # text "{}", which is a string again, so "invalid data accepted" would be a false alarm.
        checks = [check for check in CHECKS if check is not negative_data_rejection]
    case.call_and_validate(
        base_url=stack.http, checks=checks, additional_checks=[ndjson_lines_conform], timeout=120
    )


def _app_routes() -> set[str]:
    """Every route of the app, as OpenAPI paths: create_app's own (read from its source, since
    building the app would start loading a model) and those of its blueprints."""
    routes = set()
    tree = ast.parse((REPO / "http_app" / "app.py").read_text())
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name)
            and node.func.value.id == "app"
            and node.func.attr in ("get", "post", "put", "patch", "delete", "route")
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            routes.add(node.args[0].value)
    bare = Flask(__name__)
    bare.register_blueprint(page.blueprint)
    bare.register_blueprint(openapi.blueprint)
    routes |= {rule.rule for rule in bare.url_map.iter_rules() if rule.endpoint != "static"}
    return {re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", route) for route in routes}


def test_schema_is_valid_and_documents_every_route(stack):
    answer = requests.get(stack.http + "/openapi.json", timeout=30)
    assert answer.status_code == 200
    assert answer.headers["Content-Type"] == "application/json"
    assert answer.content == openapi.SCHEMA_PATH.read_bytes()  # served as written
    document = answer.json()
    schemathesis.openapi.from_dict(document).validate()  # against the OpenAPI 3.0 meta-schema
    assert [server["url"] for server in document["servers"]] == ["/"]  # relative: any host
    assert _app_routes() <= set(document["paths"]), "routes missing from http_app/openapi.json"


def test_docs_page_and_its_files_load(stack):
    page_answer = requests.get(stack.http + "/docs", timeout=30)
    assert page_answer.status_code == 200
    assert page_answer.headers["Content-Type"].startswith("text/html")
    assert "script-src 'self'" in page_answer.headers["Content-Security-Policy"]
    html = page_answer.text
    assert not re.search(r"<script(?![^>]*\ssrc=)[^>]*>", html), "the page has an inline script"
    assert not re.search(r"(?:src|href)=\"(?:https?:)?//", html), "the page loads files from elsewhere"
    expected = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
    files = re.findall(r"(?:src|href)=\"([^\"]+)\"", html)
    assert {"docs/assets/swagger-ui-bundle.js", "docs/assets/swagger-ui.css", "docs/init.js"} <= set(files)
    for file in files:
        answer = requests.get(f"{stack.http}/{file}", timeout=30)
        assert answer.status_code == 200, file
        assert answer.headers["Content-Type"].startswith(expected[file[file.rindex(".") :]]), file
        assert answer.content
    init = requests.get(stack.http + "/docs/init.js", timeout=30).text
    assert "SwaggerUIBundle(" in init and '"openapi.json"' in init


def test_unknown_docs_files_are_json_404s(stack):
    for name in ("swagger-initializer.js", "index.html", "nope.js", "..%2Fopenapi.json"):
        answer = requests.get(f"{stack.http}/docs/assets/{name}", timeout=30)
        assert answer.status_code == 404, name
        assert answer.json()["error"]["code"] == "not_found"
