"""A real uvicorn server (`python -m app.cli`, one worker, 127.0.0.1 only) under overload, then under
adapter churn: it stays up, refuses the excess with 503 and Retry-After, answers every admitted request
correctly, and a load, replace or unload never fails or mis-routes a request.

Behaviour only: how fast it refuses, the admitted latency against its bound and the goodput are
measured by `python -m benchmarks.overload` (the same run, `benchmarks.overload.run_overload`), which
reports them; this test records them as figures but asserts none."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

from benchmarks.overload import run_overload
from benchmarks.traffic import TEXTS, warm_up_and_reference
from tests.reliability.conftest import LABELS, copy_adapters, scores_close, serve, server_settings

pytestmark = pytest.mark.slow

ADAPTERS = ("alpha", "beta", "gamma")
MAX_QUEUE_WAIT_MS = 1000
MAX_BATCH_PAIRS = 16
CAPACITY_S = 3.0
OVERLOAD_S = 8.0  # at twice the capacity the queue passes its 1 s wait bound after about a second
CHURN_S = 10.0


@pytest.fixture(scope="module")
def root(embedded_adapters, tmp_path_factory):
    root = copy_adapters(embedded_adapters, tmp_path_factory.mktemp("served"))
    copy_adapters(embedded_adapters, root / "spare")  # load sources, not discovered at startup
    return root


@pytest.fixture(scope="module")
def server(root, tmp_path_factory):
    settings = server_settings(
        root,
        max_queue_wait_ms=MAX_QUEUE_WAIT_MS,
        max_batch_pairs=MAX_BATCH_PAIRS,
        max_pairs_per_request=MAX_BATCH_PAIRS,
        max_resident_adapters=2,  # three adapters in traffic: residency churns too
    )
    yield from serve(tmp_path_factory.mktemp("server"), **settings)


@pytest.fixture(scope="module")
def references(server) -> dict[tuple[str, str], dict[str, float]]:
    return warm_up_and_reference(server.base_url, ADAPTERS, MAX_BATCH_PAIRS)


def test_overload_is_refused_with_503_and_retry_after_and_every_admitted_request_is_answered(
    server, references, figures
):
    """Twice the measured capacity, in an open loop: every request gets an HTTP answer; each one is
    either a correct answer (pair by pair against each adapter's reference scores) or a 503 `overloaded`
    with a Retry-After of at least a second."""
    run = run_overload(
        server.base_url,
        ADAPTERS,
        references,
        max_queue_wait_ms=MAX_QUEUE_WAIT_MS,
        max_batch_pairs=MAX_BATCH_PAIRS,
        capacity_s=CAPACITY_S,
        overload_s=OVERLOAD_S,
    )
    for key, value in run.figures().items():
        figures(key, value)

    assert run.unanswered == [], [(o.index, o.error) for o in run.unanswered[:3]]
    assert run.wrong == [], run.wrong[:3]
    assert run.accepted, "nothing was admitted under overload"
    assert run.refused, "twice the capacity was offered and nothing was refused: the test proved nothing"
    for outcome in run.refused:
        assert outcome.status == 503, (outcome.status, outcome.body)
        assert outcome.body["error"]["code"] == "overloaded"
        assert outcome.retry_after is not None and int(outcome.retry_after) >= 1
    assert httpx.get(server.base_url + "/healthz").status_code == 200
    assert server.process.poll() is None


def test_hot_swap_under_traffic_loses_and_misroutes_nothing(server, root, references, figures):
    """Clients send to alpha, beta and `swap` (mixed batches too) while `swap` is replaced between the
    alpha and beta sources and `temp` is loaded, used and unloaded, over and over. Every answer is
    checked against the adapter version it came from: alpha has three labels, beta two."""
    spare = root / "spare"
    versions = {frozenset(LABELS["alpha"]): "alpha", frozenset(LABELS["beta"]): "beta"}
    failures: list[str] = []
    counts = {"requests": 0, "swaps": 0, "temp_cycles": 0}

    async def run() -> None:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as http:
            assert (await http.put("/adapters/swap", json={"path": str(spare / "alpha")})).status_code == 200
            deadline = time.perf_counter() + CHURN_S
            rng = random.Random(0)

            async def traffic(worker: int) -> None:
                while time.perf_counter() < deadline:
                    premise, hypothesis = TEXTS[rng.randrange(len(TEXTS))]
                    names = [rng.choice(["alpha", "beta", "swap"]) for _ in range(1 + worker % 3)]
                    body = {"pairs": [{"premise": premise, "hypothesis": hypothesis, "adapter": n} for n in names]}
                    response = await http.post("/nli/batch", json=body)
                    counts["requests"] += 1
                    if response.status_code != 200:
                        failures.append(f"{names}: {response.status_code} {response.text[:200]}")
                        continue
                    for name, result in zip(names, response.json()["results"]):
                        source = versions.get(frozenset(result["scores"])) if name == "swap" else name
                        if result["adapter"] != name or source is None:
                            failures.append(f"{name}: mis-routed {result}")
                        elif not scores_close(result["scores"], references[(premise, source)]):
                            failures.append(f"{name}: scores of neither version {result['scores']}")

            async def churn() -> None:
                i = 0
                while time.perf_counter() < deadline:
                    source = spare / ("beta" if i % 2 == 0 else "alpha")
                    steps = [
                        ("PUT", "/adapters/swap", {"path": str(source)}),
                        ("PUT", "/adapters/temp", {"path": str(spare / "gamma")}),
                    ]
                    for method, path, body in steps:
                        response = await http.request(method, path, json=body)
                        if response.status_code != 200:
                            failures.append(f"{method} {path}: {response.status_code} {response.text[:200]}")
                    premise, hypothesis = TEXTS[0]
                    used = await http.post("/nli", json={"premise": premise, "hypothesis": hypothesis, "adapter": "temp"})
                    expected = references[(premise, "gamma")]
                    if used.status_code != 200 or not scores_close(used.json()["scores"], expected):
                        failures.append(f"temp: {used.status_code} {used.text[:200]}")
                    if (await http.delete("/adapters/temp")).status_code != 200:
                        failures.append("DELETE /adapters/temp failed")
                    gone = await http.post("/nli", json={"premise": "p", "hypothesis": "h", "adapter": "temp"})
                    if gone.status_code != 404:
                        failures.append(f"temp after unload: {gone.status_code}")
                    counts["swaps"] += 1
                    counts["temp_cycles"] += 1
                    i += 1

            await asyncio.gather(churn(), *(traffic(w) for w in range(6)))
            assert (await http.delete("/adapters/swap")).status_code == 200

    asyncio.run(run())
    figures("churn_for_s", CHURN_S)
    figures("churn_requests", counts["requests"])
    figures("churn_swaps", counts["swaps"])
    figures("churn_load_use_unload_cycles", counts["temp_cycles"])
    figures("churn_failures", len(failures))
    assert failures == [], failures[:5]
    assert counts["swaps"] >= 3 and counts["requests"] > 50
    listing = httpx.get(server.base_url + "/adapters").json()["adapters"]
    assert {a["name"] for a in listing} == set(ADAPTERS)
    assert server.process.poll() is None
