"""``instance-detector``: detect instances in many images from the command line, over HTTP or gRPC.

    instance-detector http://images.cocodataset.org/val2017/000000039769.jpg photos/*.jpg
    instance-detector --grpc localhost:9090 --json --masks polygons --file urls.txt
    instance-detector --boxes --annotate out/ --csv images.csv --column url

Inputs are URLs (the service fetches them) and local files (uploaded), in any mix. They go to
``POST /v1/detect/batch`` (NDJSON) or gRPC ``DetectBatch`` in batches of at most ``--batch-size``,
and each result is printed as soon as the service sends it. Exit code: 0 when every image was
detected, 1 when any failed, 2 for usage errors and when the service cannot be reached or refuses
a whole batch. docs/cli.md has every option.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

from client.inputs import Input, classify, column_of, lines_of, plan_batches
from client.output import Report, progress_bar
from client.run import Runner
from client.transport import MASK_FORMATS, Options, ServiceError, Transport
from client.transport_grpc import GrpcTransport
from client.transport_http import HttpTransport

DEFAULT_HTTP = "http://localhost:8080"

EXIT_OK, EXIT_FAILED, EXIT_FATAL = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instance-detector",
        description="Detect object instances in images (URLs or local files) with the instance-detector "
        "service, over HTTP or gRPC, printing each result as it arrives.",
        epilog="Exit code: 0 all images detected, 1 some image failed, 2 usage error or the service "
        "unreachable or refusing a batch. More: docs/cli.md.",
    )
    parser.add_argument(
        "inputs", nargs="*", metavar="INPUT", help="http(s) URL of an image, or a local file to upload"
    )
    parser.add_argument(
        "--file",
        action="append",
        default=[],
        metavar="F",
        help="read inputs from F, one per line ('#' comment lines and blank lines skipped; - is stdin)",
    )
    parser.add_argument(
        "--csv", metavar="F", help="read inputs from a column of the CSV file F (with a header row)"
    )
    parser.add_argument("--column", metavar="NAME", help="the --csv column holding the URLs or paths")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--http",
        metavar="URL",
        default=DEFAULT_HTTP,
        help=f"the service's HTTP base URL (default {DEFAULT_HTTP})",
    )
    where.add_argument(
        "--grpc", metavar="HOST:PORT", help="use the gRPC service at HOST:PORT instead of HTTP"
    )
    parser.add_argument(
        "--threshold", type=float, help="lowest score to report (default: the service's, 0.75)"
    )
    parser.add_argument("--classes", metavar="A,B", help="report only these categories (comma-separated)")
    parser.add_argument("--masks", choices=MASK_FORMATS, help="also ask for masks in this encoding")
    parser.add_argument(
        "--boxes", action="store_true", help="print each instance's score and box (plain output)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")
    parser.add_argument(
        "--annotate",
        metavar="DIR",
        type=Path,
        help="write a copy of each image with its detections drawn into DIR",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=16,
        metavar="N",
        help="images per request (default 16; the service takes at most MAX_BATCH_IMAGES, 32 by default)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=120.0,
        metavar="S",
        help="seconds to wait for each image's result (default 120)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    return parser


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be more than 0")
    return value


def _version() -> str:
    try:
        return metadata.version("instance-detector")
    except metadata.PackageNotFoundError:  # run from a checkout that scripts/setup has not installed
        return "(not installed)"


def collect_inputs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Input]:
    """Arguments first, then each --file, then the --csv column; usage errors exit 2."""
    if (args.csv is None) != (args.column is None):
        parser.error("--csv and --column go together")
    texts = list(args.inputs)
    try:
        for path in args.file:
            texts += lines_of(path)
        if args.csv is not None:
            texts += column_of(args.csv, args.column)
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as exc:
        parser.error(str(exc))
    if not texts:
        parser.error("no inputs: give URLs or files, --file or --csv")
    return [classify(position, text) for position, text in enumerate(texts)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    # intermixed: inputs may come after options (`--file list.txt photo.jpg`), as in most commands
    args = parser.parse_intermixed_args(argv)
    inputs = collect_inputs(parser, args)
    classes = tuple(name.strip() for name in (args.classes or "").split(",") if name.strip())
    options = Options(args.threshold, classes, args.masks or "none")
    if args.annotate is not None:
        try:
            args.annotate.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            parser.error(f"--annotate: {exc}")
    try:
        transport: Transport = (
            GrpcTransport(args.grpc, args.timeout) if args.grpc else HttpTransport(args.http, args.timeout)
        )
    except ImportError as exc:  # the gRPC stubs were not generated (scripts/setup does it)
        print(f"instance-detector: {exc}", file=sys.stderr)
        return EXIT_FATAL
    with progress_bar(len(inputs)) as progress:
        report = Report(args.json, args.boxes, progress)
        runner = Runner(transport, options, report, args.annotate, len(inputs), args.timeout)
        try:
            for batch in plan_batches(inputs, args.batch_size):
                runner.run_batch(batch)
        except ServiceError as exc:
            report.warning(str(exc))
            return EXIT_FATAL
        except KeyboardInterrupt:
            return 130
        except BrokenPipeError:
            # the reader (e.g. head) has gone: stop quietly, without a second error at exit
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_FAILED
    return EXIT_FAILED if report.failed else EXIT_OK
