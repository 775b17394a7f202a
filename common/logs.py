"""Process-wide logging to stderr, so that supervisord passes every line to the container log."""

import logging
import os


def configure_logging(process_name: str) -> None:
    """Install one stderr handler on the root logger unless the host program already did."""
    root = logging.getLogger()
    if any(getattr(handler, "_instance_detector", False) for handler in root.handlers):
        return
    handler = logging.StreamHandler()
    handler._instance_detector = True
    handler.setFormatter(logging.Formatter(
        f"%(asctime)s [{process_name}:%(process)d] %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(os.environ.get("LOG_LEVEL", "INFO").upper())
