"""HTTP adapter: a Flask app that turns requests into ``DetectionService.predict`` calls."""

from http_app.app import create_app

__all__ = ["create_app"]
