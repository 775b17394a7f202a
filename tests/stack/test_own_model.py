"""A fine-tuned model with its own classes (WEIGHTS_FILE + LABELS_FILE), end to end: its names come
back over both protocols, and labels that do not fit its head keep the service from serving, with
a message that says so."""

from __future__ import annotations

import grpc
import pytest
import requests

from testkit.checkpoints import make_forced_checkpoint
from testkit.stack import Stack

OWN_CLASSES = ["__background__", "widget", "gadget", "sprocket"]


@pytest.fixture(scope="module")
def own_weights(tmp_path_factory):
    """A 4-class head (background + three) that answers exactly 'gadget', and its labels file."""
    folder = tmp_path_factory.mktemp("own-model")
    make_forced_checkpoint(folder / "gadget.pt", "gadget", categories=OWN_CLASSES)
    (folder / "labels.txt").write_text("widget\ngadget\nsprocket\n")
    return folder


def test_own_classes_over_http_and_grpc(tmp_path, own_weights, image_server, grpc_client, grpc_stubs):
    pb2, pb2_grpc = grpc_stubs
    url = image_server.url("/img/jpeg")
    with Stack(tmp_path, WEIGHTS_FILE=own_weights / "gadget.pt", LABELS_FILE=own_weights / "labels.txt",
               ALLOWED_PRIVATE_TARGETS=f"127.0.0.1:{image_server.port}").running() as stack:
        assert stack.predict_http(url).json() == {"objects": ["gadget"]}
        assert grpc_client(stack.grpc_target, url) == ["gadget"]
        model = requests.get(stack.http + "/v1/model", timeout=30).json()
        assert model["categories"] == ["widget", "gadget", "sprocket"]
        detected = requests.post(stack.http + "/v1/detect", json={"url": url, "classes": ["gadget"]},
                                 timeout=120).json()
        assert [instance["label"] for instance in detected["instances"]] == ["gadget"]
        unknown = requests.post(stack.http + "/v1/detect", json={"url": url, "classes": ["kite"]}, timeout=60)
        assert unknown.status_code == 400 and "'kite'" in unknown.json()["error"]["message"]
        with grpc.insecure_channel(stack.grpc_target) as channel:
            reply = pb2_grpc.InstanceDetectorStub(channel).Detect(
                pb2.DetectRequest(image=pb2.ImageInput(url=url),
                                  options=pb2.DetectOptions(classes=["gadget"], masks=pb2.MASK_FORMAT_RLE)),
                timeout=120)
        assert [instance.label for instance in reply.instances] == ["gadget"]
        assert reply.instances[0].mask.rle.counts


def test_labels_that_do_not_fit_the_head_keep_the_service_from_serving(tmp_path, own_weights, image_server):
    labels = tmp_path / "two.txt"
    labels.write_text("widget\ngadget\n")
    stack = Stack(tmp_path / "stack", WEIGHTS_FILE=own_weights / "gadget.pt", LABELS_FILE=labels,
                  ALLOWED_PRIVATE_TARGETS=f"127.0.0.1:{image_server.port}").start()
    try:
        stack.wait_failed()
        ready = requests.get(stack.http + "/readyz", timeout=10)
        assert ready.status_code == 503
        message = ready.json()["message"]
        assert "LABELS_FILE" in message and "has 2 names" in message and "4 classes" in message
        answer = stack.predict_http(image_server.url("/img/jpeg"))
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "not_ready"
        assert "LABELS_FILE" in answer.json()["error"]["message"]
    finally:
        assert stack.stop() == 0


def test_a_head_that_is_not_cocos_needs_a_labels_file(tmp_path, own_weights):
    stack = Stack(tmp_path / "no-labels", WEIGHTS_FILE=own_weights / "gadget.pt").start()
    try:
        stack.wait_failed()
        assert "set LABELS_FILE" in requests.get(stack.http + "/readyz", timeout=10).json()["message"]
    finally:
        assert stack.stop() == 0
