"""The results page at ``GET /`` and its static files (being written)."""

from __future__ import annotations

from flask import Blueprint

blueprint = Blueprint("page", __name__)
