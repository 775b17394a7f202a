"""deploy/: the compose stack, Prometheus's scrape config and alert rules, Grafana's provisioning and
dashboard, and the Kubernetes manifests, checked with the tools that read them (promtool, the
compose-spec schema, the Kubernetes schemas of kubernetes-validate, kustomize) and against each
other, the Dockerfile and supervisord.conf. No process of the service is started.

The helpers ``dashboard_queries`` and ``alert_queries`` are also used by
tests/stack/test_monitoring.py, which evaluates every query against a real Prometheus.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import kubernetes_validate
import pytest
import yaml

from testkit import REPO

DEPLOY = REPO / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "instance-detector.json"
KUBERNETES = DEPLOY / "kubernetes"
JOB = "instance-detector"
# The oldest Kubernetes the manifests are meant for (native gRPC probes are GA since 1.27) and the
# newest whose schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
# `<query> <comparison> <threshold>`: the comparison is the expression's last one.
ALERT_EXPR = re.compile(
    r"^(?P<query>.*\S)\s*(?P<op>==|!=|>=|<=|>|<)\s*(?P<threshold>[-+0-9.eE]+)\s*$", re.DOTALL
)
# Grafana's built-in variable for rate windows; the one variable the dashboard uses.
RATE_INTERVAL = "$__rate_interval"
SERVER_SIDE_CODES = {"internal", "not_ready", "upstream_failed", "upstream_timeout"}
CLIENT_CODES = {"invalid_request", "forbidden_target", "too_large", "not_an_image", "cancelled", "overloaded"}


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def dashboard_queries(rate_interval: str | None = None) -> list[tuple[str, str]]:
    """(panel title / refId, expr) of every dashboard target; with ``rate_interval``, Grafana's
    ``$__rate_interval`` replaced by it so that Prometheus can evaluate the expr."""
    queries = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            if rate_interval is not None:
                expr = expr.replace(RATE_INTERVAL, rate_interval)
            queries.append((f"{panel['title']} / {target['refId']}", expr))
    return queries


def alert_rules() -> list[dict]:
    return [
        rule
        for group in load_yaml(PROMETHEUS / "alerts.yml")["groups"]
        for rule in group["rules"]
        if "alert" in rule
    ]


def alert_queries() -> list[tuple[str, str]]:
    """(alert name, the ``<query>`` part of its ``<query> <comparison> <threshold>`` expr)."""
    return [(rule["alert"], ALERT_EXPR.match(rule["expr"].strip())["query"]) for rule in alert_rules()]


def run(*command: str | Path, cwd: Path = REPO) -> str:
    result = subprocess.run(
        [str(part) for part in command], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"{' '.join(map(str, command))}:\n{result.stdout}{result.stderr}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def promtool() -> str:
    binary = shutil.which("promtool")
    assert binary, "promtool is missing: scripts/test installs Debian's 'prometheus', which ships it"
    return binary


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_yaml(DEPLOY / "compose.yaml")


def mounts(service: dict) -> dict[str, str]:
    """A compose service's bind mounts of files in deploy/: container path -> path relative to deploy/."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            found[target] = source
    return found


# Prometheus ------------------------------------------------------------------------------------


def test_promtool_checks_the_scrape_config(promtool):
    run(promtool, "check", "config", PROMETHEUS / "prometheus.yml")


def test_promtool_checks_the_alert_rules(promtool):
    run(promtool, "check", "rules", PROMETHEUS / "alerts.yml")


def test_the_alerts_fire_as_their_unit_tests_expect(promtool):
    """alerts_test.yml: each alert fires on the series it is for, and not on the others (client
    errors, a model that became ready, an instance that is down)."""
    run(promtool, "test", "rules", "alerts_test.yml", cwd=PROMETHEUS)


