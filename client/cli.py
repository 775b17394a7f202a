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
import contextlib
import csv
import io
import json
import os
import re
import sys
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TextIO
from urllib.parse import unquote, urlsplit

import requests

if TYPE_CHECKING:
    from PIL import Image

DEFAULT_HTTP = "http://localhost:8080"
MASK_FORMATS = ("polygons", "rle", "both")
EXIT_OK, EXIT_FAILED, EXIT_FATAL = 0, 1, 2

# The service takes at most MAX_UPLOAD_BYTES (default 32 MiB) per request body: a batch whose
# files add up to more is cut here, so that a folder of large photos is not refused whole.
UPLOAD_BYTES_PER_BATCH = 16 * 1024 * 1024
# A service that has not accepted the connection by then is down, however long images may take.
CONNECT_TIMEOUT = 10.0
# DetectBatch results carry masks; gRPC's default 4 MiB limit on received messages is too tight.
GRPC_MAX_RECEIVE = 64 * 1024 * 1024
# Below this many inputs a bar only flickers.
PROGRESS_MIN_INPUTS = 11

_URL = re.compile(r"^https?://", re.IGNORECASE)

# Box colours, one per label (RGB hex triplets): distinct at a glance.
_PALETTE_RGB = bytes.fromhex(
    "FF3838 FF9D97 FF701F FFB21D CFD231 48F90A 92CC17 3DDB86 1A9334 00D4BB "
    "2C99A8 00C2FF 344593 6473FF 0018EC 8438FF 520085 CB38FF FF95C8 FF37C7"
)
PALETTE: tuple[tuple[int, int, int], ...] = tuple(
    (_PALETTE_RGB[i], _PALETTE_RGB[i + 1], _PALETTE_RGB[i + 2]) for i in range(0, len(_PALETTE_RGB), 3)
)


def label_colour(label: str) -> tuple[int, int, int]:
    """The colour ``--annotate`` draws ``label`` in: the same in every run (crc32, not hash())."""
    return PALETTE[zlib.crc32(label.encode()) % len(PALETTE)]


# -- inputs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Input:
    """One image to detect in, as the user named it."""

    position: int  # across the whole run: the ``index`` of its output line
    text: str  # the URL or path as given
    path: Path | None  # the local file to upload; None for a URL


@dataclass(frozen=True)
class Failure:
    code: str
    message: str


@dataclass
class Outcome:
    """What became of one input: its detection (the API's JSON) or its failure."""

    input: Input
    detection: dict[str, Any] | None = None
    error: Failure | None = None
    annotated: Path | None = None

    def as_json(self) -> dict[str, Any]:
        answer: dict[str, Any] = {"input": self.input.text, "index": self.input.position}
        if self.error is not None:
            answer["error"] = {"code": self.error.code, "message": self.error.message}
            return answer
        assert self.detection is not None
        answer.update(self.detection)
        if self.annotated is not None:
            answer["annotated"] = str(self.annotated)
        return answer


def classify(position: int, text: str) -> Input:
    """An http(s) URL is fetched by the service; anything else names a local file to upload (a
    missing one fails on its own when its batch is read, so the other inputs still run)."""
    return Input(position, text, None if _URL.match(text) else Path(text))


def lines_of(path: str) -> list[str]:
    """The inputs of a ``--file``: one a line; blank lines and lines starting with ``#`` skipped
    (only whole lines: a URL may contain ``#``)."""
    with _open_text(path) as handle:
        stripped = (line.strip() for line in handle)
        return [line for line in stripped if line and not line.startswith("#")]


def column_of(path: str, column: str) -> list[str]:
    """The non-empty cells of ``column`` (by its header) in a CSV file."""
    with _open_text(path) as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or column not in reader.fieldnames:
            found = ", ".join(reader.fieldnames or []) or "none"
            raise ValueError(f"{path} has no column {column!r} (columns: {found})")
        cells = ((row.get(column) or "").strip() for row in reader)
        return [cell for cell in cells if cell]


@contextlib.contextmanager
def _open_text(path: str) -> Iterator[TextIO]:
    if path == "-":
        yield sys.stdin
    else:
        # utf-8-sig: spreadsheets often save CSV with a byte-order mark, which would join the header
        with open(path, encoding="utf-8-sig", newline="") as handle:
            yield handle


