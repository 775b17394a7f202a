"""deploy/kserve: the manifests parse, name the ports and paths the service has, and fit KServe's
own API types: those of the ``kserve`` package from PyPI (its ``kserve/models``, generated from
the same OpenAPI definitions as KServe's CRDs), read from its wheel, which ``scripts/setup --dev``
downloads into .venv/kserve. Every field must be one the type has, with a value of its type;
Kubernetes' own types inside (containers, metadata) are validated with kubernetes-validate."""

from __future__ import annotations

import ast
import re
import zipfile
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from common.config import Settings
from http_app.app import create_app
from testkit import REPO
from testkit.fake_model import FakeModel

KSERVE = REPO / "deploy" / "kserve"
WHEELS = sorted((REPO / ".venv" / "kserve").glob("kserve-*.whl"))
KUBERNETES_VERSION = kubernetes_validate.latest_version()


def manifest(name: str) -> dict:
    return yaml.safe_load((KSERVE / name).read_text())


@pytest.fixture(scope="module")
def kserve_types() -> dict[str, dict[str, tuple[str, str]]]:
    """{model class: {JSON field: (python attribute, type)}} from the wheel's generated models."""
    assert WHEELS, "the kserve wheel is missing: scripts/setup --dev downloads it into .venv/kserve"
    types: dict[str, dict[str, tuple[str, str]]] = {}
    with zipfile.ZipFile(WHEELS[-1]) as wheel:
        for name in wheel.namelist():
            if not re.fullmatch(r"kserve/models/v1(alpha1|beta1)_\w+\.py", name):
                continue
            tree = ast.parse(wheel.read(name))
            for node in tree.body:
                if isinstance(node, ast.ClassDef):
                    found = {
                        target.id: ast.literal_eval(statement.value)
                        for statement in node.body
                        if isinstance(statement, ast.Assign)
                        for target in statement.targets
                        if isinstance(target, ast.Name) and target.id in ("openapi_types", "attribute_map")
                    }
                    if "openapi_types" in found:
                        attributes = found["attribute_map"]
                        types[node.name] = {
                            attributes[attribute]: (attribute, kind)
                            for attribute, kind in found["openapi_types"].items()
                        }
    return types


def _check(value, kind: str, types: dict, where: str) -> None:
    if kind.startswith("list["):
        assert isinstance(value, list), f"{where}: must be a list"
        for index, item in enumerate(value):
            _check(item, kind[5:-1], types, f"{where}[{index}]")
    elif kind.startswith("dict("):
        assert isinstance(value, dict) and all(isinstance(item, str) for item in value.values()), where
    elif kind in ("str", "int", "bool", "float"):
        python_type = {"str": str, "int": int, "bool": bool, "float": (int, float)}[kind]
        assert isinstance(value, python_type) and not (kind == "int" and isinstance(value, bool)), (
            f"{where}: {value!r} is not {kind}"
        )
    elif kind == "V1Container":
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": {"containers": [value]}}
        kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
    elif kind == "V1ObjectMeta":
        config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": value}
        kubernetes_validate.validate(config_map, KUBERNETES_VERSION, strict=True)
    elif kind in types:
        assert isinstance(value, dict), f"{where}: must be an object"
        fields = types[kind]
        for key, item in value.items():
            assert key in fields, f"{where}: {kind} has no field {key!r}"
            _check(item, fields[key][1], types, f"{where}.{key}")
    else:
        raise AssertionError(f"{where}: no check for {kind}")


@pytest.mark.parametrize(
    ("name", "api_version", "kind"),
    [
        ("servingruntime.yaml", "serving.kserve.io/v1alpha1", "V1alpha1ServingRuntime"),
        ("inferenceservice.yaml", "serving.kserve.io/v1beta1", "V1beta1InferenceService"),
    ],
)
def test_the_manifests_are_kserves_types(kserve_types, name, api_version, kind):
    document = manifest(name)
    assert document["apiVersion"] == api_version
    _check(document, kind, kserve_types, name)


def test_the_runtime_serves_the_inference_service():
    runtime, service = manifest("servingruntime.yaml"), manifest("inferenceservice.yaml")
    model = service["spec"]["predictor"]["model"]
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {item["name"] for item in runtime["spec"]["supportedModelFormats"]}
    assert model["protocolVersion"] in runtime["spec"]["protocolVersions"] == ["v2", "grpc-v2"]
    predictor = service["spec"]["predictor"]
    assert predictor["scaleMetric"] == "concurrency" and predictor["scaleTarget"] >= 1
    kustomization = manifest("kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(path.name for path in KSERVE.glob("*.yaml")
                                                        if path.name != "kustomization.yaml")


def test_probes_ports_and_paths_are_the_services(run_dir):
    settings = Settings()
    container = manifest("servingruntime.yaml")["spec"]["containers"][0]
    assert [port["containerPort"] for port in container["ports"]] == [settings.http_port]
    env = {item["name"]: item["value"] for item in container["env"]}
    assert env["V2_MODEL_NAME"] == settings.v2_model_name
    app = create_app(Settings.from_env({"RUN_DIR": str(run_dir)}), FakeModel())
    client = app.test_client()
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        check = container[probe]["httpGet"]
        assert check["port"] == settings.http_port
        assert client.get(check["path"]).status_code == 200, probe
    annotations = manifest("servingruntime.yaml")["spec"]["annotations"]
    assert int(annotations["prometheus.kserve.io/port"]) == settings.http_port
    assert client.get(annotations["prometheus.kserve.io/path"]).status_code == 200


def test_the_wheel_is_the_one_setup_downloads():
    setup = (REPO / "scripts" / "setup").read_text()
    assert WHEELS and Path(WHEELS[-1]).name.startswith("kserve-") and "kserve==" in setup
