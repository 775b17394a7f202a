"""The HTTP transport: ``POST /v1/detect/batch``, its NDJSON answer read line by line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import requests

from client.transport import CONNECT_TIMEOUT, BatchResult, Failure, Options, ServiceError


class HttpTransport:
    def __init__(self, base_url: str, timeout: float):
        base = base_url if "://" in base_url else "http://" + base_url
        self.endpoint = base.rstrip("/") + "/v1/detect/batch"
        self.timeout = timeout
        self.session = requests.Session()

    def detect_batch(
        self, urls: list[str], uploads: list[tuple[str, bytes]], options: Options
    ) -> Iterator[BatchResult]:
        # JSON when nothing is uploaded (smaller, and what the docs show); multipart otherwise
        if uploads:
            fields = [("url", url) for url in urls] + self._form_options(options)
            files = [("image", (name, data, "application/octet-stream")) for name, data in uploads]
            send: dict[str, Any] = {"data": fields, "files": files}
        else:
            send = {"json": {"urls": urls, **self._json_options(options)}}
        try:
            # the read timeout bounds the wait for each next line, i.e. for each image
            response = self.session.post(
                self.endpoint, stream=True, timeout=(min(CONNECT_TIMEOUT, self.timeout), self.timeout), **send
            )
        except requests.ReadTimeout:
            raise ServiceError(f"no answer from {self.endpoint} within {self.timeout:g} s") from None
        except requests.RequestException as exc:
            raise ServiceError(f"cannot reach {self.endpoint}: {_root_cause(exc)}") from None
        with response:
            if response.status_code != 200:
                raise ServiceError(_http_refusal(response))
            try:
                # chunk_size=None: hand over each chunk as it comes rather than waiting for 512 bytes
                for line in response.iter_lines(chunk_size=None):
                    if line.strip():
                        yield _parse_line(line)
            except requests.RequestException as exc:
                raise ServiceError(f"the answer from {self.endpoint} broke off: {_root_cause(exc)}") from None

    @staticmethod
    def _json_options(options: Options) -> dict[str, Any]:
        fields: dict[str, Any] = {"masks": options.masks}
        if options.threshold is not None:
            fields["threshold"] = options.threshold
        if options.classes:
            fields["classes"] = list(options.classes)
        return fields

    @staticmethod
    def _form_options(options: Options) -> list[tuple[str, str]]:
        fields = [("masks", options.masks)]
        if options.threshold is not None:
            fields.append(("threshold", repr(options.threshold)))
        if options.classes:
            fields.append(("classes", ",".join(options.classes)))
        return fields


def _root_cause(exc: BaseException) -> str:
    """The innermost error under requests' and urllib3's wrappers ("Connection refused"), which
    says what went wrong without three layers of pool and retry wording."""
    while True:
        reason = getattr(exc, "reason", None)
        inner = exc.__cause__ or (reason if isinstance(reason, BaseException) else None)
        if inner is None and exc.args and isinstance(exc.args[0], BaseException):
            inner = exc.args[0]
        if inner is None:
            return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        exc = inner


def _http_refusal(response: requests.Response) -> str:
    """The service's own words for a refused batch (its JSON error body), else the status."""
    try:
        error = response.json()["error"]
        text = f"{error['code']}: {error['message']} (HTTP {response.status_code})"
    except (ValueError, KeyError, TypeError):
        text = f"HTTP {response.status_code}: {response.text.strip()[:300]}"
    retry_after = response.headers.get("Retry-After")
    return f"{text}; retry after {retry_after} s" if retry_after else text


def _parse_line(line: bytes) -> BatchResult:
    try:
        answer = json.loads(line)
        index = int(answer.pop("index"))
        if "error" in answer:
            return index, Failure(str(answer["error"]["code"]), str(answer["error"]["message"]))
        return index, answer
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ServiceError(f"unexpected line in the answer: {line[:200]!r}") from None
