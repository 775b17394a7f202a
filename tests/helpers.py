"""Test support: real checkpoints, generated images, a loopback image server, and the real stack.

Nothing here is a mock: checkpoints are the real torchvision architecture saved with
``torch.save``, the stack is the repository's own supervisord.conf with gunicorn and the gRPC
server, and images travel over HTTP on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import grpc
import requests

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


# --------------------------------------------------------------------------- checkpoints

def make_forced_checkpoint(path: Path, category: str, seed: int = 0) -> str:
    """Save a seeded maskrcnn_resnet50_fpn state dict that answers exactly ``[category]``.

    The box classifier's weights are zeroed and its bias strongly favours one class, so every
    box gets that label: the answer proves which file was loaded and that label indices map to
    the right names. The RPN's box regression grows every anchor past the image, so all
    proposals clip to the whole image, and the box head's regression is zeroed, so NMS leaves
    one box: one detection, whatever the image, and fast tests. Everything else keeps its
    seeded random values. Returns the file's sha256.
    """
    import torch
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    from common.detector import COCO_CATEGORIES

    torch.manual_seed(seed)
    model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=len(COCO_CATEGORIES))
    classifier = model.roi_heads.box_predictor.cls_score
    with torch.no_grad():
        classifier.weight.zero_()
        classifier.bias.fill_(-10.0)
        classifier.bias[COCO_CATEGORIES.index(category)] = 10.0
        rpn_deltas = model.rpn.head.bbox_pred
        rpn_deltas.weight.zero_()
        rpn_deltas.bias.zero_()
        rpn_deltas.bias.view(-1, 4)[:, 2:] = 10.0  # (dx, dy, dw, dh): widen and heighten a lot
        box_deltas = model.roi_heads.box_predictor.bbox_pred
        box_deltas.weight.zero_()  # and again in the box head: every final box is the whole image
        box_deltas.bias.zero_()
        box_deltas.bias.view(-1, 4)[:, 2:] = 10.0
    torch.save(model.state_dict(), path)
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------- images

def scene(width: int = 320, height: int = 240, seed: int = 1):
    """A deterministic RGB picture with some structure (blocks and a gradient)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = np.linspace(0, 255, width, dtype=np.uint8)[None, :]
    pixels[..., 1] = np.linspace(255, 0, height, dtype=np.uint8)[:, None]
    for _ in range(6):
        x, y = rng.integers(0, width - 40), rng.integers(0, height - 40)
        pixels[y:y + 40, x:x + 40] = rng.integers(0, 255, 3)
    return Image.fromarray(pixels)


def encode(image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


# --------------------------------------------------------------------------- image server

@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    content_type: str = "image/jpeg"
    headers: dict = field(default_factory=dict)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_Server"

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):  # noqa: N802 - http.server's naming
        self.server.hits.append(self.path)
        parts = urlsplit(self.path)
        query = {key: values[0] for key, values in parse_qs(parts.query).items()}
        special = getattr(self, "_route_" + parts.path.strip("/").replace("-", "_"), None)
        if special is not None:
            return special(query)
        route = self.server.routes.get(parts.path)
        if route is None:
            return self._send(404, b"not found", "text/plain")
        return self._send(route.status, route.body, route.content_type, route.headers)

    def _send(self, status, body, content_type, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _route_redirect(self, query):
        self.send_response(int(query.get("status", 302)))
        self.send_header("Location", query["to"])
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _route_loop(self, query):
        self.send_response(302)
        self.send_header("Location", "/loop")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _route_slow(self, query):
        """Answer only after ``delay`` seconds."""
        time.sleep(float(query.get("delay", 5)))
        self._send(200, self.server.routes["/img/jpeg"].body, "image/jpeg")

    def _route_drip(self, query):
        """Headers at once, then one byte every ``every`` seconds (each read well within any timeout)."""
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        deadline = time.monotonic() + float(query.get("max", 30))
        try:
            while time.monotonic() < deadline:
                self.wfile.write(b"\xff")
                self.wfile.flush()
                time.sleep(float(query.get("every", 0.3)))
        except OSError:
            pass

    def _route_endless(self, query):
        """A body with no Content-Length, closed only after ``mb`` megabytes."""
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Connection", "close")
        self.end_headers()
        chunk = b"\xff" * 65536
        try:
            for _ in range(int(float(query.get("mb", 64)) * 16)):
                self.wfile.write(chunk)
        except OSError:
            pass
        self.close_connection = True

    def _route_big_header(self, query):
        """Declares a huge Content-Length but sends nothing."""
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(10 ** 10))
        self.end_headers()
        self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        pass  # clients (the service under test) hang up on purpose: caps, timeouts


class ImageServer:
    """A throwaway HTTP server on 127.0.0.1 that serves registered routes and records hits."""

    def __init__(self, port: int = 0):
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.routes = {}
        self._server.hits = []
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def hits(self) -> list[str]:
        return self._server.hits

    def add(self, path: str, body: bytes, content_type: str = "image/jpeg", status: int = 200,
            headers: dict | None = None) -> str:
        self._server.routes[path] = Route(body, status, content_type, headers or {})
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


