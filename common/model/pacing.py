"""The model's measured pass time, published for admission control (``common.admission``) to read:
the model writes, the servers read, so the model package needs nothing of request handling."""

from __future__ import annotations

import os
import tempfile

PASS_SECONDS_FILE = "pass-seconds"
# Weight of the newest pass in the published moving average.
PASS_SECONDS_SMOOTHING = 0.3


def publish_pass_seconds(run_dir: str, seconds: float, previous: float | None) -> float:
    """Fold one pass's duration into the moving average and publish it in ``run_dir``
    (atomically); returns it."""
    average = seconds if previous is None else previous + PASS_SECONDS_SMOOTHING * (seconds - previous)
    with tempfile.NamedTemporaryFile("w", dir=run_dir, prefix=".pass-", delete=False) as handle:
        handle.write(f"{average:.4f}\n")
    os.replace(handle.name, os.path.join(run_dir, PASS_SECONDS_FILE))
    return average
