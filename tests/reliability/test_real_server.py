"""A real uvicorn server (`python -m app.cli`, one worker, 127.0.0.1 only) under overload, then under
adapter churn: it stays up, refuses the excess quickly with 503 and Retry-After, answers every admitted
request correctly and within the queue's configured wait plus one batch, and a load, replace or unload
never fails or mis-routes a request."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest

from tests.reliability.conftest import LABELS, copy_adapters, scores_close, serve, server_settings
from tests.reliability.traffic import (
    ADAPTERS,
    PAIRS_PER_REQUEST,
    TEXTS,
    batch_body,
    check_batch,
    closed_loop,
    open_loop,
    percentile,
    warm_up_and_reference,
)

pytestmark = pytest.mark.slow

MAX_QUEUE_WAIT_MS = 1000
MAX_BATCH_PAIRS = 16
CAPACITY_S = 5.0
OVERLOAD_S = 12.0
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
    return warm_up_and_reference(server.base_url, MAX_BATCH_PAIRS)


def test_overload_is_refused_fast_and_what_is_admitted_is_answered_in_time(server, references, figures):
    make = lambda i: ("POST", "/nli/batch", batch_body(i))  # noqa: E731
    with httpx.Client(base_url=server.base_url, timeout=60) as http:
        full_batch = []
        for index in range(3):
            started = time.perf_counter()
            assert http.post("/nli/batch", json=batch_body(index, MAX_BATCH_PAIRS)).status_code == 200
            full_batch.append(time.perf_counter() - started)
    batch_s = max(full_batch)

    measured = asyncio.run(closed_loop(server.base_url, make, clients=8, duration_s=CAPACITY_S))
    served = [o for o in measured if o.status == 200]
    capacity_rps = len(served) / CAPACITY_S
    figures("capacity_phase_refused", sum(1 for o in measured if o.status != 200))
    assert capacity_rps > 0, measured[:3]

    outcomes, offered_rps = asyncio.run(
        open_loop(server.base_url, make, rate_per_s=2 * capacity_rps, duration_s=OVERLOAD_S)
    )
    accepted = [o for o in outcomes if o.status == 200]
    rejected = [o for o in outcomes if o.status in (429, 503)]
    unanswered = [o for o in outcomes if o.status is None]
    other = [o for o in outcomes if o.status not in (None, 200, 429, 503)]
    wrong = [(o.index, problem) for o in accepted if (problem := check_batch(batch_body(o.index), o.body, references))]
    bound_s = MAX_QUEUE_WAIT_MS / 1000 + 2 * batch_s + 1.0
    accepted_p99 = percentile([o.latency_s for o in accepted], 99)
    rejected_p99 = percentile([o.latency_s for o in rejected], 99)

    figures("max_queue_wait_ms", MAX_QUEUE_WAIT_MS)
    figures("max_batch_pairs", MAX_BATCH_PAIRS)
    figures("pairs_per_request", PAIRS_PER_REQUEST)
    figures("full_batch_s", round(batch_s, 3))
    figures("capacity_requests_per_s", round(capacity_rps, 1))
    figures("capacity_pairs_per_s", round(capacity_rps * PAIRS_PER_REQUEST, 1))
    figures("capacity_measured_for_s", CAPACITY_S)
    figures("offered_requests_per_s", round(offered_rps, 1))
    figures("overload_for_s", OVERLOAD_S)
    figures("overload_requests", len(outcomes))
    figures("accepted", len(accepted))
    figures("rejected", len(rejected))
    figures("unanswered", len(unanswered))
    figures("wrong_answers", len(wrong))
    figures("accepted_p50_s", round(percentile([o.latency_s for o in accepted], 50), 3))
    figures("accepted_p99_s", round(accepted_p99, 3))
    figures("accepted_max_s", round(max((o.latency_s for o in accepted), default=0), 3))
    figures("latency_bound_s", round(bound_s, 3))
    figures("rejected_p50_s", round(percentile([o.latency_s for o in rejected], 50), 4))
    figures("rejected_p99_s", round(rejected_p99, 4))
    figures("goodput_pairs_per_s", round(len(accepted) * PAIRS_PER_REQUEST / OVERLOAD_S, 1))

    assert unanswered == [], unanswered[:3]
    assert other == [], [(o.status, o.body) for o in other[:3]]
    assert wrong == [], wrong[:3]
    assert offered_rps > 1.5 * capacity_rps, "the load generator could not offer twice the capacity"
    assert rejected, "twice the capacity was offered and nothing was refused"
    for outcome in rejected:
        assert outcome.retry_after and int(outcome.retry_after) >= 1
        assert outcome.body["error"]["code"] == "overloaded"
    assert rejected_p99 < 1.0, "refusals must be quick"
    assert accepted_p99 < bound_s, f"p99 {accepted_p99:.2f} s over the bound {bound_s:.2f} s"
    assert len(accepted) * PAIRS_PER_REQUEST / OVERLOAD_S > 0.5 * capacity_rps * PAIRS_PER_REQUEST, "goodput collapsed"
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
