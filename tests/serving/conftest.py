"""One local Ray cluster per module: the loraswap Ray Serve app (ingress + 2 engine replicas on the
embedded base, fractional CPUs) and, beside it, the single-process server as the oracle."""

from __future__ import annotations

import shutil
import signal
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ("mnli", "snli", "rte")
PAIRS = [
    ("A man is playing a guitar on stage.", "A person is making music."),
    ("A dog runs through the snow.", "The animal is asleep indoors."),
    ("The talks between the two sides failed.", "The negotiations succeeded."),
    ("Three children are eating lunch at a table.", "Kids are having a meal."),
    ("The museum opened a new wing in 2019.", "The museum is closed forever."),
    ("She bought a red car last week.", "She owns a vehicle."),
]
ENGINE_REPLICAS = 2


@dataclass
class Fleet:
    url: str
    app_name: str
    engine_deployment: str
    extra_root: Path  # an adapter root PUT may load from (copies of shipped adapters)

    def engine_replicas(self) -> list[str]:
        import ray

        prefix = f"SERVE_REPLICA::{self.app_name}#{self.engine_deployment}#"
        return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix))

    def wait_ready(self, replicas: int = ENGINE_REPLICAS, timeout_s: float = 120.0) -> None:
        """Until `replicas` engine replicas run and the ingress answers /readyz with 200 (bounded)."""
        from ray import serve

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = serve.status().applications[self.app_name].deployments[self.engine_deployment]
            running = status.replica_states.get("RUNNING", 0)
            if running >= replicas and httpx.get(self.url + "/readyz", timeout=10).status_code == 200:
                return
            time.sleep(0.5)  # polling a condition with a deadline, not synchronising on time
        raise AssertionError(f"fleet not ready within {timeout_s} s: {status}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def fleet_settings(tmp_path_factory):
    from app.config import Settings

    extra = tmp_path_factory.mktemp("extra-adapters")
    for name in ("mnli", "snli"):
        shutil.copytree(REPO / "adapters" / name, extra / f"{name}-copy")
    return Settings(
        torch_threads=1,
        fraud_enabled=False,
        adapters_dir=REPO / "adapters",
        adapter_roots=[extra],
        admin_token="ray-test-token",
    )


@pytest.fixture(scope="module")
def fleet(fleet_settings) -> Iterator[Fleet]:
    ray = pytest.importorskip("ray")
    from ray import serve

    from app.serving.ray_app import ENGINE_DEPLOYMENT, build_app

    port = _free_port()
    # ray.init installs SIGTERM/SIGINT handlers in this (pytest's) process: put ours back afterwards.
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    # Workers import this checkout (not only the installed one): tests run against the tree under test.
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app_name = "loraswap-test"
        serve.run(
            build_app(fleet_settings, engine_replicas=ENGINE_REPLICAS, engine_num_cpus=0.5, ingress_num_cpus=0.5,
                      engine_timeout_s=20.0, spread_inflight=4),
            name=app_name,
            route_prefix="/",
        )
        fleet = Fleet(f"http://127.0.0.1:{port}", app_name, ENGINE_DEPLOYMENT, fleet_settings.adapter_roots[0])
        fleet.wait_ready()
        yield fleet
    finally:
        serve.shutdown()
        ray.shutdown()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


@pytest.fixture(scope="module")
def affinity_fleet(fleet, fleet_settings) -> Iterator[str]:
    """The same app routed by the affinity request router (`routing="affinity"`), deployed beside the
    multiplexed one on the module's cluster under `/affinity`; its base URL. Deleted after the module's
    last user, so the other tests never share the machine with its replicas."""
    from ray import serve

    from app.serving.ray_app import build_app

    name = "loraswap-affinity"
    serve.run(
        build_app(fleet_settings, engine_replicas=ENGINE_REPLICAS, engine_num_cpus=0.5, ingress_num_cpus=0.5,
                  engine_timeout_s=20.0, spread_inflight=4, routing="affinity"),
        name=name,
        route_prefix="/affinity",
    )
    url = fleet.url + "/affinity"
    deadline = time.monotonic() + 120
    while httpx.get(url + "/readyz", timeout=10).status_code != 200:
        assert time.monotonic() < deadline, "the affinity-routed app did not become ready"
        time.sleep(0.5)  # polling a condition with a deadline
    yield url
    serve.delete(name)


@pytest.fixture(scope="module")
def oracle(fleet_settings):
    """Scores of the single-process server (create_app in this process) for every shipped adapter and
    pair: what the fleet must answer."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(fleet_settings)) as client:
        scores = {}
        for adapter in SHIPPED:
            for premise, hypothesis in PAIRS:
                body = client.post("/nli", json={"premise": premise, "hypothesis": hypothesis, "adapter": adapter})
                assert body.status_code == 200
                scores[(adapter, premise, hypothesis)] = body.json()["scores"]
    return scores


def close_to(got: dict[str, float], want: dict[str, float], tol: float = 1e-4) -> bool:
    return got.keys() == want.keys() and all(abs(got[k] - want[k]) <= tol for k in want)
