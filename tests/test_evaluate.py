"""The evaluation command: the course's scoring on known cases, and a run against the stack."""

import json
import subprocess
import sys

import pytest

from common.evaluate import dice_score
from tests.conftest import CLASS_A
from tests.helpers import REPO, encode, scene


@pytest.mark.parametrize("truth,predicted,expected", [
    (["cat", "cat", "remote"], ["cat", "cat", "remote"], 1.0),
    (["cat", "cat", "remote"], ["remote", "cat", "cat"], 1.0),
    (["cat", "cat"], ["cat"], 2 / 3),
    (["cat"], ["cat", "cat", "cat"], 0.5),
    (["person", "boat"], ["dog"], 0.0),
    (["person"], [], 0.0),
    ([], ["person"], 0.0),
    ([], [], 1.0),
    (["a", "b", "b", "c"], ["b", "b", "b", "c", "d"], 2 * 3 / 9),
])
def test_dice_score(truth, predicted, expected):
    assert dice_score(truth, predicted) == pytest.approx(expected)


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
        [sys.executable, "-m", "common.evaluate", "--labels", str(labels), "--images", str(folder),
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
