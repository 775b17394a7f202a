"""The OpenAPI schema (``GET /openapi.json``, generated from ``common.api``'s types) is true of the
running stack: ``schemathesis run --checks all`` (the configuration is the repository's
``schemathesis.toml``) generates valid and invalid requests for every operation, every content
type and undeclared methods, sends them to real gunicorn, and finds no failure. Also: the NDJSON
lines of a batch are the schema's, and the docs page loads with its files from the app itself.

Generated URLs name hosts that cannot be reached here (502/504) or that the SSRF guard refuses
(403); generated uploads are real 1x1 images, so detections are checked too. The stack allows at
most 3 images per batch (the schema says so), which keeps the generated batches short."""

from __future__ import annotations

import json
import re
import subprocess

import jsonschema
import pytest
import requests
import schemathesis

from testkit import REPO, VENV_BIN
from testkit.checkpoints import CLASS_A
from testkit.images import encode, scene
from testkit.stack import FAST_LIMITS, Stack

EXAMPLES_PER_OPERATION = 40


@pytest.fixture(scope="module")
def schema_stack(tmp_path_factory, checkpoints):
    path, sha256 = checkpoints[CLASS_A]
    limits = FAST_LIMITS | {"MAX_BATCH_IMAGES": "3", "FETCH_TOTAL_TIMEOUT": "3", "FETCH_CONNECT_TIMEOUT": "2"}
    with Stack(tmp_path_factory.mktemp("schema"), WEIGHTS_FILE=path, WEIGHTS_SHA256=sha256,
               MAX_QUEUE_WAIT="600", **limits).running() as running:
        yield running


def test_schemathesis_finds_no_failure(schema_stack):
    command = [
        str(VENV_BIN / "schemathesis"), "run", "--checks", "all",
        "--max-examples", str(EXAMPLES_PER_OPERATION), "--seed", "1", "--request-timeout", "120",
        "--no-color", f"{schema_stack.http}/openapi.json",
    ]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1800)
    summary = run.stdout[run.stdout.rfind("SUMMARY"):]
    failures = run.stdout[run.stdout.find("FAILURES"):]
    assert run.returncode == 0, "\n".join(line[:400] for line in failures.splitlines())[-15000:] + run.stderr[-3000:]
    # every operation but the schema's own (schemathesis leaves /openapi.json out)
    operations = sum(len(item) for item in requests.get(f"{schema_stack.http}/openapi.json").json()["paths"].values())
    assert f"Selected: {operations - 1}/{operations - 1}" in summary and f"Tested: {operations - 1}" in summary, summary
    print(summary)  # the figures for the closing note: pytest -s shows them


def test_batch_lines_are_the_schemas(schema_stack):
    document = requests.get(f"{schema_stack.http}/openapi.json", timeout=30).json()
    line_schema = document["paths"]["/v1/detect/batch"]["post"]["responses"]["200"]["content"]
    validator = jsonschema.Draft202012Validator(
        line_schema["application/x-ndjson"]["schema"] | {"components": document["components"]}
    )
    png = encode(scene(64, 48), "PNG")
    answer = requests.post(
        f"{schema_stack.http}/v1/detect/batch?masks=both",
        files=[("image", ("a.png", png)), ("image", ("b.png", b"not an image"))],
        data={"url": "ftp://nowhere/x.jpg"},
        timeout=120,
    )
    assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in answer.text.splitlines()]
    assert sorted(line["index"] for line in lines) == [0, 1, 2]
    assert {"error" in line for line in lines} == {True, False}
    for line in lines:
        validator.validate(line)


def test_schema_is_valid_openapi_and_relative(schema_stack):
    answer = requests.get(f"{schema_stack.http}/openapi.json", timeout=30)
    assert answer.status_code == 200 and answer.headers["Content-Type"] == "application/json"
    document = answer.json()
    assert document["openapi"].startswith("3.1")
    schemathesis.openapi.from_dict(document).validate()
    assert [server["url"] for server in document["servers"]] == ["/"]  # relative: any host
    assert "enum" in json.dumps(document["components"]["schemas"]["Options"]["properties"]["classes"])
    assert not (REPO / "http_app" / "openapi.json").exists(), "the schema is generated, not kept as a file"


def test_docs_page_and_its_files_load(schema_stack):
    http = schema_stack.http
    page_answer = requests.get(http + "/docs", timeout=30)
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
        answer = requests.get(f"{http}/{file}", timeout=30)
        assert answer.status_code == 200, file
        assert answer.headers["Content-Type"].startswith(expected[file[file.rindex(".") :]]), file
        assert answer.content
    init = requests.get(http + "/docs/init.js", timeout=30).text
    assert "SwaggerUIBundle(" in init and '"openapi.json"' in init


def test_unknown_docs_files_are_json_404s(schema_stack):
    for name in ("swagger-initializer.js", "index.html", "nope.js", "..%2Fopenapi.json"):
        answer = requests.get(f"{schema_stack.http}/docs/assets/{name}", timeout=30)
        assert answer.status_code == 404, name
        assert answer.json()["error"]["code"] == "not_found"
