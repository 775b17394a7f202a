"""The evaluation command (``python -m client.evaluate``) against the stack."""

import json
import subprocess
import sys

import pytest

from testkit import REPO
from testkit.checkpoints import CLASS_A
from testkit.images import encode, scene


@pytest.fixture
def labelled_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "one.jpg").write_bytes(encode(scene(200, 150, seed=1), "JPEG"))
    (folder / "two words.png").write_bytes(encode(scene(150, 200, seed=2), "PNG"))
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"one.jpg": [CLASS_A], "two words.png": [CLASS_A, "person"]}))
    return folder, labels


def run_evaluate(stack, folder, labels, port, *extra):
    return subprocess.run(
        [sys.executable, "-m", "client.evaluate", "--labels", str(labels), "--images", str(folder),
         "--serve-port", str(port), "--http", stack.http, "--grpc", stack.grpc_target, *extra],
        cwd=REPO, capture_output=True, text=True, timeout=300)


def test_evaluate_against_the_stack(stack, labelled_folder, evaluation_port):
    folder, labels = labelled_folder
    passing = run_evaluate(stack, folder, labels, evaluation_port, "--min-mean", "0.8")
    assert passing.returncode == 0, passing.stdout + passing.stderr
    # one.jpg scores 1, "two words.png" scores 2*1/(2+1); mean 5/6 over each protocol
    assert "http mean 0.8333" in passing.stdout and "grpc mean 0.8333" in passing.stdout
    assert passing.stdout.count(" 0.667  two words.png") == 2

    failing = run_evaluate(stack, folder, labels, evaluation_port, "--protocol", "http", "--min-mean", "0.9")
    assert failing.returncode == 1 and "FAIL" in failing.stdout
