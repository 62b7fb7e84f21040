"""The Ray Serve application on a local cluster: answers equal the single server's, adapter affinity,
PUT/DELETE reaching every replica by version, and an engine replica killed mid-traffic."""

from __future__ import annotations

import itertools
import random
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.serving.conftest import PAIRS, SHIPPED, close_to

pytestmark = pytest.mark.ray

AUTH = {"Authorization": "Bearer ray-test-token"}


def _nli(client: httpx.Client, adapter: str, pair: tuple[str, str]) -> httpx.Response:
    return client.post("/nli", json={"premise": pair[0], "hypothesis": pair[1], "adapter": adapter})


def test_mixed_traffic_is_answered_as_the_single_server_answers_it(fleet, oracle, record_property):
    rng = random.Random(11)
    work = [(rng.choice(SHIPPED), rng.choice(PAIRS)) for _ in range(90)]
    with httpx.Client(base_url=fleet.url, timeout=60) as client, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda item: _nli(client, *item), work))
        batch = [{"premise": p, "hypothesis": h, "adapter": a} for a, (p, h) in zip(itertools.cycle(SHIPPED), PAIRS)]
        batch_answer = client.post("/nli/batch", json={"pairs": batch})
    assert [a.status_code for a in answers] == [200] * len(work)
    for (adapter, (premise, hypothesis)), answer in zip(work, answers):
        body = answer.json()
        assert body["adapter"] == adapter
        assert close_to(body["scores"], oracle[(adapter, premise, hypothesis)])
    assert batch_answer.status_code == 200
    for row, result in zip(batch, batch_answer.json()["results"]):
        assert result["adapter"] == row["adapter"]
        assert close_to(result["scores"], oracle[(row["adapter"], row["premise"], row["hypothesis"])])
    # Affinity: the share of requests answered by a replica that already held their adapter.
    held = [a.headers["x-loraswap-adapter-held"] == "1" for a in answers]
    share = sum(held) / len(held)
    record_property("affinity_share", round(share, 3))
    print(f"affinity share {share:.3f} over {len(held)} requests")
    # Misses are first uses only: every replica read each adapter from disk at most once (concurrent
    # first requests for one adapter share that load, and each of them is a miss).
    assert share > 0.5
    for reply in _every_replica("probe", fleet):
        loads = {a.name: a.loads for a in reply.adapters if a.name in SHIPPED}
        assert all(n <= 1 for n in loads.values()), (reply.replica, loads)


def _every_replica(method: str, fleet) -> list:
    """`method` answered by every live engine replica (Ray's broadcast), with no version stamps."""
    from ray import serve

    engine = serve.get_deployment_handle(fleet.engine_deployment, app_name=fleet.app_name)
    replies = engine.broadcast(method, {}).results(timeout_s=60)
    assert len(replies) == len(fleet.engine_replicas())
    return replies


def test_hot_adapter_traffic_spread_is_reported(fleet, oracle, record_property):
    with httpx.Client(base_url=fleet.url, timeout=60) as client, ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: _nli(client, "mnli", PAIRS[i % len(PAIRS)]), range(64)))
    assert [a.status_code for a in answers] == [200] * 64
    for i, answer in enumerate(answers):
        assert close_to(answer.json()["scores"], oracle[("mnli", *PAIRS[i % len(PAIRS)])])
    replicas = [a.headers["x-loraswap-replica"] for a in answers]
    model_ids = [a.headers["x-loraswap-model-id"] for a in answers]
    shares = {r: replicas.count(r) / len(replicas) for r in set(replicas)}
    record_property("hot_adapter_replica_shares", shares)
    print(f"hot adapter over replicas: {shares}; model ids {Counter(model_ids)}")


def test_error_envelope_and_auth_are_the_single_servers(fleet):
    with httpx.Client(base_url=fleet.url, timeout=60) as client:
        unknown = client.post("/nli", json={"premise": "a", "hypothesis": "b", "adapter": "no-such"})
        blank = client.post("/nli", json={"premise": " ", "hypothesis": "b", "adapter": "mnli"})
        no_token = client.put("/adapters/x", json={"path": str(fleet.extra_root / "mnli-copy")})
        wrong = client.put("/adapters/x", json={"path": "/etc"}, headers=AUTH)
        docs = client.get("/docs")
        openapi = client.get("/openapi.json")
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "adapter_not_found"
    assert set(unknown.json()["error"]["details"]["available"]) >= set(SHIPPED)
    assert blank.status_code == 422 and blank.json()["error"]["code"] == "invalid_input"
    assert no_token.status_code == 401
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "path_not_allowed"
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert "/nli/batch" in openapi.json()["paths"]


def _batch_pairs_by_replica(client: httpx.Client) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    answer = client.get("/metrics")
    assert answer.status_code == 200
    return {
        s.labels["replica"]: s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples if s.name == "loraswap_batch_size_pairs_sum"
    }


