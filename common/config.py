"""All settings, read from environment variables in one place.

``SETTINGS`` is the one table: each entry names its variable, its default, how it is parsed and
checked, and which part of docs/configuration.md documents it ("user", "limits", "tuning" or
"internal"; a test keeps the two in step). ``Settings.from_env()`` is called by each process at
start-up; a value that cannot be used is a ``ConfigError`` naming the variable, at start.
Paths that follow from ``RUN_DIR`` are properties, not settings.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from common.errors import ConfigError

# DETECT_MODE values (common/model/accel): exact = OpenVINO fp32 graph + torchvision, same answers
# as eager; eager = torchvision as is; fast = bf16 where the CPU has it (answers deviate).
DETECT_MODES = ("exact", "eager", "fast")
MAX_SOCKET_PATH = 107  # sockaddr_un.sun_path holds 108 bytes, the last one a NUL
MODEL_SOCKET_NAME = "model.sock"
# Time budget, beyond MODEL_WAIT_TIMEOUT, for one call to the model: waiting in line behind other
# passes and running its own. Request deadlines (gunicorn's worker timeout, the model client's
# call timeout) are built from it, so that the inner one always expires first.
DETECT_ALLOWANCE_SECONDS = 60.0
# How long a stopping server lets in-flight calls finish; supervisord.conf's stopwaitsecs are a
# little longer, so a drain is never cut short by SIGKILL.
STOP_GRACE_SECONDS = 25.0


@dataclass(frozen=True)
class Setting:
    """One environment variable: where it goes in ``Settings`` and how it is parsed."""

    env: str
    field: str
    parse: Callable[[str], Any]
    section: str  # user | limits | tuning | internal
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()


def _text(raw: str) -> str:
    return raw.strip()


def _lower(raw: str) -> str:
    return raw.strip().lower()


def _upper(raw: str) -> str:
    return raw.strip().upper()


def _flag(raw: str) -> bool:
    value = raw.strip()
    if value not in ("0", "1"):
        raise ValueError("must be 0 or 1")
    return value == "1"


def _names(raw: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in raw.replace(";", ",").split(",") if item.strip())


def _model_name(raw: str) -> str:
    value = raw.strip()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", value):
        raise ValueError("must be 1 to 64 of A-Z a-z 0-9 . _ - (it is a URL path segment)")
    return value


def _sha256(raw: str) -> str:
    value = raw.strip().lower()
    if value and (len(value) != 64 or any(c not in "0123456789abcdef" for c in value)):
        raise ValueError("must be 64 hexadecimal digits")
    return value


SETTINGS: tuple[Setting, ...] = (
    # What a user sets
    Setting("SCORE_THRESHOLD", "score_threshold", float, "user", minimum=0.0, maximum=1.0),
    Setting("WEIGHTS_FILE", "weights_file", _text, "user"),
    Setting("WEIGHTS_SHA256", "weights_sha256", _sha256, "user"),
    Setting("LABELS_FILE", "labels_file", _text, "user"),
    Setting("DETECT_MODE", "detect_mode", _lower, "user", choices=DETECT_MODES),
    Setting("BIND_HOST", "bind_host", _text, "user"),
    Setting("HTTP_PORT", "http_port", int, "user", minimum=1, maximum=65535),
    Setting("GRPC_PORT", "grpc_port", int, "user", minimum=1, maximum=65535),
    Setting("HTTP_WORKERS", "http_workers", int, "user", minimum=1),
    Setting("ALLOWED_PRIVATE_TARGETS", "allowed_private_targets", _names, "user"),
    Setting("RUN_DIR", "run_dir", _text, "user"),
    Setting("ACCEL_CACHE_DIR", "accel_cache_dir", _text, "user"),
    Setting(
        "LOG_LEVEL", "log_level", _upper, "user", choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    ),
    Setting("LOG_FORMAT", "log_format", _lower, "user", choices=("json", "text")),
    Setting("V2_MODEL_NAME", "v2_model_name", _model_name, "user"),
    # Limits on what a request may cost
    Setting("FETCH_CONNECT_TIMEOUT", "fetch_connect_timeout", float, "limits", minimum=0.001),
    Setting("FETCH_READ_TIMEOUT", "fetch_read_timeout", float, "limits", minimum=0.001),
    Setting("FETCH_TOTAL_TIMEOUT", "fetch_total_timeout", float, "limits", minimum=0.001),
    Setting("FETCH_MAX_BYTES", "fetch_max_bytes", int, "limits", minimum=1),
    Setting("FETCH_MAX_REDIRECTS", "fetch_max_redirects", int, "limits", minimum=0),
    Setting("MAX_URL_LENGTH", "max_url_length", int, "limits", minimum=16),
    Setting("MAX_IMAGE_PIXELS", "max_image_pixels", int, "limits", minimum=1),
    Setting("MAX_REQUEST_BYTES", "max_request_bytes", int, "limits", minimum=256),
    Setting("MODEL_WAIT_TIMEOUT", "model_wait_timeout", float, "limits", minimum=0.0),
    Setting("MAX_QUEUE_WAIT", "max_queue_wait", float, "limits", minimum=0.0),
    Setting("MIN_SCORE_THRESHOLD", "min_score_threshold", float, "limits", minimum=0.05, maximum=1.0),
    Setting("MAX_BATCH_IMAGES", "max_batch_images", int, "limits", minimum=1, maximum=1000),
    Setting("MAX_UPLOAD_BYTES", "max_upload_bytes", int, "limits", minimum=1024),
    # Tuning: the defaults are the measured best on 2-core machines
    Setting("TORCH_THREADS", "torch_threads", int, "tuning", minimum=0),
    Setting("HTTP_THREADS", "http_threads", int, "tuning", minimum=1),
    Setting("GRPC_THREADS", "grpc_threads", int, "tuning", minimum=1),
    Setting("WINOGRAD", "winograd", _flag, "tuning"),
    Setting("ROI_ALIGN_THREADS", "roi_align_threads", int, "tuning", minimum=1),
    # Set by supervisord.conf, not by users
    Setting("MODEL_PROCESS", "model_process", _flag, "internal"),
)


@dataclass(frozen=True)
class Settings:
    # Model
    score_threshold: float = 0.75
    weights_file: str = ""  # empty: torchvision's COCO_V1 weights via the torch hub cache
    weights_sha256: str = ""
    # names of a fine-tuned model's classes, one per line (or a JSON list); empty: COCO's
    labels_file: str = ""
    detect_mode: str = "exact"
    accel_cache_dir: str = ""  # empty: $XDG_CACHE_HOME/instance-detector or ~/.cache/instance-detector
    model_wait_timeout: float = 60.0  # how long a request waits for a model still loading
    # True: the servers send decoded images to the stack's one model process (supervisord.conf)
    # instead of loading a model of their own.
    model_process: bool = False

    # Fetching and decoding
    fetch_connect_timeout: float = 3.0
    fetch_read_timeout: float = 10.0
    fetch_total_timeout: float = 20.0
    fetch_max_bytes: int = 20 * 1024 * 1024
    fetch_max_redirects: int = 5
    max_url_length: int = 4096
    allowed_private_targets: tuple[str, ...] = ()
    max_image_pixels: int = 40_000_000

    # Servers
    bind_host: str = "0.0.0.0"
    http_port: int = 8080
    grpc_port: int = 9090
    http_workers: int = 2
    max_request_bytes: int = 64 * 1024
    run_dir: str = "/tmp/instance-detector"
    log_level: str = "INFO"
    log_format: str = "json"  # json: one JSON object per line (request lines included); text: plain lines
    v2_model_name: str = "maskrcnn"  # the model's name in the Open Inference Protocol (/v2/models/<name>)
    # Admission control: a request is admitted only if its pass can start within about this many
    # seconds (the model's measured pass time decides how many that is); others are shed at once.
    max_queue_wait: float = 10.0
    # The lowest per-request threshold: the model keeps candidates down to it (a lower floor
    # means more candidates through NMS and, with masks, more masks per request).
    min_score_threshold: float = 0.25
    max_batch_images: int = 32
    # Bodies that carry images (uploads, multipart batches); JSON-only bodies: MAX_REQUEST_BYTES.
    max_upload_bytes: int = 32 * 1024 * 1024

    # Tuning
    torch_threads: int = 0  # 0: one per available core
    http_threads: int = 16
    grpc_threads: int = 16
    winograd: bool = True  # the exact path computes its large 3x3 convolutions with Winograd
    roi_align_threads: int = 2

    @property
    def metrics_dir(self) -> str:
        """prometheus_client's multiprocess directory, shared by every process of the stack."""
        return os.path.join(self.run_dir, "metrics")

    @property
    def model_socket(self) -> str:
        """The Unix socket the model process listens on (mode 0600)."""
        return os.path.join(self.run_dir, MODEL_SOCKET_NAME)

    @property
    def request_deadline(self) -> float:
        """The longest a request may take: waiting for the model to load, fetching, detecting."""
        return self.model_wait_timeout + self.fetch_total_timeout + DETECT_ALLOWANCE_SECONDS

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values = {
            setting.field: _parse(setting, env[setting.env])
            for setting in SETTINGS
            if env.get(setting.env, "").strip()
        }
        settings = cls(**values)
        if settings.labels_file and not os.path.isfile(settings.labels_file):
            raise ConfigError(f"LABELS_FILE={settings.labels_file!r} does not exist or is not a file")
        if settings.model_process and len(settings.model_socket.encode()) > MAX_SOCKET_PATH:
            raise ConfigError(
                f"RUN_DIR={settings.run_dir!r} is too long: the model process's socket "
                f"path must fit in {MAX_SOCKET_PATH} bytes"
            )
        return settings


def _parse(setting: Setting, raw: str) -> Any:
    try:
        value = setting.parse(raw)
    except ValueError as exc:
        reason = f"is not a valid {setting.parse.__name__}" if setting.parse in (int, float) else str(exc)
        raise ConfigError(f"{setting.env}={raw!r} {reason}") from None
    if setting.choices and value not in setting.choices:
        raise ConfigError(f"{setting.env}={raw!r} must be one of {', '.join(setting.choices)}")
    if setting.minimum is not None and value < setting.minimum:
        raise ConfigError(f"{setting.env}={raw!r} must be at least {setting.minimum:g}")
    if setting.maximum is not None and value > setting.maximum:
        raise ConfigError(f"{setting.env}={raw!r} must be at most {setting.maximum:g}")
    return value


# A setting added to the table and not to Settings, or the other way round, fails every process
# and test at once.
if {s.field for s in SETTINGS} != {f.name for f in fields(Settings)}:
    raise RuntimeError("common.config: SETTINGS and Settings name different fields")
