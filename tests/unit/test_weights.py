"""Weight loading through the service's own code: the file that is loaded is the one that answers."""

import os

import pytest
import torch

from common.errors import ModelLoadError
from common.model.detector import Detector
from common.model.weights import hub_checkpoint_path, state_dict_sha256
from testkit.checkpoints import CLASS_A, CLASS_B
from testkit.images import scene
from testkit.settings import settings_for
from testkit.stack import free_port

THREADS = 2


@pytest.mark.model
def test_each_checkpoint_answers_its_own_class(checkpoints):
    image = scene(200, 150)
    answers = {}
    for name, (path, sha256) in checkpoints.items():
        settings = settings_for(path, WEIGHTS_SHA256=sha256, TORCH_THREADS=THREADS)
        labels = Detector.from_settings(settings).detect(image)
        assert labels, f"{name} checkpoint detected nothing"
        answers[name] = labels
    assert answers == {CLASS_A: [CLASS_A], CLASS_B: [CLASS_B]}


@pytest.mark.model
def test_training_checkpoint_layout_is_accepted(checkpoints, tmp_path):
    path, _ = checkpoints[CLASS_A]
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": torch.load(path, weights_only=True), "epoch": 3}, wrapped)
    detector = Detector.from_settings(settings_for(wrapped, TORCH_THREADS=THREADS))
    assert detector.detect(scene(120, 90)) == [CLASS_A]


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="WEIGHTS_FILE=.*does not exist"):
        Detector.from_settings(settings_for(tmp_path / "nope.pt", TORCH_THREADS=THREADS))


@pytest.mark.model
def test_wrong_checksum(checkpoints):
    path, _ = checkpoints[CLASS_A]
    with pytest.raises(ModelLoadError, match="WEIGHTS_SHA256"):
        Detector.from_settings(settings_for(path, WEIGHTS_SHA256="0" * 64, TORCH_THREADS=THREADS))


@pytest.mark.model
def test_truncated_file(checkpoints, tmp_path):
    path, _ = checkpoints[CLASS_A]
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: os.path.getsize(path) // 3])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        Detector.from_settings(settings_for(truncated, TORCH_THREADS=THREADS))


def test_wrong_architecture(tmp_path):
    other = tmp_path / "resnet.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), other)
    with pytest.raises(ModelLoadError, match="not a maskrcnn_resnet50_fpn state dict"):
        Detector.from_settings(settings_for(other, TORCH_THREADS=THREADS))


def test_not_a_state_dict(tmp_path):
    odd = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), odd)
    with pytest.raises(ModelLoadError, match="not a state dict"):
        Detector.from_settings(settings_for(odd, TORCH_THREADS=THREADS))


def test_default_source_without_cached_weights_names_the_setting(tmp_path, monkeypatch):
    """No WEIGHTS_FILE and nothing in the hub cache: a clear error, never untrained weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    # Any download attempt goes to a closed loopback port, even on a machine with internet.
    for proxy in ("https_proxy", "http_proxy", "HTTPS_PROXY", "HTTP_PROXY"):
        monkeypatch.setenv(proxy, f"http://127.0.0.1:{free_port()}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    # the hub cache is now the empty folder above, whatever this machine's cache holds
    assert hub_checkpoint_path().startswith(str(tmp_path / "torch-home") + os.sep)
    assert not os.path.exists(hub_checkpoint_path())
    with pytest.raises(ModelLoadError, match="WEIGHTS_FILE") as failure:
        Detector.from_settings(settings_for(None))  # WEIGHTS_FILE unset
    assert hub_checkpoint_path() in str(failure.value)


def test_state_dict_digest_depends_on_values():
    a = {"w": torch.zeros(3), "b": torch.ones(2)}
    b = {"w": torch.zeros(3), "b": torch.tensor([1.0, 2.0])}
    assert state_dict_sha256(a) == state_dict_sha256(dict(reversed(list(a.items()))))
    assert state_dict_sha256(a) != state_dict_sha256(b)


# -- a fine-tuned head with its own classes (LABELS_FILE) ----------------------------------------

OWN_CLASSES = ["__background__", "widget", "gadget", "sprocket"]


@pytest.fixture(scope="module")
def own_checkpoint(tmp_path_factory):
    """A 4-class head (background + three) that answers exactly 'gadget'."""
    from testkit.checkpoints import make_forced_checkpoint

    path = tmp_path_factory.mktemp("own") / "gadget.pt"
    make_forced_checkpoint(path, "gadget", categories=OWN_CLASSES)
    return path


@pytest.mark.model
@pytest.mark.parametrize(("name", "text"), [
    ("labels.txt", "widget\ngadget\n\nsprocket\n"),  # the usual file: no background, blank lines ignored
    ("labels.json", '["__background__", "widget", "gadget", "sprocket"]'),
])
def test_own_classes_are_named_from_the_labels_file(own_checkpoint, tmp_path, name, text):
    labels = tmp_path / name
    labels.write_text(text)
    detector = Detector.from_settings(settings_for(own_checkpoint, LABELS_FILE=labels, TORCH_THREADS=THREADS))
    assert detector.categories == OWN_CLASSES
    assert detector.reportable() == ["widget", "gadget", "sprocket"]
    assert detector.detect(scene(160, 120)) == ["gadget"]


@pytest.mark.model
@pytest.mark.parametrize(("text", "message"), [
    ("widget\ngadget\n", "has 2 names, but the checkpoint's box head has 4 classes"),
    ("a\nb\nc\nd\ne\n", "has 5 names, but the checkpoint's box head has 4 classes"),
    ("widget\nwidget\nsprocket\n", "names a class twice"),
])
def test_labels_that_do_not_fit_the_head_are_a_load_error(own_checkpoint, tmp_path, text, message):
    labels = tmp_path / "labels.txt"
    labels.write_text(text)
    with pytest.raises(ModelLoadError, match=message):
        Detector.from_settings(settings_for(own_checkpoint, LABELS_FILE=labels, TORCH_THREADS=THREADS))


@pytest.mark.model
def test_a_head_not_cocos_needs_a_labels_file(own_checkpoint):
    with pytest.raises(ModelLoadError, match="4 classes, not COCO's 91: set LABELS_FILE"):
        Detector.from_settings(settings_for(own_checkpoint, TORCH_THREADS=THREADS))


def test_a_missing_labels_file_stops_the_process_at_start(tmp_path):
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="LABELS_FILE"):
        settings_for(LABELS_FILE=tmp_path / "nope.txt")
