"""Process-wide logging to stderr, so that supervisord passes every line to the container log."""

from __future__ import annotations

import logging


class _StackHandler(logging.StreamHandler):
    """The handler this module installs; marked by its class so it is installed once."""


def configure_logging(process_name: str, level: str = "INFO") -> None:
    """Install one stderr handler on the root logger unless the host program already did."""
    root = logging.getLogger()
    if any(isinstance(handler, _StackHandler) for handler in root.handlers):
        return
    handler = _StackHandler()
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s [{process_name}:%(process)d] %(levelname)s %(name)s: %(message)s")
    )
    root.addHandler(handler)
    root.setLevel(level)
