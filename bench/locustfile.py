"""Load on your own deployment with locust (not a dependency of the service: ``pip install locust``).

    LOAD_IMAGE_URL=https://images.example.com/street.jpg \
        locust -f bench/locustfile.py --host http://your-host:8080 \
        --users 32 --spawn-rate 8 --run-time 2m --stop-timeout 60 --headless

``PredictUser``s call ``POST /predict`` with ``LOAD_IMAGE_URL`` back to back (closed loop). A
``503`` with the error code ``overloaded`` is the service shedding load as designed: it is counted
as a success under the name ``/predict (shed)``, apart from the accepted ``/predict`` calls, and the
user then waits the ``Retry-After`` it was given (``LOAD_POLITE=0``: retries at once). Any other
answer is a failure. One ``HealthProbe`` user (counted among ``--users``) polls ``/healthz`` and
``/readyz`` every second and fails a probe slower than ``LOAD_HEALTH_LIMIT`` seconds (default 1).

The image host must be reachable from the service, and allowed by it (a private address needs
``ALLOWED_PRIVATE_TARGETS``). Only point this at a deployment you run.
"""

from __future__ import annotations

import os

from locust import HttpUser, constant, events, task

IMAGE_URL = os.environ.get("LOAD_IMAGE_URL", "")
POLITE = os.environ.get("LOAD_POLITE", "1") != "0"
HEALTH_LIMIT = float(os.environ.get("LOAD_HEALTH_LIMIT", "1.0"))
MAX_RETRY_AFTER = 60.0  # never wait longer than this, whatever the service says


@events.test_start.add_listener
def _require_image_url(environment, **_kwargs):
    if not IMAGE_URL:
        raise SystemExit("set LOAD_IMAGE_URL to the URL of an image the service can fetch")


def _error_code(response) -> str:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return ""


def _retry_after(response) -> float:
    """Seconds from a Retry-After header (delta-seconds; an HTTP date or nothing: 1 s)."""
    try:
        return min(MAX_RETRY_AFTER, max(0.0, float(response.headers.get("Retry-After", "1"))))
    except ValueError:
        return 1.0


class PredictUser(HttpUser):
    """A client calling /predict in a closed loop, pausing only when shed (by Retry-After)."""

    weight = 1

    def on_start(self):
        self._pause = 0.0

    def wait_time(self):
        pause, self._pause = self._pause, 0.0
        return pause

    @task
    def predict(self):
        with self.client.post("/predict", json={"url": IMAGE_URL}, name="/predict",
                              catch_response=True) as response:
            if response.status_code == 200 and isinstance(_json_objects(response), list):
                response.success()
            elif response.status_code == 503 and _error_code(response) == "overloaded":
                response.request_meta["name"] = "/predict (shed)"
                response.success()
                if POLITE:
                    self._pause = _retry_after(response)
            else:
                response.failure(f"HTTP {response.status_code} {_reason(response)}")


def _reason(response) -> str:
    """The error code of an answer, or what went wrong when there was none (status 0)."""
    if response.status_code == 0:
        return repr(response.error)[:200]
    return _error_code(response) or response.text[:80]


def _json_objects(response):
    try:
        return response.json().get("objects")
    except (ValueError, AttributeError):
        return None


class HealthProbe(HttpUser):
    """Liveness and readiness as an orchestrator probes them, once a second."""

    fixed_count = 1
    wait_time = constant(1)

    @task
    def probe(self):
        for path in ("/healthz", "/readyz"):
            with self.client.get(path, name=path, catch_response=True) as response:
                seconds = response.elapsed.total_seconds()
                if response.status_code != 200:
                    response.failure(f"HTTP {response.status_code}")
                elif seconds > HEALTH_LIMIT:
                    response.failure(f"answered in {seconds:.2f} s, over {HEALTH_LIMIT} s")
                else:
                    response.success()