def plan_batches(
    inputs: Sequence[Input], size: int, upload_budget: int = UPLOAD_BYTES_PER_BATCH
) -> Iterator[list[Input]]:
    """Consecutive runs of at most ``size`` inputs whose files add up to at most ``upload_budget``
    bytes (a larger file goes alone; the service judges it)."""
    batch: list[Input] = []
    uploaded = 0
    for item in inputs:
        nbytes = _file_size(item.path) if item.path is not None else 0
        if batch and (len(batch) == size or uploaded + nbytes > upload_budget):
            yield batch
            batch, uploaded = [], 0
        batch.append(item)
        uploaded += nbytes
    if batch:
        yield batch


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0  # unreadable: fails when read, without taking room in the batch


# -- the service -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    threshold: float | None
    classes: tuple[str, ...]
    masks: str  # "none" or one of MASK_FORMATS

    @property
    def polygons(self) -> bool:
        return self.masks in ("polygons", "both")

    @property
    def rle(self) -> bool:
        return self.masks in ("rle", "both")


class ServiceError(Exception):
    """The service cannot be reached, refused a whole batch, or broke off its answer."""


# Each batch result: the index of the image in the order sent, and its detection or failure.
BatchResult = tuple[int, dict[str, Any] | Failure]


class Transport(Protocol):
    def detect_batch(
        self, urls: list[str], uploads: list[tuple[str, bytes]], options: Options
    ) -> Iterator[BatchResult]:
        """Results as they arrive; the images are numbered URLs first, then uploads (as the
        HTTP API numbers multipart fields)."""
        ...


class HttpTransport:
    def __init__(self, base_url: str, timeout: float):
        base = base_url if "://" in base_url else "http://" + base_url
        self.endpoint = base.rstrip("/") + "/v1/detect/batch"
        self.timeout = timeout
        self.session = requests.Session()

    def detect_batch(
        self, urls: list[str], uploads: list[tuple[str, bytes]], options: Options
    ) -> Iterator[BatchResult]:
        # JSON when nothing is uploaded (smaller, and what the docs show); multipart otherwise
        if uploads:
            fields = [("url", url) for url in urls] + self._form_options(options)
            files = [("image", (name, data, "application/octet-stream")) for name, data in uploads]
            send: dict[str, Any] = {"data": fields, "files": files}
        else:
            send = {"json": {"urls": urls, **self._json_options(options)}}
        try:
            # the read timeout bounds the wait for each next line, i.e. for each image
            response = self.session.post(
                self.endpoint, stream=True, timeout=(min(CONNECT_TIMEOUT, self.timeout), self.timeout), **send
            )
        except requests.ReadTimeout:
            raise ServiceError(f"no answer from {self.endpoint} within {self.timeout:g} s") from None
        except requests.RequestException as exc:
            raise ServiceError(f"cannot reach {self.endpoint}: {_root_cause(exc)}") from None
        with response:
            if response.status_code != 200:
                raise ServiceError(_http_refusal(response))
            try:
                # chunk_size=None: hand over each chunk as it comes rather than waiting for 512 bytes
                for line in response.iter_lines(chunk_size=None):
                    if line.strip():
                        yield _parse_line(line)
            except requests.RequestException as exc:
                raise ServiceError(f"the answer from {self.endpoint} broke off: {_root_cause(exc)}") from None

    @staticmethod
    def _json_options(options: Options) -> dict[str, Any]:
        fields: dict[str, Any] = {"masks": options.masks}
        if options.threshold is not None:
            fields["threshold"] = options.threshold
        if options.classes:
            fields["classes"] = list(options.classes)
        return fields

    @staticmethod
    def _form_options(options: Options) -> list[tuple[str, str]]:
        fields = [("masks", options.masks)]
        if options.threshold is not None:
            fields.append(("threshold", repr(options.threshold)))
        if options.classes:
            fields.append(("classes", ",".join(options.classes)))
        return fields


