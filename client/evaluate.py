"""Score a running service on labelled images, the way the course's CI does.

    python -m client.evaluate --labels labels.json --image-base-url http://images.cocodataset.org/val2017
    python -m client.evaluate --labels labels.json --images ./val2017 --protocol both --min-mean 0.5

``labels.json`` maps image names to their true labels: ``{"000000039769.jpg": ["cat", "cat", ...]}``.
Each image scores ``2 * matches / (len(truth) + len(predicted))`` (multiset matches; 1.0 when
both are empty); the command prints each score and the mean per protocol, and exits 1 when a
mean is below ``--min-mean``. With ``--images`` it serves the folder itself on 127.0.0.1, which
the service may fetch only if ``ALLOWED_PRIVATE_TARGETS`` lists that address and port.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import threading
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import quote

import requests


def dice_score(truth: list[str], predicted: list[str]) -> float:
    """The course's per-image score: 2 * multiset matches / (len(truth) + len(predicted))."""
    if not truth and not predicted:
        return 1.0
    matches = sum((Counter(truth) & Counter(predicted)).values())
    return 2.0 * matches / (len(truth) + len(predicted))


def http_predictor(base_url: str, timeout: float):
    def predict(url: str) -> list[str]:
        response = requests.post(base_url.rstrip("/") + "/predict", json={"url": url}, timeout=timeout)
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text.strip()}")
        return response.json()["objects"]

    return predict


def grpc_predictor(target: str, timeout: float):
    import grpc

    from grpc_app.stubs import inference_pb2, inference_pb2_grpc

    stub = inference_pb2_grpc.InstanceDetectorStub(grpc.insecure_channel(target))

    def predict(url: str) -> list[str]:
        try:
            return list(stub.Predict(inference_pb2.InstanceDetectorInput(url=url), timeout=timeout).objects)
        except grpc.RpcError as error:
            raise RuntimeError(f"gRPC {error.code().name}: {error.details()}") from None

    return predict


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve_folder(folder: str, host: str, port: int) -> tuple[ThreadingHTTPServer, str]:
    """Serve ``folder`` read-only over HTTP on a daemon thread; returns (server, base URL)."""
    handler = functools.partial(_QuietHandler, directory=folder)
    server = ThreadingHTTPServer((host, port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://{host}:{server.server_address[1]}"


def evaluate(labels: dict[str, list[str]], base_url: str, predict, out=None) -> float:
    """Score every image; print one line each; return the mean."""
    out = out or sys.stdout
    scores = []
    for name, truth in labels.items():
        try:
            predicted = predict(f"{base_url.rstrip('/')}/{quote(name)}")
            score, detail = dice_score(truth, predicted), f"predicted {sorted(predicted)}"
        except Exception as exc:  # noqa: BLE001 - a failed image scores 0 and is reported
            score, detail = 0.0, f"error: {exc}"
        scores.append(score)
        print(f"{score:6.3f}  {name}  truth {sorted(truth)}  {detail}", file=out)
    return sum(scores) / len(scores) if scores else 0.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m client.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--labels", required=True, help='JSON file: {"image name": ["label", ...]}')
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--image-base-url", help="URL prefix the image names are appended to")
    source.add_argument("--images", help="local folder of the images, served on --serve-host")
    parser.add_argument("--serve-host", default="127.0.0.1")
    parser.add_argument("--serve-port", type=int, default=0, help="port for --images (0: any free port)")
    parser.add_argument("--protocol", choices=("http", "grpc", "both"), default="both")
    parser.add_argument("--http", default="http://localhost:8080", help="the service's HTTP base URL")
    parser.add_argument("--grpc", default="localhost:9090", help="the service's gRPC target")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--min-mean", type=float, default=0.5, help="exit 1 when a mean is below this")
    args = parser.parse_args(argv)

    with open(args.labels, encoding="utf-8") as handle:
        labels = json.load(handle)
    if not isinstance(labels, dict) or not all(isinstance(v, list) for v in labels.values()):
        parser.error("--labels must hold a JSON object mapping image names to lists of labels")

    server = None
    base_url = args.image_base_url
    if args.images:
        server, base_url = serve_folder(args.images, args.serve_host, args.serve_port)
        print(
            f"serving {args.images} at {base_url} (the service must allow it: "
            f"ALLOWED_PRIVATE_TARGETS={base_url.split('//', 1)[1]})"
        )
    protocols = ("http", "grpc") if args.protocol == "both" else (args.protocol,)
    failed = False
    try:
        for protocol in protocols:
            predict = (
                http_predictor(args.http, args.timeout)
                if protocol == "http"
                else grpc_predictor(args.grpc, args.timeout)
            )
            print(f"== {protocol}")
            mean = evaluate(labels, base_url, predict)
            passed = mean >= args.min_mean
            failed |= not passed
            print(
                f"{protocol} mean {mean:.4f} over {len(labels)} images "
                f"({'pass' if passed else 'FAIL'}: bar {args.min_mean})"
            )
    finally:
        if server is not None:
            server.shutdown()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
