"""The results page: ``GET /`` (``static/index.html``) and its files at ``GET /static/<path>``.

Plain HTML, CSS and an ES module, served by the app itself (no build step, no CDN). The page calls
``GET /v1/model`` and ``POST /v1/detect`` on the same origin and draws the answer on a canvas.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, request, send_from_directory

STATIC_DIR = Path(__file__).resolve().parent / "static"

# Everything comes from this origin; images may come from anywhere (a pasted URL is shown as the
# browser loads it, a chosen file as a blob: URL), which is why img-src is the only open source.
CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "img-src 'self' data: blob: http: https:",
        "style-src 'self'",
        "script-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)

# The page's own responses (Flask's app-level static route, if the app keeps one, serves the same
# folder under the same path, so it gets the same headers).
PAGE_ENDPOINTS = frozenset({"page.index", "page.static_file", "static"})

blueprint = Blueprint("page", __name__)


@blueprint.get("/")
def index() -> Response:
    return send_from_directory(STATIC_DIR, "index.html")


@blueprint.get("/static/<path:filename>")
def static_file(filename: str) -> Response:
    # send_from_directory refuses paths outside STATIC_DIR (404) and answers conditional requests
    return send_from_directory(STATIC_DIR, filename)


@blueprint.after_app_request
def page_headers(response: Response) -> Response:
    if request.endpoint not in PAGE_ENDPOINTS:
        return response
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    # the browser fetches pasted image URLs itself: do not tell those hosts where the page lives
    response.headers["Referrer-Policy"] = "no-referrer"
    # file names carry no version, so a cached copy must be revalidated (ETag / Last-Modified make
    # that a 304) or a new index.html could meet an old app.js
    response.headers["Cache-Control"] = "no-cache"
    return response
