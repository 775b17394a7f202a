"""The image built from the repository's Dockerfile, run with podman the way users run it.

    .venv/bin/python -m pytest -m container tests/container -q

Most tests share one service container (module fixture ``service``); the last test stops it.
Tests run in file order; each one still works on its own.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time

import pytest
import requests

from testkit.clients import metric_value
from testkit.stack import free_port
from tests.container.support import CATEGORY, GRPCURL, Container, grpc_health, podman, wait_for

pytestmark = pytest.mark.container

STOP_TIMEOUT = 40  # `podman stop -t`: the stop timeout the README asks deployments to give


def http_predict(container: Container, url: str, timeout: float = 120) -> requests.Response:
    return requests.post(container.http + "/predict", json={"url": url}, timeout=timeout)


def counter(container: Container) -> float:
    return metric_value(container.http, "app_http_inference_count")


def processes(container: Container) -> list[dict]:
    """Every process in the container from /proc: pid, ppid, uids (real, effective, saved, fs), argv."""
    code = r"""
import json, os
found = []
for pid in os.listdir('/proc'):
    if not pid.isdigit() or int(pid) == os.getpid():
        continue
    try:
        status = open(f'/proc/{pid}/status').read()
        argv = open(f'/proc/{pid}/cmdline', 'rb').read().split(b'\0')
    except OSError:
        continue
    fields = dict(line.split(':\t', 1) for line in status.splitlines() if ':\t' in line)
    found.append({'pid': int(pid), 'ppid': int(fields['PPid']),
                  'uids': [int(u) for u in fields['Uid'].split()],
                  'argv': [a.decode(errors='replace') for a in argv if a]})