def test_ingress_metrics_hold_every_engine_replicas_series_labelled_by_replica(fleet):
    rng = random.Random(5)
    work = [(rng.choice(SHIPPED), rng.choice(PAIRS)) for _ in range(48)]
    batch = [{"premise": p, "hypothesis": h, "adapter": a} for a, (p, h) in zip(itertools.cycle(SHIPPED), PAIRS)]
    with httpx.Client(base_url=fleet.url, timeout=60) as client:
        before = _batch_pairs_by_replica(client)
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda item: _nli(client, *item), work))
        assert client.post("/nli/batch", json={"pairs": batch}).status_code == 200
        after = _batch_pairs_by_replica(client)
        text = client.get("/metrics").text
    assert [a.status_code for a in answers] == [200] * len(work)
    replicas = {name.rsplit("#", 1)[1] for name in fleet.engine_replicas()}
    assert set(after) == replicas and len(replicas) == 2
    served = {r: after[r] - before.get(r, 0.0) for r in after}
    print(f"pairs per engine replica in its own batches: {served}")
    assert sum(served.values()) == len(work) + len(batch)
    assert 'loraswap_fleet_metrics_replicas{outcome="answered"} 2.0' in text
    assert 'loraswap_http_requests_total{method="POST",route="/nli",status="200"}' in text


def _ask_every_replica(fleet, adapter: str, pair: tuple[str, str]) -> dict:
    """Each live engine replica's answer for `adapter`, given the version stamps the ingress holds now
    (what any request through the ingress carries). Replicas are reached through the deployment handle,
    spread by distinct model ids (Ray sends a new model id to the replica holding fewest)."""
    from ray import serve

    from app.serving.ray_app import INGRESS_DEPLOYMENT
    from app.services.nli import PairInput

    ingress = serve.get_deployment_handle(INGRESS_DEPLOYMENT, app_name=fleet.app_name)
    stamps = ingress.options(method_name="adapter_versions").remote().result(timeout_s=60)
    engine = serve.get_deployment_handle(fleet.engine_deployment, app_name=fleet.app_name)
    wanted = set(fleet.engine_replicas())
    seen: dict = {}
    for i in range(80):
        if wanted <= seen.keys():
            break
        reply = engine.options(method_name="classify", multiplexed_model_id=f"cover-{i}").remote(
            [PairInput(pair[0], pair[1], adapter)], "", stamps
        ).result(timeout_s=60)
        seen[reply.replica] = reply
    assert wanted <= seen.keys(), f"replicas never reached: {wanted - seen.keys()}"
    return seen


def test_put_and_delete_under_traffic_reach_every_replica_by_version(fleet, oracle):
    pair = PAIRS[0]
    put2_returned = threading.Event()
    deleting = threading.Event()
    deleted = threading.Event()
    stop = threading.Event()
    log: list[tuple[str, int, dict | None]] = []  # (phase when sent, status, scores)

    with httpx.Client(base_url=fleet.url, timeout=60) as admin:
        first = admin.put("/adapters/swap", json={"path": str(fleet.extra_root / "mnli-copy")}, headers=AUTH)
        assert first.status_code == 200, first.text

        def traffic() -> None:
            with httpx.Client(base_url=fleet.url, timeout=60) as client:
                while not stop.is_set():
                    phase = (
                        "deleted" if deleted.is_set()
                        else "v2-or-gone" if deleting.is_set()
                        else "v2" if put2_returned.is_set()
                        else "v1-or-v2"
                    )
                    answer = _nli(client, "swap", pair)
                    if phase == "v2" and deleting.is_set():
                        # Sent before the DELETE began and answered after it: either answer is right.
                        phase = "v2-or-gone"
                    log.append((phase, answer.status_code, answer.json().get("scores")))

        workers = [threading.Thread(target=traffic) for _ in range(4)]
        for w in workers:
            w.start()
        try:
            second = admin.put("/adapters/swap", json={"path": str(fleet.extra_root / "snli-copy")}, headers=AUTH)
            assert second.status_code == 200, second.text
            put2_returned.set()
            served_v2 = _wait_for_phase(log, "v2", 12)
            on_each = _ask_every_replica(fleet, "swap", pair)
            deleting.set()
            gone = admin.delete("/adapters/swap", headers=AUTH)
            assert gone.status_code == 200, gone.text
            deleted.set()
            _wait_for_phase(log, "deleted", 12)
            after_delete = _ask_every_replica(fleet, "swap", pair)
        finally:
            stop.set()
            for w in workers:
                w.join(timeout=120)
        assert not any(w.is_alive() for w in workers)
        listing = admin.get("/adapters").json()["adapters"]

    v1, v2 = oracle[("mnli", *pair)], oracle[("snli", *pair)]
    assert served_v2
    for phase, status, scores in log:
        if phase == "v1-or-v2":
            assert status == 200 and (close_to(scores, v1) or close_to(scores, v2))
        elif phase == "v2":
            assert status == 200 and close_to(scores, v2), (phase, status, scores)
        elif phase == "v2-or-gone":
            assert (status == 200 and close_to(scores, v2)) or status == 404
        else:
            assert status == 404
    assert "swap" not in {a["name"] for a in listing}
    for reply in on_each.values():
        assert reply.error is None and close_to(reply.results[0].scores, v2)
    for reply in after_delete.values():
        assert reply.error is not None and reply.error.code == "adapter_not_found"


