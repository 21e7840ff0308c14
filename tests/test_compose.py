"""docker-compose.yml and the Dockerfile, checked without a Docker engine.

The compose services must run the same command the server tests run (``python -m service`` with
options its parser accepts), probe the endpoint that means "ready", and mount the weights read-only;
the healthcheck command itself is executed against a stand-in server to show that it passes on 200
and fails on 503. Each API is reachable only through its nginx proxy, whose config
(deploy/nginx/nginx.conf, run under a real nginx by tests/test_proxy.py) must refuse bodies at the
same size as the API behind it.
"""

from __future__ import annotations

import http.server
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.__main__ import build_parser, environment
from service.config import ServerSettings, ServiceConfig
from tests.conftest import http_stand_in

REPO_ROOT = Path(__file__).resolve().parents[1]
URL = re.compile(r"http://127\.0\.0\.1:(\d+)(/[\w/]*)")
NGINX_CONF = REPO_ROOT / "deploy" / "nginx" / "nginx.conf"
PROXIES = [("proxy", "api", 8000), ("proxy-gpu", "api-gpu", 8001)]  # proxy, the API behind it, the host port


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def dockerfile() -> str:
    # Join continued lines so that every instruction is one line.
    return re.sub(r"\\\n\s*", " ", (REPO_ROOT / "Dockerfile").read_text())


def healthcheck_code(test: list[str]) -> str:
    assert test[:3] == ["CMD", "python", "-c"], test
    return test[3]


@pytest.mark.parametrize("name", ["api", "api-gpu"])
def test_api_services_run_the_service_module_and_probe_readyz(compose: dict[str, Any], name: str) -> None:
    service = compose["services"][name]
    command = service["command"]
    assert command[:3] == ["python", "-m", "service"]
    args = build_parser().parse_args(command[3:])
    assert args.host == "0.0.0.0"
    url = URL.search(healthcheck_code(service["healthcheck"]["test"]))
    assert url is not None and url.group(2) == "/readyz"
    assert int(url.group(1)) == args.port
    assert "ports" not in service, "an API container publishes no port: it is reached through its proxy"
    assert service["expose"] == [str(args.port)]
    weights = [volume for volume in service["volumes"] if volume.startswith("./weights:")]
    assert len(weights) == 1 and weights[0].endswith(":ro")
    mount_point = weights[0].split(":")[1]
    env = environment(args, {key: str(value) for key, value in service["environment"].items()})
    ServerSettings.from_env(env)  # raises if a compose setting is invalid
    config = ServiceConfig.from_env(env)
    assert config.model_dir is not None and config.model_dir.startswith(mount_point + "/")


def nginx_directive(name: str) -> str:
    values = re.findall(rf"^\s*{name}\s+([^;]+);", NGINX_CONF.read_text(), flags=re.MULTILINE)
    assert len(values) == 1, (name, values)
    return values[0].strip()


