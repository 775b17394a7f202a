"""All settings, read from environment variables in one place.

Every variable is documented in the README's configuration table; the defaults here are
the production defaults. ``Settings.from_env()`` is called by each process at start-up.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


# DETECT_MODE values (see common/accel.py): exact = OpenVINO fp32 graph + torchvision, same
# answers as eager; eager = torchvision as is; fast = bf16 where the CPU has it (answers deviate).
DETECT_MODES = ("exact", "eager", "fast")
MAX_SOCKET_PATH = 107  # sockaddr_un.sun_path holds 108 bytes, the last one a NUL


class ConfigError(ValueError):
    """An environment variable holds a value that cannot be used."""


def _env_str(environ, name: str, default: str) -> str:
    return environ.get(name, default).strip()


def _env_number(environ, name: str, default, kind, minimum=None):
    raw = environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = kind(raw.strip())
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not a valid {kind.__name__}") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{name}={raw!r} must be at least {minimum}")
    return value


def _env_list(environ, name: str) -> tuple[str, ...]:
    raw = environ.get(name, "")
    return tuple(item.strip() for item in raw.replace(";", ",").split(",") if item.strip())


@dataclass(frozen=True)
class Settings:
    # Model
    score_threshold: float = 0.75
    weights_file: str = ""  # empty: torchvision's COCO_V1 weights via the torch hub cache
    weights_sha256: str = ""
    torch_threads: int = 0  # 0: one per available core
    model_wait_timeout: float = 60.0  # how long a request waits for a model still loading
    # Unix socket of the stack's one model process (common/model_server.py); empty: this process
    # loads its own model. supervisord.conf sets it to $RUN_DIR/model.sock.
    model_server: str = ""

    # Fetching
    fetch_connect_timeout: float = 3.0
    fetch_read_timeout: float = 10.0
    fetch_total_timeout: float = 20.0
    fetch_max_bytes: int = 20 * 1024 * 1024
    fetch_max_redirects: int = 5
    max_url_length: int = 4096
    allowed_private_targets: tuple[str, ...] = field(default_factory=tuple)

    # Decoding
    max_image_pixels: int = 40_000_000

    # Servers
    bind_host: str = "0.0.0.0"
    http_port: int = 8080
    grpc_port: int = 9090
    http_workers: int = 2
    http_threads: int = 16
    grpc_threads: int = 16
    max_request_bytes: int = 64 * 1024
    run_dir: str = "/tmp/instance-detector"
    metrics_dir: str = "/tmp/instance-detector/metrics"

    # Detect path (common/accel.py)
    detect_mode: str = "exact"
    accel_cache_dir: str = ""  # empty: $XDG_CACHE_HOME/instance-detector or ~/.cache/instance-detector
    roi_align_threads: int = 2
    winograd: int = 1  # 1: the exact path computes its large 3x3 convolutions with Winograd
    shared_inference_lock: int = 1  # 1: one forward pass at a time across the stack (RUN_DIR)

    @classmethod
    def from_env(cls, environ=None) -> "Settings":
        env = os.environ if environ is None else environ
        run_dir = _env_str(env, "RUN_DIR", cls.run_dir)
        threshold = _env_number(env, "SCORE_THRESHOLD", cls.score_threshold, float, 0.0)
        if threshold > 1.0:
            raise ConfigError(f"SCORE_THRESHOLD={threshold} must be between 0 and 1")
        sha256 = _env_str(env, "WEIGHTS_SHA256", "").lower()
        if sha256 and (len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256)):
            raise ConfigError("WEIGHTS_SHA256 must be 64 hexadecimal digits")
        detect_mode = _env_str(env, "DETECT_MODE", cls.detect_mode).lower()
        if detect_mode not in DETECT_MODES:
            raise ConfigError(f"DETECT_MODE={detect_mode!r} must be one of {', '.join(DETECT_MODES)}")
        winograd = _env_number(env, "WINOGRAD", cls.winograd, int, 0)
        if winograd > 1:
            raise ConfigError(f"WINOGRAD={winograd} must be 0 or 1")
        model_server = _env_str(env, "MODEL_SERVER", cls.model_server)
        if len(model_server.encode()) > MAX_SOCKET_PATH:
            raise ConfigError(f"MODEL_SERVER={model_server!r} is longer than a Unix socket path may be "
                              f"({MAX_SOCKET_PATH} bytes): use a shorter RUN_DIR")
        return cls(
            score_threshold=threshold,
            weights_file=_env_str(env, "WEIGHTS_FILE", ""),
            weights_sha256=sha256,
            torch_threads=_env_number(env, "TORCH_THREADS", cls.torch_threads, int, 0),
            model_wait_timeout=_env_number(env, "MODEL_WAIT_TIMEOUT", cls.model_wait_timeout, float, 0.0),
            model_server=model_server,
            fetch_connect_timeout=_env_number(
                env, "FETCH_CONNECT_TIMEOUT", cls.fetch_connect_timeout, float, 0.001),
            fetch_read_timeout=_env_number(env, "FETCH_READ_TIMEOUT", cls.fetch_read_timeout, float, 0.001),
            fetch_total_timeout=_env_number(
                env, "FETCH_TOTAL_TIMEOUT", cls.fetch_total_timeout, float, 0.001),
            fetch_max_bytes=_env_number(env, "FETCH_MAX_BYTES", cls.fetch_max_bytes, int, 1),
            fetch_max_redirects=_env_number(env, "FETCH_MAX_REDIRECTS", cls.fetch_max_redirects, int, 0),
            max_url_length=_env_number(env, "MAX_URL_LENGTH", cls.max_url_length, int, 16),
            allowed_private_targets=_env_list(env, "ALLOWED_PRIVATE_TARGETS"),
            max_image_pixels=_env_number(env, "MAX_IMAGE_PIXELS", cls.max_image_pixels, int, 1),
            bind_host=_env_str(env, "BIND_HOST", cls.bind_host),
            http_port=_env_number(env, "HTTP_PORT", cls.http_port, int, 1),
            grpc_port=_env_number(env, "GRPC_PORT", cls.grpc_port, int, 1),
            http_workers=_env_number(env, "HTTP_WORKERS", cls.http_workers, int, 1),
            http_threads=_env_number(env, "HTTP_THREADS", cls.http_threads, int, 1),
            grpc_threads=_env_number(env, "GRPC_THREADS", cls.grpc_threads, int, 1),
            max_request_bytes=_env_number(env, "MAX_REQUEST_BYTES", cls.max_request_bytes, int, 256),
            run_dir=run_dir,
            metrics_dir=_env_str(env, "PROMETHEUS_MULTIPROC_DIR", os.path.join(run_dir, "metrics")),
            detect_mode=detect_mode,
            accel_cache_dir=_env_str(env, "ACCEL_CACHE_DIR", cls.accel_cache_dir),
            roi_align_threads=_env_number(env, "ROI_ALIGN_THREADS", cls.roi_align_threads, int, 1),
            winograd=winograd,
            shared_inference_lock=_env_number(
                env, "SHARED_INFERENCE_LOCK", cls.shared_inference_lock, int, 0),
        )