def test_the_scrape_config_scrapes_the_service(compose):
    config = load_yaml(PROMETHEUS / "prometheus.yml")
    (job,) = config["scrape_configs"]
    assert job["job_name"] == JOB
    assert job.get("metrics_path", "/metrics") == "/metrics"
    (targets,) = [static["targets"] for static in job["static_configs"]]
    assert targets == ["instance-detector:8080"]
    assert "instance-detector" in compose["services"]
    assert "8080:8080" in compose["services"]["instance-detector"]["ports"]


def test_prometheus_in_compose_reads_the_config_and_its_rules(compose):
    prometheus = compose["services"]["prometheus"]
    config_path = next(
        arg.split("=", 1)[1] for arg in prometheus["command"] if arg.startswith("--config.file=")
    )
    mounted = mounts(prometheus)
    assert mounted[config_path] == "./prometheus/prometheus.yml"
    for rule_file in load_yaml(PROMETHEUS / "prometheus.yml")["rule_files"]:
        in_container = str(PurePosixPath(config_path).parent / rule_file)
        assert in_container in mounted, f"rule file {rule_file} is not mounted at {in_container}"
        assert (DEPLOY / mounted[in_container]).is_file()


def test_the_five_alerts_exist_with_a_runbook():
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert set(rules) == {
        "InstanceDetectorDown",
        "InstanceDetectorErrorRatioHigh",
        "InstanceDetectorShedding",
        "InstanceDetectorLatencyHigh",
        "InstanceDetectorNotReady",
    }
    operations = (REPO / "docs" / "operations.md").read_text()
    headings = {
        re.sub(r"[^a-z0-9 _-]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in operations.splitlines()
        if line.startswith("#")
    }
    for name, rule in rules.items():
        assert ALERT_EXPR.match(rule["expr"].strip()), (
            f"{name}: expr is not `<query> <comparison> <threshold>`"
        )
        assert f'job="{JOB}"' in rule["expr"], f"{name}: does not select job={JOB}"
        assert rule["labels"]["severity"] in ("critical", "warning")
        assert rule.get("for"), f"{name}: fires on a single evaluation"
        document, anchor = rule["annotations"]["runbook"].split("#")
        assert document == "docs/operations.md"
        assert anchor in headings, f"{name}: docs/operations.md has no heading #{anchor}"


def test_the_error_ratio_counts_only_server_side_errors():
    rule = next(rule for rule in alert_rules() if rule["alert"] == "InstanceDetectorErrorRatioHigh")
    (codes,) = re.findall(r'code=~"([^"]+)"', rule["expr"])
    assert set(codes.split("|")) == SERVER_SIDE_CODES
    assert not CLIENT_CODES & set(codes.split("|"))


# Grafana ---------------------------------------------------------------------------------------


def test_every_dashboard_panel_has_a_query():
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "instance-detector"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for panel in dashboard["panels"]:
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no target"
        for target in panel["targets"]:
            assert target.get("expr", "").strip(), (
                f"panel {panel['title']!r} target {target['refId']} has no expr"
            )


def test_the_dashboard_uses_no_variable_but_the_rate_interval():
    for title, expr in dashboard_queries():
        assert "$" not in expr.replace(RATE_INTERVAL, ""), f"{title}: {expr}"
        assert f'job="{JOB}"' in expr, f"{title}: does not select job={JOB}"


def test_the_dashboard_queries_are_valid_promql(promtool, tmp_path):
    """promtool parses each expr as a recording rule (it has no parse-only command)."""
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query:{index}", "expr": expr}
                    for index, (_, expr) in enumerate(dashboard_queries(rate_interval="1m"))
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    run(promtool, "check", "rules", path)


def test_the_dashboard_shows_the_golden_signals():
    exprs = " ".join(expr for _, expr in dashboard_queries())
    for metric in (
        "app_request_duration_seconds_bucket",
        "app_request_duration_seconds_count",
        "app_request_errors_total",
        "app_requests_in_flight",
        "app_model_queue_length",
        "app_requests_shed_total",
        "app_stage_duration_seconds_bucket",
        "app_objects_per_image",
        "app_model_ready",
        "app_model_info",
        "app_process_start_time_seconds",
    ):
        assert metric in exprs, f"no panel shows {metric}"
    for quantile in ("0.5", "0.95", "0.99"):
        assert (
            f"histogram_quantile({quantile}, sum by (protocol, le) (rate(app_request_duration_seconds_bucket"
            in exprs
        ), f"no latency p{quantile} per protocol"


def test_grafana_provisioning_points_at_the_datasource_and_the_dashboard(compose):
    grafana = compose["services"]["grafana"]
    mounted = {source: target for target, source in mounts(grafana).items()}
    assert mounted["./grafana/provisioning"] == "/etc/grafana/provisioning"

    (datasource,) = load_yaml(next((GRAFANA / "provisioning" / "datasources").glob("*.yml")))["datasources"]
    assert datasource["type"] == "prometheus"
    match = re.fullmatch(r"http://([^:/]+):(\d+)/?", datasource["url"])
    assert match, datasource["url"]
    assert match[1] == "prometheus" and match[1] in compose["services"]
    assert match[2] == "9090", "Prometheus listens on 9090 inside its container"

    (provider,) = load_yaml(next((GRAFANA / "provisioning" / "dashboards").glob("*.yml")))["providers"]
    assert provider["type"] == "file"
    assert mounted["./grafana/dashboards"] == provider["options"]["path"]
    assert (GRAFANA / "dashboards").is_dir() and DASHBOARD.is_file()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['options']['path']}/{DASHBOARD.name}"

    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for item in [panel, *panel.get("targets", [])]:
            if "datasource" in item:
                assert item["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]


# Compose ---------------------------------------------------------------------------------------


def test_the_compose_file_matches_the_compose_spec():
    """check-jsonschema's copy of the compose-spec schema (no network needed)."""
    run(
        sys.executable,
        "-m",
        "check_jsonschema",
        "--builtin-schema",
        "vendor.compose-spec",
        DEPLOY / "compose.yaml",
    )


def test_the_compose_service_is_built_from_this_repository(compose):
    service = compose["services"]["instance-detector"]
    assert (
        DEPLOY / service["build"]["context"] / service["build"].get("dockerfile", "Dockerfile")
    ).resolve() == REPO / "Dockerfile"
    assert {"8080:8080", "9090:9090"} <= set(service["ports"])
    assert "/readyz" in " ".join(service["healthcheck"]["test"])
    for name, other in compose["services"].items():
        for target, source in mounts(other).items():
            assert (DEPLOY / source).exists(), f"{name}: {source} (mounted at {target}) does not exist"


# Kubernetes ------------------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted(path for path in KUBERNETES.glob("*.yaml") if path.name != "kustomization.yaml")


def manifests() -> dict[str, dict]:
    """kind -> resource, or kind/name where a kind repeats."""
    found: dict[str, dict] = {}
    for path in manifest_files():
        for document in yaml.safe_load_all(path.read_text()):
            key = (
                document["kind"]
                if document["kind"] not in found
                else f"{document['kind']}/{document['metadata']['name']}"
            )
            found[key] = document
    return found


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda path: path.name)
def test_the_manifest_is_valid_kubernetes(path, version):
    documents = [document for document in yaml.safe_load_all(path.read_text()) if document]
    assert documents
    for document in documents:
        kubernetes_validate.validate(document, version, strict=True)


