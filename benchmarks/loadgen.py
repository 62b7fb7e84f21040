"""Closed-loop HTTP load: N keep-alive workers, each sending its next request when answered."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import math
import time
from urllib.parse import urlsplit
from collections import Counter
from dataclasses import dataclass, field

import httpx

from benchmarks.workload import PlannedRequest

logger = logging.getLogger(__name__)

JSON_HEADERS = {"content-type": "application/json"}


@dataclass
class LoadResult:
    """What one measured phase gave. Latencies are client-side round trips of successful requests."""

    requests: int  # sent and finished (answered or failed)
    ok: int
    errors: int
    errors_by_kind: dict[str, int]
    duration_s: float  # first send to last answer
    latencies_ms: list[float] = field(repr=False)

    @property
    def throughput_pairs_s(self) -> float:
        # One pair per request: pairs/s is successful requests per second.
        return self.ok / self.duration_s if self.duration_s > 0 else 0.0

    @classmethod
    def combined(cls, results: list[LoadResult]) -> LoadResult:
        """Several measured phases of one system as one: counts and times add up, latencies pool."""
        errors: Counter[str] = Counter()
        for result in results:
            errors.update(result.errors_by_kind)
        return cls(
            requests=sum(r.requests for r in results),
            ok=sum(r.ok for r in results),
            errors=sum(r.errors for r in results),
            errors_by_kind=dict(errors),
            duration_s=sum(r.duration_s for r in results),
            latencies_ms=[latency for r in results for latency in r.latencies_ms],
        )

    def percentile_ms(self, q: float) -> float | None:
        return percentile(self.latencies_ms, q)

    def summary(self) -> dict:
        mean = sum(self.latencies_ms) / len(self.latencies_ms) if self.latencies_ms else None
        return {
            "throughput_pairs_s": round(self.throughput_pairs_s, 2),
            "p50_ms": _round(self.percentile_ms(50)),
            "p95_ms": _round(self.percentile_ms(95)),
            "p99_ms": _round(self.percentile_ms(99)),
            "mean_ms": _round(mean),
            "errors": self.errors,
            "errors_by_kind": self.errors_by_kind,
            "requests": self.requests,
            "ok": self.ok,
            "duration_s": round(self.duration_s, 3),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def check_response(response: httpx.Response, request: PlannedRequest) -> str | None:
    """None when the answer is a well-formed classification for the adapter asked; else the error kind."""
    if response.status_code != 200:
        return f"http_{response.status_code}"
    try:
        body = response.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "bad_json"
    scores = body.get("scores") if isinstance(body, dict) else None
    if not isinstance(scores, dict) or body.get("label") not in scores or body.get("adapter") != request.adapter:
        return "bad_body"
    return None


def make_client(base_url: str, concurrency: int, timeout_s: float = 120.0) -> httpx.AsyncClient:
    """One connection per worker, all kept alive; no connection is opened or closed mid-run."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency, keepalive_expiry=300)
    return httpx.AsyncClient(base_url=base_url, limits=limits, timeout=timeout_s)


async def run_closed_loop(
    client: httpx.AsyncClient,
    plan: list[PlannedRequest],
    *,
    concurrency: int,
    max_duration_s: float,
    path: str = "/nli",
) -> LoadResult:
    """Send `plan` in order with `concurrency` workers until it is exhausted or `max_duration_s` has
    passed (requests in flight at the deadline are still awaited and counted)."""
    next_index = 0
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    finished = 0
    last_answer = 0.0
    started = time.perf_counter()
    deadline = started + max_duration_s

    async def worker() -> None:
        nonlocal next_index, finished, last_answer
        while next_index < len(plan) and time.perf_counter() < deadline:
            request = plan[next_index]
            next_index += 1  # single-threaded event loop: no lock needed between the read and the bump
            sent = time.perf_counter()
            try:
                response = await client.post(path, content=request.body, headers=JSON_HEADERS)
                error = check_response(response, request)
            except httpx.HTTPError as exc:
                error = type(exc).__name__
            answered = time.perf_counter()
            finished += 1
            last_answer = max(last_answer, answered)
            if error is None:
                latencies.append((answered - sent) * 1000.0)
            else:
                errors[error] += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    duration = (last_answer or time.perf_counter()) - started
    if errors:
        logger.warning("%d errors: %s", sum(errors.values()), dict(errors))
    return LoadResult(
        requests=finished,
        ok=len(latencies),
        errors=sum(errors.values()),
        errors_by_kind=dict(errors),
        duration_s=duration,
        latencies_ms=latencies,
    )


async def warm_up(client: httpx.AsyncClient, plan: list[PlannedRequest], *, concurrency: int) -> LoadResult:
    """Untimed traffic first: lazy initialisation, thread pools and allocator growth happen here."""
    return await run_closed_loop(client, plan, concurrency=concurrency, max_duration_s=300.0)


def run_one_at_a_time(base_url: str, plan: list[PlannedRequest], *, path: str = "/nli") -> LoadResult:
    """Concurrency 1: each request sent when the previous one is answered, over one keep-alive
    connection of the standard library's http.client (light enough that the client's own time stays
    a small part of a single request's round trip). Blocking: run it in a thread from async code."""
    parts = urlsplit(base_url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    started = time.perf_counter()
    try:
        for request in plan:
            sent = time.perf_counter()
            try:
                connection.request("POST", path, body=request.body, headers=JSON_HEADERS)
                response = connection.getresponse()
                error = _check_raw(response.status, response.read(), request)
            except (OSError, http.client.HTTPException) as exc:
                error = type(exc).__name__
                connection.close()  # reconnects on the next request
            if error is None:
                latencies.append((time.perf_counter() - sent) * 1000.0)
            else:
                errors[error] += 1
    finally:
        connection.close()
    return LoadResult(
        requests=len(plan),
        ok=len(latencies),
        errors=sum(errors.values()),
        errors_by_kind=dict(errors),
        duration_s=time.perf_counter() - started,
        latencies_ms=latencies,
    )


def _check_raw(status: int, body: bytes, request: PlannedRequest) -> str | None:
    return check_response(httpx.Response(status, content=body), request)
