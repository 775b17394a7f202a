"""Settings from the environment (common/config.py): parsing, checking, derived paths."""

import pytest

from common.config import Settings
from common.errors import ConfigError


def test_modes_config():
    assert Settings().detect_mode == "exact"
    assert Settings.from_env({}).detect_mode == "exact"
    assert Settings.from_env({"DETECT_MODE": " Fast "}).detect_mode == "fast"
    assert Settings.from_env({"DETECT_MODE": "eager"}).detect_mode == "eager"
    with pytest.raises(ConfigError, match="DETECT_MODE"):
        Settings.from_env({"DETECT_MODE": "bf16"})
    with pytest.raises(ConfigError, match="ROI_ALIGN_THREADS"):
        Settings.from_env({"ROI_ALIGN_THREADS": "0"})
    assert Settings.from_env({}).winograd == 1
    assert Settings.from_env({"WINOGRAD": "0"}).winograd == 0
    with pytest.raises(ConfigError, match="WINOGRAD"):
        Settings.from_env({"WINOGRAD": "2"})


def test_paths_follow_from_run_dir():
    settings = Settings.from_env({"RUN_DIR": "/srv/detector"})
    assert settings.metrics_dir == "/srv/detector/metrics"
    assert settings.model_socket == "/srv/detector/model.sock"


def test_removed_variables_are_not_read():
    """MODEL_SERVER and PROMETHEUS_MULTIPROC_DIR are derived from RUN_DIR now; SHARED_INFERENCE_LOCK
    is gone: setting them changes nothing."""
    env = {"RUN_DIR": "/srv/detector"}
    stale = {**env, "MODEL_SERVER": "/elsewhere/model.sock", "PROMETHEUS_MULTIPROC_DIR": "/elsewhere/metrics",
             "SHARED_INFERENCE_LOCK": "1"}
    assert Settings.from_env(stale) == Settings.from_env(env)


@pytest.mark.parametrize("variable,value", [
    ("SCORE_THRESHOLD", "1.5"), ("HTTP_PORT", "0"), ("HTTP_PORT", "http"), ("WEIGHTS_SHA256", "abc"),
    ("LOG_LEVEL", "LOUD"), ("MODEL_PROCESS", "yes"),
])
def test_unusable_values_name_their_variable(variable, value):
    with pytest.raises(ConfigError, match=variable):
        Settings.from_env({variable: value})


def test_the_model_socket_path_must_fit():
    long_dir = "/tmp/" + "x" * 120
    assert Settings.from_env({"RUN_DIR": long_dir}).run_dir == long_dir  # no model process: fine
    with pytest.raises(ConfigError, match="RUN_DIR"):
        Settings.from_env({"RUN_DIR": long_dir, "MODEL_PROCESS": "1"})