def test_the_kustomization_lists_every_manifest():
    kustomization = load_yaml(KUBERNETES / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(path.name for path in manifest_files())


def test_kustomize_renders_valid_kubernetes():
    kubectl = shutil.which("kubectl")
    kustomize = shutil.which("kustomize")
    if kubectl:
        rendered = run(kubectl, "kustomize", KUBERNETES)
    elif kustomize:
        rendered = run(kustomize, "build", KUBERNETES)
    else:
        pytest.skip("neither kubectl nor kustomize is installed")
    documents = [document for document in yaml.safe_load_all(rendered) if document]
    assert len(documents) == sum(len(list(yaml.safe_load_all(path.read_text()))) for path in manifest_files())
    for document in documents:
        kubernetes_validate.validate(document, KUBERNETES_VERSIONS[0], strict=True)


def dockerfile_env() -> dict[str, str]:
    """ENV NAME=value pairs of the Dockerfile (continuation lines joined)."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(re.findall(r"(\w+)=(\S+)", line))
    return env


def test_the_deployment_fits_the_image():
    deployment = manifests()["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = dockerfile_env()
    user = re.search(r"^USER (\d+):(\d+)$", (REPO / "Dockerfile").read_text(), re.MULTILINE)

    assert pod["securityContext"]["runAsNonRoot"] is True
    assert str(pod["securityContext"]["runAsUser"]) == user[1]
    for each in [container, *pod.get("initContainers", [])]:
        security = each["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]

    # a writable volume wherever the service writes
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    mounted = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    container_env = {item["name"]: item.get("value") for item in container.get("env", [])}
    for name in ("RUN_DIR", "ACCEL_CACHE_DIR"):
        path = container_env.get(name, env[name])
        assert path == env[name], f"{name}: the Deployment sets {path}, the image {env[name]}"
        assert path in mounted and "emptyDir" in volumes[mounted[path]], (
            f"{name} ({path}) is not on an emptyDir"
        )
    assert "/tmp" in mounted, "gunicorn writes its worker heartbeat files under /tmp"
    # the init container seeds the graph cache from the image
    (seed,) = pod["initContainers"]
    assert seed["image"] == container["image"]
    assert env["ACCEL_CACHE_DIR"] in " ".join(seed["command"])
    assert {mount["name"] for mount in seed["volumeMounts"]} == {mounted[env["ACCEL_CACHE_DIR"]]}


def supervisord_stop_waits() -> dict[str, int]:
    program = None
    waits = {}
    for line in (REPO / "supervisord.conf").read_text().splitlines():
        if line.startswith("[program:"):
            program = line.strip()[9:-1]
        elif program and line.startswith("stopwaitsecs="):
            waits[program] = int(line.split("=", 1)[1])
    return waits


def test_the_deployment_probes_drain_and_resources():
    deployment = manifests()["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http": 8080, "grpc": 9090}

    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "the model may take ~2 min to load"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["grpc"]["port"] == 9090
    for probe in ("livenessProbe", "startupProbe"):
        assert container[probe]["httpGet"]["port"] in ("http", 8080)

    # SIGTERM: after the preStop pause the servers drain (supervisord waits up to stopwaitsecs for
    # each), then the model process, whose last pass takes seconds, stops.
    waits = supervisord_stop_waits()
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] >= pause + max(waits["http"], waits["grpc"]) + 10

    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "8080",
        "prometheus.io/path": "/metrics",
    }

    resources = container["resources"]
    assert resources["requests"]["memory"] == "2560Mi" and resources["limits"]["memory"] == "3Gi"
    assert resources["requests"]["cpu"] == "2"
    threads = {item["name"]: item["value"] for item in container["env"]}["TORCH_THREADS"]
    assert threads == resources["requests"]["cpu"], "one forward-pass thread per requested core"


def test_services_hpa_and_pdb_select_the_pods():
    found = manifests()
    deployment = found["Deployment"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "replicas" not in deployment["spec"], "the HorizontalPodAutoscaler owns the replica count"

    services = [resource for key, resource in found.items() if key.startswith("Service")]
    assert {service["metadata"]["name"] for service in services} == {
        "instance-detector",
        "instance-detector-headless",
    }
    for service in services:
        assert service["spec"]["selector"].items() <= labels.items()
        ports = {port["name"]: port for port in service["spec"]["ports"]}
        assert ports["http"]["port"] == 8080 and ports["grpc"]["port"] == 9090
        assert ports["grpc"]["appProtocol"] == "grpc"
    headless = next(service for service in services if service["metadata"]["name"].endswith("-headless"))
    assert headless["spec"]["clusterIP"] == "None"

    hpa = found["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert hpa["spec"]["minReplicas"] >= 2 and hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"

    pdb = found["PodDisruptionBudget"]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable") == 1