def nginx_size(value: str) -> int:
    match = re.fullmatch(r"(\d+)([kKmMgG]?)", value)
    assert match is not None, value
    return int(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[match.group(2).lower()]


@pytest.mark.parametrize(("name", "api_name", "host_port"), PROXIES)
def test_each_api_is_published_only_through_its_nginx_proxy(
    compose: dict[str, Any], name: str, api_name: str, host_port: int
) -> None:
    proxy, api = compose["services"][name], compose["services"][api_name]
    assert re.fullmatch(r"nginx:\d+\.\d+(\.\d+)?", proxy["image"]), "the official image, pinned to a version"
    assert proxy.get("profiles") == api.get("profiles")
    assert proxy["depends_on"][api_name]["condition"] == "service_healthy"
    # The repository's config, read-only, beside the file that names this proxy's API.
    mounts = {volume.split(":")[1]: volume.split(":") for volume in proxy["volumes"]}
    assert mounts["/etc/nginx/nginx.conf"] == ["./deploy/nginx/nginx.conf", "/etc/nginx/nginx.conf", "ro"]
    source, _, mode = mounts["/etc/nginx/captioner-api.conf"]
    assert mode == "ro" and "include captioner-api.conf;" in NGINX_CONF.read_text()
    api_port = build_parser().parse_args(api["command"][3:]).port
    assert re.search(rf"^set \$captioner_api {api_name}:{api_port};$", (REPO_ROOT / source).read_text(), re.MULTILINE)
    # The proxy publishes the port the API used to, onto the port nginx listens on; so does its healthcheck.
    listen = int(nginx_directive("listen"))
    assert proxy["ports"] == [f"{host_port}:{listen}"]
    url = re.search(r"http://127\.0\.0\.1:(\d+)/healthz", " ".join(proxy["healthcheck"]["test"]))
    assert url is not None and int(url.group(1)) == listen
    # nginx refuses bodies at exactly the size the API does (CAPTIONER_MAX_UPLOAD_BYTES, as configured here).
    env = {key: str(value) for key, value in api["environment"].items()}
    assert nginx_size(nginx_directive("client_max_body_size")) == ServiceConfig.from_env(env).max_upload_bytes


def test_only_the_proxies_publish_ports(compose: dict[str, Any]) -> None:
    published = {name for name, service in compose["services"].items() if service.get("ports")}
    assert published == {name for name, _, _ in PROXIES}


def test_the_default_service_uses_the_cpu_and_the_gpu_one_reserves_a_gpu(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert "profiles" not in services["api"] and "deploy" not in services["api"]
    assert services["api"]["environment"]["CAPTIONER_DEVICE"] == "cpu"
    gpu = services["api-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["environment"]["CAPTIONER_DEVICE"] == "cuda"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]


def test_the_train_service_runs_training_on_a_gpu_with_a_data_volume(compose: dict[str, Any]) -> None:
    train = compose["services"]["train"]
    assert train["profiles"] == ["train"]
    command = train["command"]
    assert command[:3] == ["python", "-m", "training.train"] and command[3] == "--config"
    assert (REPO_ROOT / command[4]).is_file(), f"{command[4]} does not exist"
    assert any(volume.split(":")[1] == "/app/data" for volume in train["volumes"])
    assert train["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def test_the_dockerfile_serves_the_same_command_as_non_root(compose: dict[str, Any], dockerfile: str) -> None:
    stages = re.findall(r"^FROM (\S+)", dockerfile, flags=re.MULTILINE)
    assert stages[0] == "python:3.11-slim"
    final_stage = dockerfile.rsplit("\nFROM ", 1)[1]
    assert final_stage.startswith("base AS serve")
    users = re.findall(r"^USER (\S+)", final_stage, flags=re.MULTILINE)
    assert users and users[-1] not in {"root", "0"}
    cmd = re.search(r"^CMD (\[.*\])$", final_stage, flags=re.MULTILINE)
    assert cmd is not None
    assert json.loads(cmd.group(1)) == ["python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
    assert json.loads(cmd.group(1)) == compose["services"]["api"]["command"]
    healthcheck = re.search(r"^HEALTHCHECK .*? CMD (\[.*\])$", final_stage, flags=re.MULTILINE)
    assert healthcheck is not None
    docker_test = json.loads(healthcheck.group(1))
    assert docker_test == compose["services"]["api"]["healthcheck"]["test"][1:]


class _Probe(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 (the name http.server dispatches to)
        code = type(self).status if self.path == "/readyz" else 404
        self.send_response(code)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # silence the stand-in's access log
        return


@pytest.fixture()
def probe_server() -> Iterator[tuple[int, type[_Probe]]]:
    handler = type("Probe", (_Probe,), {})
    with http_stand_in(handler) as port:
        yield port, handler


def test_the_healthcheck_passes_when_ready_and_fails_otherwise(
    compose: dict[str, Any], probe_server: tuple[int, type[_Probe]]
) -> None:
    port, handler = probe_server
    code = healthcheck_code(compose["services"]["api"]["healthcheck"]["test"])
    local = code.replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    assert local != code

    def check() -> int:
        return subprocess.run([sys.executable, "-c", local], capture_output=True, timeout=30).returncode

    handler.status = 200
    assert check() == 0
    handler.status = 503
    assert check() != 0