def _root_cause(exc: BaseException) -> str:
    """The innermost error under requests' and urllib3's wrappers ("Connection refused"), which
    says what went wrong without three layers of pool and retry wording."""
    while True:
        reason = getattr(exc, "reason", None)
        inner = exc.__cause__ or (reason if isinstance(reason, BaseException) else None)
        if inner is None and exc.args and isinstance(exc.args[0], BaseException):
            inner = exc.args[0]
        if inner is None:
            return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        exc = inner


def _http_refusal(response: requests.Response) -> str:
    """The service's own words for a refused batch (its JSON error body), else the status."""
    try:
        error = response.json()["error"]
        text = f"{error['code']}: {error['message']} (HTTP {response.status_code})"
    except (ValueError, KeyError, TypeError):
        text = f"HTTP {response.status_code}: {response.text.strip()[:300]}"
    retry_after = response.headers.get("Retry-After")
    return f"{text}; retry after {retry_after} s" if retry_after else text


def _parse_line(line: bytes) -> BatchResult:
    try:
        answer = json.loads(line)
        index = int(answer.pop("index"))
        if "error" in answer:
            return index, Failure(str(answer["error"]["code"]), str(answer["error"]["message"]))
        return index, answer
    except (ValueError, KeyError, TypeError, AttributeError):
        raise ServiceError(f"unexpected line in the answer: {line[:200]!r}") from None


class GrpcTransport:
    def __init__(self, target: str, timeout: float):
        import grpc

        from grpc_app.stubs import inference_pb2, inference_pb2_grpc

        self.grpc, self.pb2 = grpc, inference_pb2
        self.target = target
        self.timeout = timeout
        channel = grpc.insecure_channel(
            target, options=[("grpc.max_receive_message_length", GRPC_MAX_RECEIVE)]
        )
        self.stub = inference_pb2_grpc.InstanceDetectorStub(channel)

    def detect_batch(
        self, urls: list[str], uploads: list[tuple[str, bytes]], options: Options
    ) -> Iterator[BatchResult]:
        pb2 = self.pb2
        images = [pb2.ImageInput(url=url) for url in urls] + [
            pb2.ImageInput(data=data) for _, data in uploads
        ]
        masks = pb2.MaskFormat.Value(f"MASK_FORMAT_{options.masks.upper()}")
        request = pb2.DetectBatchRequest(
            images=images,
            options=pb2.DetectOptions(threshold=options.threshold, classes=options.classes, masks=masks),
        )
        try:
            # a deadline for the whole stream, scaled so that each image gets --timeout as over HTTP
            for result in self.stub.DetectBatch(request, timeout=self.timeout * len(images)):
                if result.WhichOneof("result") == "error":
                    yield result.index, Failure(result.error.code, result.error.message)
                else:
                    yield result.index, _detection_dict(result.detection, options)
        except self.grpc.RpcError as exc:
            raise ServiceError(f"{exc.code().name} from {self.target}: {exc.details()}") from None


def _detection_dict(message: Any, options: Options) -> dict[str, Any]:
    """A DetectResponse as the HTTP API writes it. The server rounds scores to 4 decimals and
    coordinates to 2; float32 blurs that, so round again to print the same as over HTTP."""
    instances = []
    for item in message.instances:
        box = item.box
        instance: dict[str, Any] = {
            "label": item.label,
            "score": round(item.score, 4),
            "box": [round(value, 2) for value in (box.x1, box.y1, box.x2, box.y2)],
        }
        if options.masks != "none":
            mask: dict[str, Any] = {}
            if options.polygons:
                mask["polygons"] = [
                    [round(value, 2) for value in polygon.xy] for polygon in item.mask.polygons
                ]
            if options.rle:
                mask["rle"] = {"size": list(item.mask.rle.size), "counts": item.mask.rle.counts}
            instance["mask"] = mask
        instances.append(instance)
    return {"width": message.width, "height": message.height, "instances": instances}


# -- annotation --------------------------------------------------------------------------------


def annotated_name(item: Input, total: int) -> str:
    """``0007-cats.png``: the input's position first, so that names never collide (the same file
    name in two folders, one URL twice) and sort in input order."""
    stem = item.path.stem if item.path is not None else Path(unquote(urlsplit(item.text).path)).stem
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "image"
    return f"{item.position + 1:0{len(str(total))}d}-{stem[:80]}.png"