# --------------------------------------------------------------------------- the real stack

def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants, from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = [root], [root]
    while frontier:
        current = frontier.pop()
        children = [pid for pid, parent in parents.items() if parent == current]
        found += children
        frontier += children
    return found


def free_port() -> int:
    """A free loopback port below Linux's ephemeral range, so that no outgoing connection's
    source port takes it between this check and the server's bind."""
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found in 20000-32000")


class Stack:
    """supervisord with the repository's supervisord.conf: the model process, gunicorn (Flask)
    and the gRPC server."""

    def __init__(self, workdir: Path, **settings: str):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.log_path = self.workdir / "stack.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("SUPERVISOR_")},
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RUN_DIR": str(self.workdir / "run"),
            "BIND_HOST": "127.0.0.1",
            "HTTP_PORT": str(self.http_port),
            "GRPC_PORT": str(self.grpc_port),
            "HTTP_WORKERS": "2",
            "TORCH_THREADS": "1",
        }
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.env.update({key: str(value) for key, value in settings.items()})
        self.process: subprocess.Popen | None = None

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def metrics_dir(self) -> Path:
        return Path(self.env.get("PROMETHEUS_MULTIPROC_DIR", Path(self.env["RUN_DIR"]) / "metrics"))

    def start(self) -> "Stack":
        Path(self.env["RUN_DIR"]).mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [str(VENV_BIN / "supervisord"), "-c", str(REPO / "supervisord.conf")],
            cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return self

    def wait_until(self, predicate, timeout: float = 120.0, what: str = "the stack") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"supervisord exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                if predicate():
                    return
            except (requests.RequestException, OSError, grpc.RpcError):
                pass  # not listening (yet)
            time.sleep(0.25)
        raise TimeoutError(f"{what} not up after {timeout}s:\n{self.log_tail()}")

    def wait_ready(self, timeout: float = 120.0) -> "Stack":
        """Both servers answer and report the model process's model loaded."""
        self.wait_until(lambda: requests.get(self.http + "/readyz", timeout=2).status_code == 200,
                        timeout, "HTTP readiness")
        self.wait_until(lambda: self.grpc_health() == "SERVING", timeout, "gRPC readiness")
        return self

    def wait_failed(self, timeout: float = 120.0) -> "Stack":
        """Both servers answer, and report that the model failed to load."""
        self.wait_until(
            lambda: requests.get(self.http + "/readyz", timeout=2).json().get("status") == "failed",
            timeout, "HTTP not-ready state")
        self.wait_until(lambda: self.grpc_health() == "NOT_SERVING", timeout, "gRPC health")
        return self

    def grpc_health(self) -> str:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        with grpc.insecure_channel(self.grpc_target) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=2)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            return self.process.wait(10)

    def supervisorctl(self, *args: str) -> str:
        """Run supervisorctl against this stack; its output."""
        result = subprocess.run([str(VENV_BIN / "supervisorctl"), "-c", str(REPO / "supervisord.conf"),
                                 *args], env=self.env, capture_output=True, text=True, timeout=60)
        return result.stdout

    def program_pid(self, program: str) -> int:
        """The pid supervisord reports for ``program`` (``model``, ``detector:http``,
        ``detector:grpc``); 0 while it is not running."""
        return int(self.supervisorctl("pid", program).strip() or 0)

    def processes(self) -> dict[int, str]:
        """{pid: command line} of supervisord and every process below it."""
        commands = {}
        for pid in process_tree(self.process.pid):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            commands[pid] = " ".join(arg.decode(errors="replace") for arg in argv if arg)
        return commands

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    # -- clients ----------------------------------------------------------------------

    def predict_http(self, url, timeout: float = 120.0) -> requests.Response:
        return requests.post(self.http + "/predict", json={"url": url}, timeout=timeout)

    def metric_value(self, family: str) -> float:
        return metric_value(self.http, family)


def metric_value(http_base: str, family: str) -> float:
    """The first sample of ``family`` in ``http_base``/metrics, read with prometheus_client's parser
    (as a course client does)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(http_base + "/metrics", timeout=10).text
    for metric in text_string_to_metric_families(text):
        if metric.name == family:
            return metric.samples[0].value
    raise AssertionError(f"no metric family {family!r} in /metrics:\n{text}")


def generate_client_stubs(out_dir: Path) -> None:
    """Generate stubs the way course clients do (``-I protos``) and make them importable."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    code = protoc.main(["protoc", f"-I{REPO / 'protos'}", f"--python_out={out_dir}",
                        f"--grpc_python_out={out_dir}", str(REPO / "protos" / "inference.proto")])
    assert code == 0, "protoc failed"
    if str(out_dir) not in sys.path:
        sys.path.insert(0, str(out_dir))
