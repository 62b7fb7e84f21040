"""Fixtures of the reliability suite: module-local adapter copies, app settings, a real uvicorn server
in a subprocess on 127.0.0.1, and the figures each test records (printed at the end of the run)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from benchmarks.traffic import scores_close  # noqa: F401  (the suite imports it from here)

REPO = Path(__file__).resolve().parents[2]
SHIPPED_FRAUD = REPO / "models" / "fraud"
PREMISE, HYPOTHESIS = "A man is playing a guitar on stage.", "A person is making music."
# Label sets of the synthetic adapters (tests/conftest.py SYNTHETIC_ADAPTERS).
LABELS = {
    "alpha": {"entailment", "neutral", "contradiction"},
    "beta": {"entailment", "not_entailment"},
    "gamma": {"entailment", "neutral", "contradiction"},
}

# Figures of this run, by test module: printed in the terminal summary and, when
# LORASWAP_RELIABILITY_FIGURES names a file, written there as JSON (docs/reliability.md quotes them).
FIGURES: dict[str, dict[str, Any]] = {}


@pytest.fixture
def figures(request):
    section = FIGURES.setdefault(request.module.__name__.rsplit(".", 1)[-1], {})

    def record(key: str, value: Any) -> None:
        section[key] = value

    return record


def pytest_terminal_summary(terminalreporter) -> None:
    if not FIGURES:
        return
    terminalreporter.section("reliability figures")
    for module, values in sorted(FIGURES.items()):
        terminalreporter.write_line(f"{module}: {json.dumps(values, sort_keys=True, default=str)}")
    target = os.environ.get("LORASWAP_RELIABILITY_FIGURES")
    if target:
        Path(target).write_text(json.dumps(FIGURES, indent=2, sort_keys=True, default=str) + "\n")


# -- adapters and settings ---------------------------------------------------------------------------


def copy_adapters(source: Path, destination: Path, names=("alpha", "beta", "gamma")) -> Path:
    destination.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copytree(source / name, destination / name)
    return destination


def settings_for(root: Path, **overrides) -> Settings:
    """The embedded base, the synthetic adapters under `root`, the shipped fraud model, small limits."""
    options: dict[str, Any] = dict(
        adapters_dir=root,
        default_adapter="alpha",
        fraud_model_dir=SHIPPED_FRAUD,
        max_text_chars=200,
        max_pairs_per_request=8,
        max_batch_wait_ms=1,
        fraud_max_batch_transactions=16,
    )
    options.update(overrides)
    return Settings(**options)


def well_formed(body: dict, adapter: str) -> bool:
    """An NLI answer for `adapter`: its label set, probabilities summing to 1, the argmax as label."""
    scores = body.get("scores") or {}
    return (
        body.get("adapter") == adapter
        and set(scores) == LABELS[adapter]
        and abs(sum(scores.values()) - 1) < 1e-4
        and body.get("label") == max(scores, key=scores.get)
    )


# -- a real server -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env_value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return json.dumps([str(v) for v in value])
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


class ServerProcess:
    """`python -m app.cli` (the shipped entry point: one uvicorn worker) on 127.0.0.1 and a free port,
    configured through LORASWAP_* variables only. Its log goes to a file, quoted when startup fails."""

    def __init__(self, log_path: Path, log_level: str = "warning", **settings: Any):
        self.log_level = log_level
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        env = {k: v for k, v in os.environ.items() if not k.startswith("LORASWAP_")}
        env.update({f"LORASWAP_{k.upper()}": _env_value(v) for k, v in settings.items()})
        env["PYTHONUNBUFFERED"] = "1"
        self.env = env
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = 240.0) -> ServerProcess:
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "--host", "127.0.0.1", "--port", str(self.port)]
            + ["--log-level", self.log_level],
            cwd=REPO,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.base_url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)  # waiting for a process to start, not synchronising requests
        self.stop()
        raise RuntimeError(f"server not ready after {timeout_s} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def terminate(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 60.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(10)


def serve(tmp_path: Path, **settings: Any) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path / "server.log", **settings)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def server_settings(root: Path, **overrides: Any) -> dict[str, Any]:
    """Settings of a subprocess server: the embedded base, the adapters under `root`, one torch thread
    (the machine is shared: one thread makes throughput steadier), no fraud model unless asked."""
    options: dict[str, Any] = dict(
        adapters_dir=root,
        default_adapter="alpha",
        fraud_enabled=False,
        torch_threads=1,
        max_text_chars=200,
        max_pairs_per_request=8,
    )
    options.update(overrides)
    return options


# -- raw requests ------------------------------------------------------------------------------------


def asgi_call(
    client,
    method: str,
    raw_path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    client_host: str = "testclient",
):
    """Send one request to the app of a started TestClient with the path exactly as given (percent-
    decoded the way uvicorn does, dot segments kept), which httpx would otherwise normalise, and from
    the client address given. Returns (status, headers, body)."""
    from urllib.parse import unquote

    import anyio

    path, _, query = raw_path.partition("?")
    header_list = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    header_list += [(b"host", b"testserver"), (b"content-length", str(len(body)).encode())]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(path),
        "raw_path": path.encode("latin-1"),
        "root_path": "",
        "query_string": query.encode("latin-1"),
        "headers": header_list,
        "client": (client_host, 50000),
        "server": ("testserver", 80),
        "state": {},
    }

    async def call():
        pending = [{"type": "http.request", "body": body, "more_body": False}]
        sent: list[dict] = []
        done = anyio.Event()

        async def receive():
            if pending:
                return pending.pop(0)
            await done.wait()
            return {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                done.set()

        await client.app(scope, receive, send)
        return sent

    messages = client.portal.call(call)
    start = next(m for m in messages if m["type"] == "http.response.start")
    content = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    return start["status"], {k.decode().lower(): v.decode() for k, v in start.get("headers", [])}, content