def draw_detections(data: bytes, instances: list[dict[str, Any]]) -> Image.Image:
    """The image with each instance's mask polygons filled translucently, its box outlined and
    its label and score written, in the label's colour."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    with Image.open(io.BytesIO(data)) as opened:
        # boxes are in the pixels of the upright image, as the service detects on it
        upright = ImageOps.exif_transpose(opened)
        if upright.mode.startswith("I"):  # 16/32-bit greyscale: scale to 8 bits instead of clipping
            upright = upright.point(lambda value: value / 256).convert("L")
        image = upright.convert("RGBA")
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    fills = ImageDraw.Draw(overlay)
    for instance in instances:
        for polygon in (instance.get("mask") or {}).get("polygons") or []:
            if len(polygon) >= 6:
                fills.polygon(polygon, fill=(*label_colour(instance["label"]), 96))
    canvas = Image.alpha_composite(image, overlay).convert("RGB")
    draw = ImageDraw.Draw(canvas)
    short_side = min(canvas.size)
    line = max(2, round(short_side / 200))
    font = ImageFont.load_default(size=max(11, round(short_side / 32)))
    for instance in instances:
        colour = label_colour(instance["label"])
        x1, y1, x2, y2 = instance["box"]
        # box corners are pixel edges: the last pixel inside is x2 - 1
        draw.rectangle((x1, y1, max(x1, x2 - 1), max(y1, y2 - 1)), outline=colour, width=line)
        text = f"{instance['label']} {instance['score']:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        height = bottom - top + 4
        # above the box when there is room, otherwise just inside its top edge
        tx, ty = (x1, y1 - height) if y1 - height >= 0 else (x1 + line, y1 + line)
        draw.rectangle((tx, ty, tx + right - left + 4, ty + height), fill=colour)
        draw.text((tx + 2 - left, ty + 2 - top), text, fill=_ink_on(colour), font=font)
    return canvas


def _ink_on(colour: tuple[int, int, int]) -> tuple[int, int, int]:
    """Black text on light label colours, white on dark ones (ITU-R BT.601 luma)."""
    red, green, blue = colour
    return (0, 0, 0) if 0.299 * red + 0.587 * green + 0.114 * blue > 140 else (255, 255, 255)


# -- output ------------------------------------------------------------------------------------


class Report:
    """Prints each outcome as it comes: plain lines (errors on stderr) or JSON lines. With a
    progress bar, lines go through tqdm so that they do not tear it."""

    def __init__(self, json_lines: bool, boxes: bool, progress: Any = None):
        self.json_lines = json_lines
        self.boxes = boxes
        self.progress = progress
        self.failed = False

    def outcome(self, outcome: Outcome) -> None:
        if outcome.error is not None:
            self.failed = True
        if self.json_lines:
            self._write(json.dumps(outcome.as_json()), sys.stdout)
        elif outcome.error is not None:
            self._write(
                f"{outcome.input.text}\terror: {outcome.error.code}: {outcome.error.message}", sys.stderr
            )
        else:
            self._write(self._plain(outcome), sys.stdout)
        if self.progress is not None:
            self.progress.update(1)

    def warning(self, text: str) -> None:
        """A problem besides the detections (an annotation that could not be made): stderr, exit 1."""
        self.failed = True
        self._write(f"instance-detector: {text}", sys.stderr)

    def _plain(self, outcome: Outcome) -> str:
        assert outcome.detection is not None
        instances = outcome.detection["instances"]
        lines = [f"{outcome.input.text}\t{', '.join(item['label'] for item in instances) or '(none)'}"]
        if self.boxes:
            for item in instances:
                box = ", ".join(f"{value:.1f}" for value in item["box"])
                lines.append(f"    {item['label']} {item['score']:.2f} [{box}]{self._mask_note(item)}")
        return "\n".join(lines)

    @staticmethod
    def _mask_note(item: dict[str, Any]) -> str:
        mask = item.get("mask")
        if mask is None:
            return ""
        parts = []
        if "polygons" in mask:
            count = len(mask["polygons"])
            parts.append(f"{count} polygon{'s' if count != 1 else ''}")
        if "rle" in mask:
            parts.append("rle")
        return f" mask: {', '.join(parts)}"

    def _write(self, text: str, stream: TextIO) -> None:
        if self.progress is not None:
            self.progress.write(text, file=stream)
            stream.flush()
        else:
            print(text, file=stream, flush=True)  # flushed: a pipe sees each result as it arrives


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Batch:
    """A planned batch with its files read: what is sent, in the service's numbering, and the
    inputs that failed before sending."""

    urls: list[Input] = field(default_factory=list)
    uploads: list[tuple[Input, bytes]] = field(default_factory=list)
    unreadable: list[Outcome] = field(default_factory=list)

    @classmethod
    def read(cls, inputs: list[Input]) -> Batch:
        batch = cls()
        for item in inputs:
            if item.path is None:
                batch.urls.append(item)
                continue
            try:
                batch.uploads.append((item, item.path.read_bytes()))
            except OSError as exc:
                reason = exc.strerror or str(exc)
                batch.unreadable.append(
                    Outcome(item, error=Failure("unreadable_file", f"{reason} (and not an http(s) URL)"))
                )
        return batch

    @property
    def sent(self) -> list[Input]:
        return self.urls + [item for item, _ in self.uploads]

    def upload_bytes(self, item: Input) -> bytes | None:
        return next((data for upload, data in self.uploads if upload is item), None)


class Runner:
    def __init__(
        self,
        transport: Transport,
        options: Options,
        report: Report,
        annotate: Path | None,
        total: int,
        timeout: float,
    ):
        self.transport = transport
        self.options = options
        self.report = report
        self.annotate = annotate
        self.total = total
        self.timeout = timeout

    def run_batch(self, inputs: list[Input]) -> None:
        """Send one batch and report every input; ServiceError when the batch as a whole fails."""
        batch = Batch.read(inputs)
        for outcome in batch.unreadable:
            self.report.outcome(outcome)
        sent = batch.sent
        if not sent:
            return
        pending = set(range(len(sent)))
        results = self.transport.detect_batch(
            [item.text for item in batch.urls],
            [(item.path.name if item.path else "image", data) for item, data in batch.uploads],
            self.options,
        )
        for index, result in results:
            if index not in pending:
                raise ServiceError(f"the service answered image {index} of {len(sent)} twice or out of range")
            pending.discard(index)
            item = sent[index]
            if isinstance(result, Failure):
                self.report.outcome(Outcome(item, error=result))
            else:
                self.report.outcome(self._with_annotation(Outcome(item, detection=result), batch))
        if pending:
            raise ServiceError(f"the answer ended without {len(pending)} of the batch's {len(sent)} results")

    def _with_annotation(self, outcome: Outcome, batch: Batch) -> Outcome:
        if self.annotate is None:
            return outcome
        assert outcome.detection is not None
        from PIL import Image

        item = outcome.input
        target = self.annotate / annotated_name(item, self.total)
        try:
            data = batch.upload_bytes(item)
            if data is None:  # a URL: the service fetched it, so fetch it again to draw on it
                response = requests.get(item.text, timeout=(min(CONNECT_TIMEOUT, self.timeout), self.timeout))
                response.raise_for_status()
                data = response.content
            draw_detections(data, outcome.detection["instances"]).save(target)
        # Pillow raises OSError (UnidentifiedImageError), ValueError or DecompressionBombError for bad images
        except (OSError, ValueError, Image.DecompressionBombError, requests.RequestException) as exc:
            self.report.warning(f"{item.text}: cannot write the annotated copy: {exc}")
            return outcome
        outcome.annotated = target
        return outcome


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
    with _progress(len(inputs)) as progress:
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


@contextlib.contextmanager
def _progress(total: int) -> Iterator[Any]:
    """A tqdm bar on stderr when someone watches it (a terminal) and the run is long enough."""
    if total < PROGRESS_MIN_INPUTS or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm  # type: ignore[import-untyped]  # tqdm ships no type information

    with tqdm(total=total, file=sys.stderr, unit="image") as bar:
        yield bar
