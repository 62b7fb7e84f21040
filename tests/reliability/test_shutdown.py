"""Graceful shutdown under load: SIGTERM to a real `python -m app.cli` while requests are queued. Every
request admitted before the signal gets its (correct) answer; new connections are refused from then on;
the process exits cleanly once the queue is drained."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import pytest

from tests.reliability.conftest import ServerProcess, copy_adapters, server_settings
from benchmarks.traffic import batch_body, check_batch, warm_up_and_reference

pytestmark = pytest.mark.slow

ADAPTERS = ("alpha", "beta", "gamma")
FULL_BATCH = 16
IN_FLIGHT_REQUESTS = 24  # of FULL_BATCH pairs each: a few seconds of queued work on this machine


async def _refused(port: int, deadline_s: float) -> float | None:
    """Seconds until a new TCP connection to the port is refused, or None if it never was."""
    started = time.perf_counter()
    while time.perf_counter() - started < deadline_s:
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return time.perf_counter() - started
        writer.close()
        await asyncio.sleep(0.02)  # polling the listener's state, not synchronising requests
    return None


def test_sigterm_drains_admitted_requests_and_refuses_new_connections(embedded_adapters, tmp_path, figures):
    root = copy_adapters(embedded_adapters, tmp_path / "adapters")
    settings = server_settings(
        root, max_queue_wait_ms=60_000, max_batch_pairs=FULL_BATCH, max_pairs_per_request=FULL_BATCH
    )
    server = ServerProcess(tmp_path / "server.log", log_level="info", **settings).start()
    try:
        references = warm_up_and_reference(server.base_url, ADAPTERS, FULL_BATCH)

        async def scenario():
            async with httpx.AsyncClient(
                base_url=server.base_url, timeout=120, limits=httpx.Limits(max_connections=None)
            ) as http:
                bodies = [batch_body(i, ADAPTERS, FULL_BATCH) for i in range(IN_FLIGHT_REQUESTS)]
                tasks = [asyncio.ensure_future(http.post("/nli/batch", json=body)) for body in bodies]
                done_at: dict[int, float] = {}
                for i, task in enumerate(tasks):
                    task.add_done_callback(lambda _, i=i: done_at.setdefault(i, time.perf_counter()))
                # All requests were sent at once; the first answer means the server is working through them.
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                signalled = time.perf_counter()
                os.kill(server.process.pid, signal.SIGTERM)
                refused_after = await _refused(server.port, deadline_s=15)
                try:  # a new client: a new connection, not one kept alive from before the signal
                    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as fresh:
                        late = (await fresh.post("/nli/batch", json=bodies[0])).status_code
                except httpx.ConnectError:
                    late = "refused"
                answers = await asyncio.gather(*tasks, return_exceptions=True)
                return bodies, answers, signalled, done_at, refused_after, late

        bodies, answers, signalled, done_at, refused_after, late = asyncio.run(scenario())
        exit_code = server.process.wait(60)
    finally:
        server.stop()

    errors = [a for a in answers if isinstance(a, BaseException)]
    statuses = [a.status_code for a in answers if not isinstance(a, BaseException)]
    wrong = [p for body, a in zip(bodies, answers) if not isinstance(a, BaseException)
             if (p := check_batch(body, a.json(), references))]
    after_signal = sum(1 for t in done_at.values() if t > signalled)
    figures("in_flight_requests", IN_FLIGHT_REQUESTS)
    figures("in_flight_pairs", IN_FLIGHT_REQUESTS * FULL_BATCH)
    figures("answered_after_sigterm", after_signal)
    figures("answered_200", statuses.count(200))
    figures("lost", len(errors) + sum(1 for s in statuses if s != 200))
    figures("new_connection_refused_after_s", None if refused_after is None else round(refused_after, 3))
    figures("drain_s", round(max(done_at.values()) - signalled, 3))
    figures("exit_code", exit_code)

    assert errors == [], errors[:3]
    assert statuses == [200] * IN_FLIGHT_REQUESTS
    assert wrong == [], wrong[:3]
    assert after_signal > 0, "nothing was in flight at SIGTERM: the test proved nothing"
    assert refused_after is not None, "new connections were still accepted 15 s after SIGTERM"
    assert late == "refused"
    # uvicorn finishes its shutdown, then re-raises the signal it caught: the process ends "by SIGTERM".
    assert exit_code in (0, -signal.SIGTERM)
    log = server.log_tail(1_000_000)
    assert "Application shutdown complete" in log and "Traceback" not in log