def _wait_for_phase(log: list, phase: str, count: int) -> bool:
    """Until `count` answers to requests sent in `phase` are logged (bounded by the traffic itself)."""
    import time

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if sum(1 for p, _, _ in list(log) if p == phase) >= count:
            return True
        time.sleep(0.05)
    return False


def test_engine_replica_killed_mid_traffic_retries_or_503s_and_comes_back(fleet, oracle):
    import ray

    fleet.wait_ready()
    victim = fleet.engine_replicas()[0]
    stop = threading.Event()
    killed = threading.Event()
    log: list = []

    def traffic(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=fleet.url, timeout=90) as client:
            while not stop.is_set():
                adapter, pair = rng.choice(SHIPPED), rng.choice(PAIRS)
                answer = _nli(client, adapter, pair)  # a hang would raise httpx.TimeoutException here
                log.append((adapter, pair, answer))

    workers = [threading.Thread(target=traffic, args=(i,)) for i in range(6)]
    for w in workers:
        w.start()
    try:
        assert _wait_for_count(log, 12)
        ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
        killed.set()
        before = len(log)
        assert _wait_for_count(log, before + 30)
        _wait_for_replacement(fleet, victim)
        back = len(log)
        assert _wait_for_count(log, back + 12)
        on_each = _ask_every_replica(fleet, "mnli", PAIRS[1])  # the new replica answers too
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=120)
    assert not any(w.is_alive() for w in workers)
    print(f"replica killed: answers by status {Counter(a.status_code for _, _, a in log)}")
    assert victim not in on_each and len(on_each) == 2
    for reply in on_each.values():
        assert reply.error is None and close_to(reply.results[0].scores, oracle[("mnli", *PAIRS[1])])
    for adapter, pair, answer in log:
        if answer.status_code == 200:
            body = answer.json()
            assert body["adapter"] == adapter and close_to(body["scores"], oracle[(adapter, *pair)])
        else:
            assert answer.status_code == 503 and int(answer.headers["retry-after"]) > 0, answer.text


def _wait_for_replacement(fleet, victim: str) -> None:
    """Until Ray has replaced `victim`: two engine replicas, both RUNNING, none of them the victim."""
    import time

    from ray import serve

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        states = serve.status().applications[fleet.app_name].deployments[fleet.engine_deployment].replica_states
        names = fleet.engine_replicas()
        if victim not in names and len(names) == 2 and states == {"RUNNING": 2}:
            fleet.wait_ready()
            return
        time.sleep(0.2)
    raise AssertionError(f"the killed replica was not replaced: {states} {names}")


def _wait_for_count(log: list, count: int) -> bool:
    import time

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if len(log) >= count:
            return True
        time.sleep(0.05)
    return False


def test_the_affinity_router_answers_as_the_single_server_and_spreads_a_hot_adapter(fleet, affinity_fleet, oracle):
    """routing="affinity": Ray calls app.serving.adapter_router.AdapterAffinityRouter for every request."""
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    engine = details["applications"]["loraswap-affinity"]["deployments"][fleet.engine_deployment]
    assert engine["deployment_config"]["request_router_config"]["request_router_class"].endswith(
        "AdapterAffinityRouter"
    )
    rng = random.Random(17)
    work = [(rng.choice(SHIPPED), rng.choice(PAIRS)) for _ in range(60)]
    hot = [("mnli", PAIRS[i % len(PAIRS)]) for i in range(48)]
    with httpx.Client(base_url=affinity_fleet, timeout=60) as client, ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda item: _nli(client, *item), work + hot))
        batch = [{"premise": p, "hypothesis": h, "adapter": a} for a, (p, h) in zip(itertools.cycle(SHIPPED), PAIRS)]
        batch_answer = client.post("/nli/batch", json={"pairs": batch})
    assert [a.status_code for a in answers] == [200] * len(answers)
    for (adapter, (premise, hypothesis)), answer in zip(work + hot, answers):
        body = answer.json()
        assert body["adapter"] == adapter and close_to(body["scores"], oracle[(adapter, premise, hypothesis)])
    assert batch_answer.status_code == 200
    for row, result in zip(batch, batch_answer.json()["results"]):
        assert close_to(result["scores"], oracle[(row["adapter"], row["premise"], row["hypothesis"])])
    held = [a.headers["x-loraswap-adapter-held"] == "1" for a in answers]
    hot_replicas = Counter(a.headers["x-loraswap-replica"] for a in answers[len(work):])
    print(f"affinity router: affinity share {sum(held) / len(held):.3f}; hot adapter over replicas {dict(hot_replicas)}")
    assert all(a.headers["x-loraswap-model-id"] for a in answers)  # every request routed by its adapter
