"""The OpenAPI schema of every HTTP route at ``GET /openapi.json``, and a Swagger UI page on it at
``GET /docs``.

The schema is generated from the API's types (``http_app.spec``) for this deployment's settings
and the served model's categories, and kept once built. The page uses the files of the ``swagger-ui-bundle``
package, served by the app under ``/docs/assets/`` (no CDN: the service may have no internet), and
has no inline script: Swagger UI is started by ``/docs/init.js``, so that the page can send a
Content-Security-Policy that allows scripts from this origin only.
"""

from __future__ import annotations

import json
from pathlib import Path

import swagger_ui_bundle  # type: ignore[import-untyped]
from flask import Blueprint, Response, abort, current_app, send_from_directory

from http_app import spec

ASSETS_DIR = Path(swagger_ui_bundle.swagger_ui_path)

# Set here rather than guessed from the system's mime.types, which differ between hosts.
_ASSET_TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png", ".map": "application/json"}
# The bundle's own swagger-initializer.js opens the Petstore demo; /docs/init.js replaces it.
_NOT_SERVED = {"swagger-initializer.js"}

# The page's URLs are relative, so that it also works behind a proxy that adds a path prefix.
DOCS_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>instance-detector API</title>
  <link rel="stylesheet" href="docs/assets/swagger-ui.css">
  <link rel="icon" type="image/png" href="docs/assets/favicon-32x32.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="docs/assets/swagger-ui-bundle.js"></script>
  <script src="docs/init.js"></script>
</body>
</html>
"""

# validatorUrl null: Swagger UI would otherwise send the schema to validator.swagger.io.
DOCS_INIT = """window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    presets: [SwaggerUIBundle.presets.apis],
  });
});
"""

# Swagger UI sets style attributes and draws its icons from data: URIs; everything else is ours.
DOCS_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


def _asset_names(folder: Path) -> frozenset[str]:
    return frozenset(
        entry.name
        for entry in folder.iterdir()
        if entry.is_file() and entry.suffix in _ASSET_TYPES and entry.name not in _NOT_SERVED
    )


def make_blueprint(assets_dir: Path = ASSETS_DIR) -> Blueprint:
    assets = _asset_names(assets_dir)
    bp = Blueprint("openapi", __name__)

    built: dict[tuple[str, ...] | None, bytes] = {}

    @bp.get("/openapi.json")
    def openapi_schema():
        context = current_app.extensions["api"]
        categories = context.service.model.categories()
        key = None if categories is None else tuple(categories)
        if key not in built:
            built[key] = json.dumps(spec.document(context.settings, categories), indent=1).encode()
        return Response(built[key], mimetype="application/json")

    @bp.get("/docs")
    def docs_page():
        response = Response(DOCS_PAGE, mimetype="text/html")
        response.headers["Content-Security-Policy"] = DOCS_CSP
        return response

    @bp.get("/docs/init.js")
    def docs_init():
        return Response(DOCS_INIT, mimetype="text/javascript")

    @bp.get("/docs/assets/<name>")
    def docs_asset(name: str):
        if name not in assets:
            abort(404)  # the app's handler answers it as a JSON error, as for any unknown path
        return send_from_directory(assets_dir, name, mimetype=_ASSET_TYPES[Path(name).suffix])

    @bp.after_request
    def no_sniffing(response: Response) -> Response:
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    return bp


blueprint = make_blueprint()
