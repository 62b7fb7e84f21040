"""Closed-loop HTTP load: N keep-alive workers, each sending its next request when answered.

The client runs on the same cores as the servers it measures, so it is kept light: plain HTTP/1.1
over asyncio streams, one connection per worker (`HttpPool`): 0.2-0.6 ms of CPU per request where
httpx's AsyncClient spent 3-5 ms (the serving benchmark's client CPU, docs/benchmarks.md), CPU every
server would otherwise lose to the measurement itself.
"""

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


def check_response(status: int, body: bytes, request: PlannedRequest) -> str | None:
    """None when the answer is a well-formed classification for the adapter asked; else the error kind."""
    if status != 200:
        return f"http_{status}"
    try:
        answer = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "bad_json"
    scores = answer.get("scores") if isinstance(answer, dict) else None
    if not isinstance(scores, dict) or answer.get("label") not in scores or answer.get("adapter") != request.adapter:
        return "bad_body"
    return None


class HttpError(Exception):
    """The server broke the HTTP exchange (closed mid-answer, sent something that is not HTTP/1.1)."""


class _Connection:
    """One keep-alive HTTP/1.1 connection: a request is written whole, the answer read by its
    Content-Length (or chunks). Any failure closes it; the next request opens a new one."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def exchange(self, message: bytes) -> tuple[int, bytes]:
        if self.reader is not None and self.reader.at_eof():
            self.close()  # the server closed it while idle (its keep-alive timeout, between rounds)
        reused = self.writer is not None
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None and self.writer is not None
        self.writer.write(message)
        status_line = await self.reader.readline()
        if not status_line and reused:
            # Closed by the server as the request went out, before a byte of an answer: resent once on
            # a new connection, as HTTP clients do for an idle keep-alive connection.
            self.close()
            return await self.exchange(message)
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
            raise HttpError(f"not an HTTP/1.1 status line: {status_line[:80]!r}")
        length, chunked, close = None, False, False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
            elif name == b"connection":
                close = b"close" in value.lower()
        if chunked:
            body = await self._chunks()
        elif length is not None:
            body = await self.reader.readexactly(length)
        else:  # no length: the body runs to the end of the connection
            body, close = await self.reader.read(), True
        if close:
            self.close()
        return int(parts[1]), body

    async def _chunks(self) -> bytes:
        assert self.reader is not None
        pieces = []
        while True:
            size = int((await self.reader.readline()).split(b";")[0], 16)
            if size == 0:
                while (await self.reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                return b"".join(pieces)
            pieces.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


class HttpPool:
    """Keep-alive connections to one server, at most `concurrency` (one per closed-loop worker); a
    request takes an idle one or opens a new one. `post` returns (status, body)."""

    def __init__(self, base_url: str, concurrency: int, timeout_s: float = 120.0):
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"{base_url}: the load generator speaks plain http://host:port")
        self.host, self.port = parts.hostname, parts.port or 80
        self.concurrency, self.timeout_s = concurrency, timeout_s
        self._idle: list[_Connection] = []
        self._open: list[_Connection] = []

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        connection = self._idle.pop() if self._idle else self._new()
        message = (
            f"POST {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\n\r\n"
        ).encode("ascii") + body
        try:
            answer = await asyncio.wait_for(connection.exchange(message), self.timeout_s)
        except BaseException:
            connection.close()
            raise
        finally:
            self._idle.append(connection)
        return answer

    def _new(self) -> _Connection:
        if len(self._open) >= self.concurrency:
            raise RuntimeError(f"more than {self.concurrency} requests at once on a pool of that size")
        connection = _Connection(self.host, self.port)
        self._open.append(connection)
        return connection

    async def aclose(self) -> None:
        for connection in self._open:
            connection.close()
        self._open.clear()
        self._idle.clear()


def make_client(base_url: str, concurrency: int, timeout_s: float = 120.0) -> HttpPool:
    """One connection per worker, all kept alive; no connection is opened or closed mid-run."""
    return HttpPool(base_url, concurrency, timeout_s)


async def run_closed_loop(
    client: HttpPool,
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
                status, body = await client.post(path, request.body)
                error = check_response(status, body, request)
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, HttpError, ValueError) as exc:
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


async def warm_up(client: HttpPool, plan: list[PlannedRequest], *, concurrency: int) -> LoadResult:
    """Untimed traffic first: lazy initialisation, thread pools and allocator growth happen here."""
    return await run_closed_loop(client, plan, concurrency=concurrency, max_duration_s=300.0)


class OneAtATime:
    """Concurrency 1 against one server: each request sent when the previous one is answered, over
    one keep-alive connection of the standard library's http.client (light enough that the client's
    own time stays a small part of a single request's round trip). Blocking: drive it from a thread.
    `send` may be interleaved with other systems' requests, so that every system meets the same
    moments of a shared machine."""

    def __init__(self, base_url: str, *, path: str = "/nli"):
        parts = urlsplit(base_url)
        self.connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
        self.path = path
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.busy_s = 0.0

    def send(self, request: PlannedRequest) -> None:
        sent = time.perf_counter()
        try:
            self.connection.request("POST", self.path, body=request.body, headers=JSON_HEADERS)
            response = self.connection.getresponse()
            error = check_response(response.status, response.read(), request)
        except (OSError, http.client.HTTPException) as exc:
            error = type(exc).__name__
            self.connection.close()  # reconnects on the next request
        elapsed = time.perf_counter() - sent
        self.busy_s += elapsed
        if error is None:
            self.latencies.append(elapsed * 1000.0)
        else:
            self.errors[error] += 1

    def result(self) -> LoadResult:
        self.connection.close()
        return LoadResult(
            requests=len(self.latencies) + sum(self.errors.values()),
            ok=len(self.latencies),
            errors=sum(self.errors.values()),
            errors_by_kind=dict(self.errors),
            duration_s=self.busy_s,
            latencies_ms=self.latencies,
        )
