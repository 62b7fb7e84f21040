"""Server subprocesses: start on a loopback port, wait for ready, read RSS/CPU/metrics, always stop."""

from __future__ import annotations

import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
HISTOGRAM_LINE = re.compile(r'^(?P<name>[a-zA-Z_:][\w:]*)_bucket\{(?P<labels>[^}]*)\} (?P<value>\S+)$')


class ServerFailed(RuntimeError):
    """The server exited or never became ready; the message carries the end of its log."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def loraswap_command(port: int) -> list[str]:
    # No access log: one log line per request costs CPU the baselines would not pay either.
    return [
        sys.executable, "-m", "uvicorn", "app.main:app",
        "--host", "127.0.0.1", "--port", str(port), "--no-access-log", "--log-level", "warning",
    ]


class ServerProcess:
    """A server started in its own session, so stopping it reaches every process it started.

    Use as a context manager: the process is stopped on exit, also on errors and KeyboardInterrupt.
    """

    def __init__(
        self,
        name: str,
        command: list[str],
        *,
        port: int,
        env: dict[str, str] | None = None,
        log_path: Path,
        ready_path: str = "/readyz",
        ready_timeout_s: float = 300.0,
    ):
        self.name = name
        self.command = command
        self.port = port
        self.env = {**os.environ, **(env or {})}
        self.log_path = Path(log_path)
        self.ready_path = ready_path
        self.ready_timeout_s = ready_timeout_s
        self.process: subprocess.Popen | None = None
        self.startup_s: float | None = None
        self._launched_at = 0.0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        self.launch()
        self.wait_ready()

    def launch(self) -> None:
        """Start the process without waiting (several servers can then load their models at once)."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("wb")
        self._launched_at = time.perf_counter()
        logger.info("starting %s on port %d", self.name, self.port)
        self.process = subprocess.Popen(
            self.command, cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()  # the child holds its own descriptor

    def wait_ready(self) -> None:
        try:
            self._poll_ready()
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.perf_counter() - self._launched_at
        logger.info("%s ready in %.1f s (pid %d)", self.name, self.startup_s, self.pid)

    def _poll_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        with httpx.Client(base_url=self.url, timeout=5.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise ServerFailed(f"{self.name} exited with {self.process.returncode}:\n{self.log_tail()}")
                try:
                    if client.get(self.ready_path).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.2)
        raise ServerFailed(f"{self.name} not ready after {self.ready_timeout_s:.0f} s:\n{self.log_tail()}")

    def stop(self, grace_s: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)
        except ProcessLookupError:
            pass
        logger.info("stopped %s", self.name)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def rss_bytes(self) -> int:
        return process_rss_bytes(self.pid)

    def cpu_s(self) -> float:
        return process_cpu_s(self.pid)


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used, all its threads together, from /proc (Linux)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_rss_bytes(pid: int) -> int:
    """Resident set size of one process, from /proc (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def scrape_histogram(client: httpx.Client, name: str, base_url: str = "") -> dict[str, float] | None:
    """Cumulative bucket counts {le: count} of a Prometheus histogram on GET /metrics, plus `_sum`
    and `_count` under those keys; None when the server has no /metrics or no such series."""
    try:
        response = client.get(f"{base_url}/metrics")
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    buckets: dict[str, float] = {}
    for line in response.text.splitlines():
        match = HISTOGRAM_LINE.match(line)
        if match and match.group("name") == name:
            le = re.search(r'le="([^"]+)"', match.group("labels"))
            if le:
                buckets[le.group(1)] = float(match.group("value"))
        elif line.startswith(f"{name}_sum "):
            buckets["_sum"] = float(line.split()[1])
        elif line.startswith(f"{name}_count "):
            buckets["_count"] = float(line.split()[1])
    return buckets or None


def histogram_delta(before: dict[str, float] | None, after: dict[str, float] | None) -> dict | None:
    """What happened between two scrapes: count, mean, and the count in each bucket (`le` upper
    bounds turned into ranges such as "3-4")."""
    if before is None or after is None or "_count" not in after:
        return None
    count = after["_count"] - before.get("_count", 0.0)
    total = after.get("_sum", 0.0) - before.get("_sum", 0.0)
    bounds = sorted((float(k), k) for k in after if not k.startswith("_") and k != "+Inf")
    ranges: dict[str, int] = {}
    previous_bound, previous_cum = 0.0, 0.0
    for bound, key in [*bounds, (math.inf, "+Inf")]:
        cumulative = after.get(key, 0.0) - before.get(key, 0.0)
        in_range = int(round(cumulative - previous_cum))
        low = int(previous_bound) + 1
        label = f">{int(previous_bound)}" if bound == math.inf else (
            str(int(bound)) if low >= bound else f"{low}-{int(bound)}"
        )
        if in_range:
            ranges[label] = in_range
        previous_bound, previous_cum = bound, cumulative
    return {"batches": int(round(count)), "mean": round(total / count, 2) if count else None, "histogram": ranges}

