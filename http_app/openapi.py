"""``GET /openapi.json`` and the docs page at ``/docs`` (being written)."""

from __future__ import annotations

from flask import Blueprint

blueprint = Blueprint("openapi", __name__)
