"""Weight loading through the service's own code: the file that is loaded is the one that answers."""

import dataclasses
import os

import pytest
import torch

from common.config import Settings
from common.detector import Detector, ModelLoadError, hub_checkpoint_path
from tests.conftest import CLASS_A, CLASS_B
from tests.helpers import free_port, scene


def settings_for(path, sha256=""):
    return dataclasses.replace(Settings(), weights_file=str(path), weights_sha256=sha256, torch_threads=2)


def test_each_checkpoint_answers_its_own_class(checkpoints):
    image = scene(200, 150)
    answers = {}
    for name, (path, sha256) in checkpoints.items():
        labels = Detector.from_settings(settings_for(path, sha256)).detect(image)
        assert labels, f"{name} checkpoint detected nothing"
        answers[name] = labels
    assert answers == {CLASS_A: [CLASS_A], CLASS_B: [CLASS_B]}


def test_training_checkpoint_layout_is_accepted(checkpoints, tmp_path):
    path, _ = checkpoints[CLASS_A]
    wrapped = tmp_path / "wrapped.pt"
    torch.save({"model": torch.load(path, weights_only=True), "epoch": 3}, wrapped)
    assert Detector.from_settings(settings_for(wrapped)).detect(scene(120, 90)) == [CLASS_A]


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="WEIGHTS_FILE=.*does not exist"):
        Detector.from_settings(settings_for(tmp_path / "nope.pt"))


def test_wrong_checksum(checkpoints):
    path, _ = checkpoints[CLASS_A]
    with pytest.raises(ModelLoadError, match="WEIGHTS_SHA256"):
        Detector.from_settings(settings_for(path, "0" * 64))


def test_truncated_file(checkpoints, tmp_path):
    path, _ = checkpoints[CLASS_A]
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[: os.path.getsize(path) // 3])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        Detector.from_settings(settings_for(truncated))


def test_wrong_architecture(tmp_path):
    other = tmp_path / "resnet.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), other)
    with pytest.raises(ModelLoadError, match="do not fit maskrcnn_resnet50_fpn"):
        Detector.from_settings(settings_for(other))


def test_not_a_state_dict(tmp_path):
    odd = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), odd)
    with pytest.raises(ModelLoadError, match="not a state dict"):
        Detector.from_settings(settings_for(odd))


def test_default_source_without_cached_weights_names_the_setting(tmp_path, monkeypatch):
    """No WEIGHTS_FILE and nothing in the hub cache: a clear error, never untrained weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    # Any download attempt goes to a closed loopback port, even on a machine with internet.
    for proxy in ("https_proxy", "http_proxy", "HTTPS_PROXY", "HTTP_PROXY"):
        monkeypatch.setenv(proxy, f"http://127.0.0.1:{free_port()}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    if os.path.exists(hub_checkpoint_path()):
        pytest.skip("COCO_V1 weights are present in this torch hub cache")
    with pytest.raises(ModelLoadError, match="WEIGHTS_FILE") as failure:
        Detector.from_settings(dataclasses.replace(Settings(), weights_file=""))
    assert hub_checkpoint_path() in str(failure.value)
