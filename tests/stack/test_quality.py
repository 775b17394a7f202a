"""The course's quality bar with the true COCO_V1 weights (only where they are available).

Needs torchvision's COCO_V1 file in the torch hub cache, plus COCO val2017 images and labels:
``COCO_LABELS=labels.json`` (the course's ``{"image name": ["label", ...]}`` shape) and either
``COCO_IMAGES=/folder`` or ``COCO_IMAGE_BASE_URL=http://images.cocodataset.org/val2017``.
"""

import os

import pytest

from client import evaluate
from common.model.weights import hub_checkpoint_path
from testkit.stack import Stack, free_port

pytestmark = pytest.mark.real_weights


@pytest.fixture(scope="module")
def coco_inputs():
    if not os.path.exists(hub_checkpoint_path()):
        pytest.skip(f"COCO_V1 weights are not in the torch hub cache ({hub_checkpoint_path()}); "
                    "they cannot be downloaded here")
    labels = os.environ.get("COCO_LABELS")
    images = os.environ.get("COCO_IMAGES")
    base_url = os.environ.get("COCO_IMAGE_BASE_URL")
    if not labels or not (images or base_url):
        pytest.skip("set COCO_LABELS and COCO_IMAGES or COCO_IMAGE_BASE_URL to run the quality test")
    return labels, images, base_url


def test_mean_score_above_the_course_bar(tmp_path, coco_inputs, capsys):
    labels, images, base_url = coco_inputs
    serve_port = free_port()
    settings = {"ALLOWED_PRIVATE_TARGETS": f"127.0.0.1:{serve_port}"} if images else {}
    stack = Stack(tmp_path / "stack", TORCH_THREADS="0", **settings).start()
    try:
        stack.wait_ready(timeout=300)
        source = ["--images", images, "--serve-port", str(serve_port)] if images else \
            ["--image-base-url", base_url]
        code = evaluate.main(["--labels", labels, *source, "--http", stack.http,
                              "--grpc", stack.grpc_target, "--min-mean", "0.5"])
        print(capsys.readouterr().out)
        assert code == 0
    finally:
        stack.stop()
