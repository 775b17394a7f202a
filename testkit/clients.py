"""What a course client does: gRPC stubs generated from protos/ with ``-I protos``, and reading
/metrics with prometheus_client's parser."""

from __future__ import annotations

import sys
from pathlib import Path

import requests


def generate_client_stubs(out_dir: Path) -> None:
    """Generate ``inference_pb2``/``inference_pb2_grpc`` into ``out_dir`` with the service's own
    code generation (``grpc_app.codegen``: protoc with ``-I protos``, as course clients run it) and
    make them importable as top-level modules."""
    from grpc_app.codegen import generate

    generate(Path(out_dir))
    if str(out_dir) not in sys.path:
        sys.path.insert(0, str(out_dir))


def metric_value(http_base: str, family: str) -> float:
    """The first sample of ``family`` in ``http_base``/metrics, read with prometheus_client's parser
    (as a course client does)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(http_base + "/metrics", timeout=10).text
    for metric in text_string_to_metric_families(text):
        if metric.name == family:
            return metric.samples[0].value
    raise AssertionError(f"no metric family {family!r} in /metrics:\n{text}")


def metric_samples(http_base: str, sample_name: str) -> list[tuple[dict[str, str], float]]:
    """Every sample called ``sample_name`` (e.g. ``app_requests_shed_total``) in ``/metrics``, as
    (labels, value) pairs."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(http_base + "/metrics", timeout=10).text
    return [(dict(sample.labels), sample.value)
            for metric in text_string_to_metric_families(text)
            for sample in metric.samples if sample.name == sample_name]


def metric_sum(http_base: str, sample_name: str, **labels: str) -> float:
    """The sum of the samples of ``sample_name`` whose labels include ``labels`` (0 when none)."""
    return sum(value for sample_labels, value in metric_samples(http_base, sample_name)
               if all(sample_labels.get(key) == wanted for key, wanted in labels.items()))