print(json.dumps(found))
"""
    return json.loads(container.python(code))


def roles(container: Container) -> dict:
    """{'supervisord': [...], 'model': [...], 'gunicorn_master': [...], 'gunicorn_workers': [...],
    'grpc': [...]}"""
    procs = processes(container)
    by_role = {"supervisord": [], "model": [], "gunicorn_master": [], "gunicorn_workers": [], "grpc": [],
               "other": []}
    gunicorn = [p for p in procs if "gunicorn" in p["argv"]]
    gunicorn_pids = {p["pid"] for p in gunicorn}
    for p in procs:
        command = " ".join(p["argv"])
        if "supervisord" in command:
            by_role["supervisord"].append(p)
        elif p in gunicorn:
            by_role["gunicorn_workers" if p["ppid"] in gunicorn_pids else "gunicorn_master"].append(p)
        elif p["argv"][-2:] == ["-m", "grpc_app"]:
            by_role["grpc"].append(p)
        elif p["argv"][-2:] == ["-m", "common.model.server"]:
            by_role["model"].append(p)
        else:
            by_role["other"].append(p)
    return by_role


# --------------------------------------------------------------------------- the image itself

def test_image_metadata(container_image):
    image = json.loads(podman("image", "inspect", container_image).stdout)[0]
    config = image["Config"]
    assert config["User"] == "10001:10001"
    assert {"8080/tcp", "9090/tcp"} <= set(config["ExposedPorts"])
    assert config["Entrypoint"][0].endswith("supervisord")
    healthcheck = " ".join((image.get("Healthcheck") or config.get("Healthcheck") or {}).get("Test", []))
    assert "/readyz" in healthcheck, "HEALTHCHECK missing: was the image built with --format docker?"


def test_published_ports_answer_and_unready_is_unhealthy(container_image):
    """Ports published on 127.0.0.1: /healthz answers through them, gRPC reflection too. With no
    usable weights the service stays alive but not ready, and the HEALTHCHECK says unhealthy."""
    http_port, grpc_port = free_port(), free_port()
    container = Container.run(
        network_args=["-p", f"127.0.0.1:{http_port}:8080", "-p", f"127.0.0.1:{grpc_port}:9090"],
        env={"WEIGHTS_FILE": "/weights/absent.pt"},  # fails at once, never reaches a network
        http=f"http://127.0.0.1:{http_port}", grpc_target=f"127.0.0.1:{grpc_port}",
    )
    try:
        container.wait(lambda: requests.get(container.http + "/healthz", timeout=2).status_code == 200,
                       120, "/healthz 200 through the published port")
        def failed_readiness():
            response = requests.get(container.http + "/readyz", timeout=2)
            body = response.json()
            return (response.status_code, body) if body["status"] == "failed" else None

        status, body = container.wait(failed_readiness, 120, "/readyz reporting the failed load")
        assert status == 503
        assert "WEIGHTS_FILE=/weights/absent.pt" in body["message"]
        container.wait(lambda: grpc_health(container.grpc_target) == "NOT_SERVING", 120,
                       "gRPC health through the published port")
        listed = subprocess.run([GRPCURL, "-plaintext", container.grpc_target, "list"],
                                capture_output=True, text=True, timeout=30)
        assert "inference.InstanceDetector" in listed.stdout.split(), listed.stderr
        assert container.healthcheck() != 0
    finally:
        container.remove()


def test_weights_in_the_hub_cache_start_offline(container_image, dog_checkpoint):
    """What DOWNLOAD_WEIGHTS=true bakes in (it cannot download here): a file at the torch hub
    cache path under the image's TORCH_HOME. With WEIGHTS_FILE unset and no network at all, the
    service loads it from there and becomes ready; the HEALTHCHECK then says healthy."""
    from torchvision.models.detection import MaskRCNN_ResNet50_FPN_Weights

    path, _ = dog_checkpoint
    hub_file = f"/opt/torch/hub/checkpoints/{MaskRCNN_ResNet50_FPN_Weights.COCO_V1.url.rsplit('/', 1)[1]}"
    container = Container.run(network_args=["--network", "none"], env={"TORCH_THREADS": "1"},
                              volumes=[f"{path}:{hub_file}:ro"], http="", grpc_target="")
    try:
        # no network and no WEIGHTS_FILE: ready means the model came from the hub cache file
        container.wait(lambda: container.healthcheck() == 0, 240, "healthy without WEIGHTS_FILE")
    finally:
        container.remove()


# --------------------------------------------------------------------------- the service, course style

def test_becomes_ready_and_healthy(service):
    assert requests.get(service.http + "/readyz", timeout=5).json()["status"] == "ready"
    assert grpc_health(service.grpc_target) == "SERVING"
    assert wait_for(lambda: service.healthcheck() == 0, 60, "podman healthcheck run: healthy")


def test_http_and_grpc_give_the_same_objects(service, container_images, grpc_client):
    url = container_images.url("/img/jpeg")
    hits = len(container_images.hits)
    response = http_predict(service, url)
    assert response.status_code == 200, response.text
    http_objects = response.json()["objects"]
    grpc_objects = grpc_client(service.grpc_target, url)
    assert http_objects == grpc_objects
    assert http_objects and set(http_objects) == {CATEGORY}
    assert container_images.hits[hits:] == ["/img/jpeg", "/img/jpeg"]  # fetched by the container


def test_one_predict_counts_once(service, container_images):
    before = counter(service)
    assert http_predict(service, container_images.url("/img/jpeg")).status_code == 200
    assert counter(service) == before + 1


def test_grpcurl_lists_services_by_reflection(service):
    listed = subprocess.run([GRPCURL, "-plaintext", service.grpc_target, "list"],
                            capture_output=True, text=True, timeout=30)
    assert listed.returncode == 0, listed.stderr
    services = listed.stdout.split()
    assert "inference.InstanceDetector" in services
    assert "grpc.health.v1.Health" in services


# --------------------------------------------------------------------------- inside the container

def test_image_holds_only_the_service(service):
    listing = service.python("import os; print(' '.join(sorted(os.listdir('/app'))))").split()
    assert listing == ["common", "grpc_app", "http_app", "protos", "supervisord.conf"]
    generated = service.python("import os; print(' '.join(sorted(os.listdir('/app/grpc_app/generated'))))")
    assert "inference_pb2_grpc.py" in generated.split()
    # built with DOWNLOAD_WEIGHTS=false: no weights in the torch hub cache
    assert service.python("import os; print(os.path.exists(os.environ['TORCH_HOME']))").strip() == "False"
    # the service cannot change its own code
    denied = service.exec("sh", "-c", "touch /app/common/x.py", check=False)
    assert denied.returncode != 0


def test_servers_are_separate_non_root_processes(service):
    found = roles(service)
    assert [p["pid"] for p in found["supervisord"]] == [1]
    assert len(found["gunicorn_master"]) == 1
    assert len(found["gunicorn_workers"]) == 2
    assert len(found["grpc"]) == 1
    assert len(found["model"]) == 1
    master = found["gunicorn_master"][0]
    assert master["ppid"] == 1 and found["grpc"][0]["ppid"] == 1 and found["model"][0]["ppid"] == 1
    assert all(w["ppid"] == master["pid"] for w in found["gunicorn_workers"])
    every = [p for group in found.values() for p in group]
    assert all(0 not in p["uids"] for p in every), every


def test_crashed_servers_are_restarted(service, container_images, grpc_client):
    url = container_images.url("/img/jpeg")
    seen = [counter(service)]

    # the gRPC server dies: supervisord starts a new one, which loads the model and answers
    old_grpc = roles(service)["grpc"][0]["pid"]
    service.exec("sh", "-c", f"kill -KILL {old_grpc}")
    new_grpc = service.wait(
        lambda: [p["pid"] for p in roles(service)["grpc"] if p["pid"] != old_grpc], 60,
        "a new gRPC server process")
    assert old_grpc not in [p["pid"] for p in roles(service)["grpc"]] and len(new_grpc) == 1
    service.wait(lambda: grpc_health(service.grpc_target) == "SERVING", 120, "restarted gRPC SERVING")
    assert set(grpc_client(service.grpc_target, url)) == {CATEGORY}
    seen.append(counter(service))

    # the model process dies: supervisord starts a new one, and both servers answer again
    old_model = roles(service)["model"][0]["pid"]
    service.exec("sh", "-c", f"kill -KILL {old_model}")
    service.wait(lambda: [p["pid"] for p in roles(service)["model"] if p["pid"] != old_model], 60,
                 "a new model process")
    service.wait(lambda: requests.get(service.http + "/readyz", timeout=5).status_code == 200, 120,
                 "ready again")
    assert set(http_predict(service, url).json()["objects"]) == {CATEGORY}
    assert set(grpc_client(service.grpc_target, url)) == {CATEGORY}
    seen.append(counter(service))

    # a gunicorn worker dies: the master replaces it, and both workers answer
    workers = [p["pid"] for p in roles(service)["gunicorn_workers"]]
    service.exec("sh", "-c", f"kill -KILL {workers[0]}")
    service.wait(lambda: (pids := [p["pid"] for p in roles(service)["gunicorn_workers"]])
                 and len(pids) == 2 and workers[0] not in pids, 60, "a replacement gunicorn worker")
    seen.append(counter(service))
    for _ in range(4):  # several requests, so that the new worker serves some
        response = http_predict(service, url)
        assert response.status_code == 200, response.text
        assert set(response.json()["objects"]) == {CATEGORY}
        seen.append(counter(service))
    assert seen == sorted(seen), f"the counter went down: {seen}"
    assert seen[-1] >= seen[0] + 4
    assert service.running()


# --------------------------------------------------------------------------- stopping (last: ends the container)

def test_stop_is_graceful_and_exits_zero(service, container_images, grpc_client):
    """`podman stop` while an HTTP and a gRPC request are in flight: both get their answer, the
    container ends within the stop timeout, exit code 0."""
    results = {}

    def call(name, function):
        try:
            results[name] = function()
        except Exception as exc:  # noqa: BLE001 - reported by the assertions below
            results[name] = exc

    delay = 3
    slow_http = container_images.url(f"/slow?delay={delay}&via=http")
    slow_grpc = container_images.url(f"/slow?delay={delay}&via=grpc")
    threads = [
        threading.Thread(target=call, args=("http", lambda: http_predict(service, slow_http))),
        threading.Thread(target=call, args=("grpc", lambda: grpc_client(service.grpc_target, slow_grpc))),
    ]
    for thread in threads:
        thread.start()
    # both requests have reached the image server: they are in flight inside the servers
    wait_for(lambda: {f"/slow?delay={delay}&via=http", f"/slow?delay={delay}&via=grpc"}
             <= set(container_images.hits), 60, "both slow fetches in flight")

    started = time.monotonic()
    podman("stop", "-t", str(STOP_TIMEOUT), service.name, timeout=STOP_TIMEOUT + 30)
    elapsed = time.monotonic() - started
    for thread in threads:
        thread.join(60)
    state = service.state()

    assert not state["Running"]
    assert state["ExitCode"] == 0, service.logs()
    assert elapsed < STOP_TIMEOUT, f"stop took {elapsed:.1f}s"
    assert isinstance(results.get("http"), requests.Response), results.get("http")
    assert results["http"].status_code == 200, results["http"].text
    assert set(results["http"].json()["objects"]) == {CATEGORY}
    assert results.get("grpc") and not isinstance(results["grpc"], Exception), results.get("grpc")
    assert set(results["grpc"]) == {CATEGORY}
