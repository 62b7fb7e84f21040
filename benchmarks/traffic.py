"""Async HTTP traffic against a running server: a closed loop (N clients back to back, to measure
capacity), an open loop (requests sent on a fixed schedule whatever the answers, to overload), the
mixed-adapter NLI batches they send, and the check that each answer is its adapter's.

Shared by `benchmarks.overload` (which reports the figures) and the real-server tests of
`tests/reliability/` (which assert behaviour only)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx

from benchmarks.loadgen import percentile

__all__ = [
    "PAIRS_PER_REQUEST",
    "TEXTS",
    "Outcome",
    "batch_body",
    "check_batch",
    "closed_loop",
    "open_loop",
    "percentile",
    "scores_close",
    "warm_up_and_reference",
]

TEXTS = [
    ("A man is playing a guitar on stage.", "A person is making music."),
    ("Two dogs run through a snowy field.", "The animals are asleep indoors."),
    ("The committee postponed the vote until next week.", "A vote was held yesterday."),
    ("A child in a red coat is reading a book on a bench.", "Someone is outside."),
]
PAIRS_PER_REQUEST = 8

# (method, path, JSON body) of the i-th request.
RequestMaker = Callable[[int], tuple[str, str, dict | None]]
# (premise, adapter) -> that pair's scores asked alone.
References = dict[tuple[str, str], dict[str, float]]


@dataclass
class Outcome:
    index: int
    sent_at: float  # seconds since the run started
    latency_s: float
    status: int | None  # None: no HTTP answer at all
    error: str | None = None
    retry_after: str | None = None
    body: object = None


def client(base_url: str, timeout_s: float = 60.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=base_url,
        timeout=timeout_s,
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256),
    )


async def send(http: httpx.AsyncClient, index: int, make: RequestMaker, started: float) -> Outcome:
    method, path, body = make(index)
    sent = time.perf_counter()
    try:
        response = await http.request(method, path, json=body)
    except httpx.HTTPError as exc:
        return Outcome(index, sent - started, time.perf_counter() - sent, None, error=f"{type(exc).__name__}: {exc}")
    latency = time.perf_counter() - sent
    try:
        parsed = response.json()
    except ValueError:
        parsed = None
    retry_after = response.headers.get("retry-after")
    return Outcome(index, sent - started, latency, response.status_code, None, retry_after, parsed)


async def closed_loop(base_url: str, make: RequestMaker, *, clients: int, duration_s: float) -> list[Outcome]:
    """`clients` workers, each sending its next request as soon as the last one is answered."""
    outcomes: list[Outcome] = []
    counter = iter(range(10**9))
    async with client(base_url) as http:
        started = time.perf_counter()
        deadline = started + duration_s

        async def worker() -> None:
            while time.perf_counter() < deadline:
                outcomes.append(await send(http, next(counter), make, started))

        await asyncio.gather(*(worker() for _ in range(clients)))
    return outcomes


async def open_loop(
    base_url: str, make: RequestMaker, *, rate_per_s: float, duration_s: float
) -> tuple[list[Outcome], float]:
    """Requests at `rate_per_s` for `duration_s`, each on schedule whether or not earlier ones were
    answered. Returns the outcomes and the rate actually offered (the generator can fall behind)."""
    total = int(rate_per_s * duration_s)
    tasks: list[asyncio.Task] = []
    async with client(base_url) as http:
        started = time.perf_counter()
        for index in range(total):
            delay = started + index / rate_per_s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)  # the schedule of an open loop, not synchronisation
            tasks.append(asyncio.ensure_future(send(http, index, make, started)))
        offered_for = time.perf_counter() - started
        outcomes = list(await asyncio.gather(*tasks))
    return outcomes, total / max(offered_for, 1e-9)


def batch_body(index: int, adapters: Sequence[str], size: int = PAIRS_PER_REQUEST) -> dict:
    """The i-th request's pairs: the texts and the adapters in rotation (every batch mixes them)."""
    pairs = []
    for j in range(size):
        premise, hypothesis = TEXTS[(index + j) % len(TEXTS)]
        adapter = adapters[(index + 2 * j) % len(adapters)]
        pairs.append({"premise": premise, "hypothesis": hypothesis, "adapter": adapter})
    return {"pairs": pairs}


def warm_up_and_reference(base_url: str, adapters: Sequence[str], full_batch: int) -> References:
    """Each (premise, adapter)'s scores, asked alone. The first request is a full batch: the admission
    estimate is seeded by the first (cold) batch, and a cold single pair would make it absurdly low."""
    with httpx.Client(base_url=base_url, timeout=60) as http:
        first = http.post("/nli/batch", json=batch_body(0, adapters, full_batch))
        assert first.status_code == 200, first.text
        result = {}
        for premise, hypothesis in TEXTS:
            for adapter in adapters:
                response = http.post("/nli", json={"premise": premise, "hypothesis": hypothesis, "adapter": adapter})
                assert response.status_code == 200, response.text
                result[(premise, adapter)] = response.json()["scores"]
        for index in range(8):  # a few more batches, so the throughput estimate settles
            assert http.post("/nli/batch", json=batch_body(index, adapters)).status_code == 200
    return result


def scores_close(got: dict[str, float], want: dict[str, float], tolerance: float = 1e-4) -> bool:
    return got.keys() == want.keys() and all(abs(got[k] - want[k]) < tolerance for k in got)


def check_batch(body: dict, answer: object, references: References) -> str | None:
    """None if every result is its adapter's answer for its pair (the reference's label set and
    scores, probabilities summing to 1, the argmax as label), else what is wrong."""
    if not isinstance(answer, dict) or len(answer.get("results", [])) != len(body["pairs"]):
        return f"malformed answer {str(answer)[:200]}"
    for pair, result in zip(body["pairs"], answer["results"]):
        scores = result.get("scores", {})
        want = references[(pair["premise"], pair["adapter"])]
        if result.get("adapter") != pair["adapter"] or set(scores) != set(want):
            return f"mis-routed: asked {pair['adapter']}, got {result.get('adapter')} with {sorted(scores)}"
        if abs(sum(scores.values()) - 1) > 1e-4 or result.get("label") != max(scores, key=scores.get):
            return f"inconsistent result {result}"
        if not scores_close(scores, want):
            return f"wrong scores for {pair['adapter']}: {scores}"
    return None
