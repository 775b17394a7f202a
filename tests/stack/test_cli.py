"""The command-line client (docs/cli.md) as a user runs it: the installed ``instance-detector``
command and ``python -m client`` as subprocesses against the real stack, with URLs from the test
image server and files written to disk. The main stack's checkpoint answers one ``kite`` covering
the whole image, whatever the image."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from client.annotate import label_colour
from testkit import VENV_BIN
from testkit.checkpoints import CLASS_A
from testkit.images import sample_images

INSTALLED = [str(VENV_BIN / "instance-detector")]
MODULE = [sys.executable, "-m", "client"]
WHOLE_IMAGE = [0.0, 0.0, 320.0, 240.0]  # the sample images are 320x240: the one box covers them


@pytest.fixture(scope="module", autouse=True)
def routes(image_server):
    image_server.add("/cli/not-an-image", b"plain text, not a picture", "text/plain")


@pytest.fixture(scope="module")
def samples():
    return sample_images()


@pytest.fixture
def local_png(tmp_path, samples) -> Path:
    path = tmp_path / "local photo.png"  # a space: the name travels as one argument and one upload
    path.write_bytes(samples["png"][0])
    return path


def run_cli(*args: str, cwd: Path, command: list[str] = INSTALLED) -> subprocess.CompletedProcess[str]:
    assert Path(command[0]).exists(), f"{command[0]} is missing: scripts/setup installs it"
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def json_lines(stdout: str) -> dict[int, dict]:
    """The --json output by index (the lines come in the order images finish)."""
    answers = [json.loads(line) for line in stdout.splitlines()]
    return {answer["index"]: answer for answer in answers}


def test_urls_files_lists_and_uploads_over_http(stack, image_server, tmp_path, local_png):
    """Arguments (before and after options), --file (comments and blank lines skipped) and a --csv
    column, URLs and uploads mixed, split into batches of two: every input printed with its names,
    exit 0."""
    second = tmp_path / "second.png"
    second.write_bytes(local_png.read_bytes())
    listing = tmp_path / "inputs.txt"
    listing.write_text(f"# a comment\n\n{image_server.url('/img/webp')}\n  second.png  \n")
    table = tmp_path / "inputs.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "source"])
        writer.writerow(["gif", image_server.url("/img/gif-animated")])
        writer.writerow(["empty", ""])
    first = image_server.url("/img/jpeg")

    result = run_cli(
        "--http",
        stack.http,
        "--batch-size",
        "2",
        first,
        "--file",
        str(listing),
        local_png.name,  # an input after an option: the arguments may be intermixed
        "--csv",
        str(table),
        "--column",
        "source",
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr
    expected = [
        first,
        local_png.name,
        image_server.url("/img/webp"),
        "second.png",
        image_server.url("/img/gif-animated"),
    ]
    assert sorted(result.stdout.splitlines()) == sorted(f"{text}\t{CLASS_A}" for text in expected)


def test_json_answers_and_failures_are_the_same_over_http_and_grpc(stack, image_server, tmp_path, local_png):
    """--json over both protocols (one run through ``python -m client``): a URL and an upload with
    their polygons; a URL that is not an image and a missing file fail on their own (exit 1) while
    the others are still answered, and every line carries its input and index."""
    inputs = [
        image_server.url("/img/jpeg"),
        str(local_png),
        image_server.url("/cli/not-an-image"),
        str(tmp_path / "missing.jpg"),
    ]
    common = ("--json", "--masks", "polygons", *inputs)
    over_http = run_cli("--http", stack.http, *common, cwd=tmp_path, command=MODULE)
    over_grpc = run_cli("--grpc", stack.grpc_target, *common, cwd=tmp_path)

    assert over_http.returncode == 1, over_http.stderr
    assert over_grpc.returncode == 1, over_grpc.stderr
    answers = json_lines(over_http.stdout)
    assert answers == json_lines(over_grpc.stdout)
    assert sorted(answers) == [0, 1, 2, 3]
    for index in (0, 1):
        answer = answers[index]
        assert answer["input"] == inputs[index]
        assert (answer["width"], answer["height"]) == (320, 240)
        (instance,) = answer["instances"]
        assert instance["label"] == CLASS_A and instance["score"] > 0.99 and instance["box"] == WHOLE_IMAGE
        assert set(instance["mask"]) == {"polygons"} and instance["mask"]["polygons"]
    assert answers[2]["input"] == inputs[2] and answers[2]["error"]["code"] == "not_an_image"
    assert answers[3]["input"] == inputs[3] and answers[3]["error"]["code"] == "unreadable_file"


def test_plain_boxes_with_errors_on_stderr(stack, image_server, tmp_path):
    """--boxes: one indented line per instance (score, box, mask summary); a failed image goes to
    stderr with its code, the good one is still printed, exit 1."""
    good, bad = image_server.url("/img/jpeg"), image_server.url("/cli/not-an-image")

    result = run_cli("--http", stack.http, "--boxes", "--masks", "polygons", good, bad, cwd=tmp_path)

    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{good}\t{CLASS_A}",
        f"    {CLASS_A} 1.00 [0.0, 0.0, 320.0, 240.0] mask: 1 polygon",
    ]
    assert f"{bad}\terror: not_an_image: " in result.stderr


def test_annotate_draws_boxes_and_masks(stack, image_server, tmp_path, local_png):
    """--annotate: a PNG per image (a URL the client downloads itself, and an upload), with the
    label's colour along the image's edges (the box is the whole image) and the mask's
    translucent fill inside."""
    out = tmp_path / "annotated"

    result = run_cli(
        "--http",
        stack.http,
        "--annotate",
        str(out),
        "--masks",
        "polygons",
        image_server.url("/img/jpeg"),
        str(local_png),
        cwd=tmp_path,
    )

    assert result.returncode == 0, result.stderr
    assert sorted(path.name for path in out.iterdir()) == ["1-jpeg.png", "2-local_photo.png"]
    colour = label_colour(CLASS_A)
    with Image.open(local_png) as source:
        original = source.convert("RGB")
    for path in out.iterdir():
        with Image.open(path) as drawn:
            image = drawn.convert("RGB")
        assert image.size == (320, 240)
        for edge in ((0, 120), (319, 120), (160, 239)):
            assert image.getpixel(edge) == colour, (path.name, edge)
        assert image.getpixel((160, 120)) != colour  # translucent: the picture shows through
    with Image.open(out / "2-local_photo.png") as drawn:
        assert drawn.convert("RGB").getpixel((160, 120)) != original.getpixel((160, 120))


def test_refused_batch_prints_the_services_message(stack, image_server, tmp_path):
    """A batch the service refuses whole (an unknown class) exits 2 with the service's message,
    over both protocols."""
    url = image_server.url("/img/jpeg")
    for where in (("--http", stack.http), ("--grpc", stack.grpc_target)):
        result = run_cli(*where, "--classes", "no-such-class", url, cwd=tmp_path)
        assert result.returncode == 2, (where, result.stderr)
        assert "invalid_request" in result.stderr and "no-such-class" in result.stderr
        assert result.stdout == ""


def test_unreachable_service_exits_2(closed_port, image_server, tmp_path):
    url = image_server.url("/img/jpeg")
    over_http = run_cli("--http", f"http://127.0.0.1:{closed_port}", url, cwd=tmp_path)
    over_grpc = run_cli("--grpc", f"127.0.0.1:{closed_port}", url, cwd=tmp_path, command=MODULE)

    assert over_http.returncode == 2 and "Connection refused" in over_http.stderr
    assert over_grpc.returncode == 2 and "UNAVAILABLE" in over_grpc.stderr


def test_usage_errors_exit_2(tmp_path):
    table = tmp_path / "inputs.csv"
    table.write_text("url\nhttp://example.com/a.jpg\n")
    for args in (
        (),
        ("--csv", str(table)),
        ("--csv", str(table), "--column", "nope"),
        ("--file", str(tmp_path / "missing.txt")),
    ):
        result = run_cli(*args, cwd=tmp_path)
        assert result.returncode == 2, args
        assert "usage:" in result.stderr
