"""``python -m common.model``: convert and cache the exact path's graph for the configured weights
now (e.g. at image build), so that the service's first start does not pay for it. Exits 1 when the
accelerated path could not be set up (the service would run torchvision eager)."""

from __future__ import annotations

import dataclasses
import sys

from common.config import Settings
from common.logs import configure_logging
from common.model.accel.cache import default_cache_dir
from common.model.detector import Detector


def main() -> int:
    settings = Settings.from_env()
    configure_logging("model", settings.log_level)
    if settings.detect_mode == "eager":
        settings = dataclasses.replace(settings, detect_mode="exact")
    detector = Detector.from_settings(settings)
    print(f"detect path {detector.mode}; cache {settings.accel_cache_dir or default_cache_dir()}")
    return 0 if detector.mode != "eager" else 1


if __name__ == "__main__":
    sys.exit(main())
