"""The serving benchmark's pieces: client counts, /metrics histograms, results.json schema, report."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Response
from fastapi.responses import StreamingResponse

from benchmarks.adapter_sets import AdapterSet
from benchmarks.loadgen import make_client, percentile, run_closed_loop
from benchmarks.report import write_report
from benchmarks.servers import free_port, histogram_delta, scrape_histogram
from benchmarks.serving import assemble_results, parse_args, slices
from benchmarks.workload import build_plan, load_pairs

SYSTEM_KEYS = {"throughput_pairs_s", "p50_ms", "p95_ms", "p99_ms", "errors", "requests"}
METRICS_BEFORE = """# TYPE loraswap_batch_size_pairs histogram
loraswap_batch_size_pairs_bucket{le="1.0"} 2.0
loraswap_batch_size_pairs_bucket{le="2.0"} 2.0
loraswap_batch_size_pairs_bucket{le="4.0"} 3.0
loraswap_batch_size_pairs_bucket{le="+Inf"} 3.0
loraswap_batch_size_pairs_count 3.0
loraswap_batch_size_pairs_sum 5.0
"""
METRICS_AFTER = """# TYPE loraswap_batch_size_pairs histogram
loraswap_batch_size_pairs_bucket{le="1.0"} 3.0
loraswap_batch_size_pairs_bucket{le="2.0"} 4.0
loraswap_batch_size_pairs_bucket{le="4.0"} 7.0
loraswap_batch_size_pairs_bucket{le="+Inf"} 8.0
loraswap_batch_size_pairs_count 8.0
loraswap_batch_size_pairs_sum 30.0
"""


def fake_service(fail_every: int = 0, *, answer: str = "plain") -> FastAPI:
    """Answers POST /nli like the service; every `fail_every`-th request gets 503. `answer`: plain
    (Content-Length), chunked, close (the server closes the connection after each answer), or
    wrong_adapter (a well-formed answer naming another adapter)."""
    app = FastAPI()
    seen = {"n": 0}

    @app.post("/nli")
    async def nli(body: dict) -> Response:
        seen["n"] += 1
        if fail_every and seen["n"] % fail_every == 0:
            return Response(status_code=503)
        adapter = "someone-else" if answer == "wrong_adapter" else body["adapter"]
        payload = json.dumps({"label": "neutral", "scores": {"entailment": 0.2, "neutral": 0.5}, "adapter": adapter})
        if answer == "chunked":
            return StreamingResponse(iter([payload[:10].encode(), payload[10:].encode()]), media_type="application/json")
        headers = {"connection": "close"} if answer == "close" else None
        return Response(payload, media_type="application/json", headers=headers)

    return app


@contextmanager
def served(app: FastAPI, keep_alive_s: float = 5.0) -> Iterator[str]:
    """`app` under a real uvicorn on a loopback port, in a thread: the load generator speaks HTTP/1.1."""
    config = uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning", timeout_keep_alive=keep_alive_s)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        while not server.started:
            assert thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)
        yield f"http://127.0.0.1:{server.config.port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def run_fake(plan, fail_every: int = 0, concurrency: int = 4, answer: str = "plain"):
    async def go(url: str):
        client = make_client(url, concurrency)
        try:
            return await run_closed_loop(client, plan, concurrency=concurrency, max_duration_s=60)
        finally:
            await client.aclose()

    with served(fake_service(fail_every, answer=answer)) as url:
        return asyncio.run(go(url))


def test_closed_loop_sends_the_whole_plan_once():
    plan = build_plan(load_pairs(), ["mnli", "rte"], "zipf", 40, seed=0)
    result = run_fake(plan)
    assert (result.requests, result.ok, result.errors) == (40, 40, 0)
    assert len(result.latencies_ms) == 40 and result.throughput_pairs_s > 0


def test_closed_loop_counts_errors_by_kind():
    plan = build_plan(load_pairs(), ["mnli"], "uniform", 30, seed=0)
    result = run_fake(plan, fail_every=5)
    assert (result.requests, result.ok, result.errors) == (30, 24, 6)
    assert result.errors_by_kind == {"http_503": 6}


@pytest.mark.parametrize("answer", ["chunked", "close"])
def test_closed_loop_reads_chunked_answers_and_reconnects_after_a_close(answer):
    plan = build_plan(load_pairs(), ["mnli", "rte"], "uniform", 24, seed=1)
    result = run_fake(plan, answer=answer)
    assert (result.requests, result.ok, result.errors) == (24, 24, 0)


def test_pool_reopens_a_connection_the_server_closed_while_idle():
    plan = build_plan(load_pairs(), ["mnli"], "uniform", 8, seed=0)

    async def go(url: str):
        client = make_client(url, 2)
        try:
            first = await run_closed_loop(client, plan[:4], concurrency=2, max_duration_s=60)
            await asyncio.sleep(1.5)  # past the server's keep-alive timeout: it closes both connections
            second = await run_closed_loop(client, plan[4:], concurrency=2, max_duration_s=60)
            return first, second
        finally:
            await client.aclose()

    with served(fake_service(), keep_alive_s=0.5) as url:
        first, second = asyncio.run(go(url))
    assert (first.ok, second.ok, second.errors) == (4, 4, 0)


def test_closed_loop_checks_the_answer_names_the_adapter_asked():
    plan = build_plan(load_pairs(), ["mnli"], "uniform", 6, seed=0)
    result = run_fake(plan, answer="wrong_adapter")
    assert (result.ok, result.errors_by_kind) == (0, {"bad_body": 6})


def test_closed_loop_counts_a_dead_server_as_errors_and_finishes():
    plan = build_plan(load_pairs(), ["mnli"], "uniform", 5, seed=0)

    async def go():
        client = make_client(f"http://127.0.0.1:{free_port()}", 2)  # nobody listens there
        try:
            return await run_closed_loop(client, plan, concurrency=2, max_duration_s=60)
        finally:
            await client.aclose()

    result = asyncio.run(go())
    assert (result.requests, result.ok, result.errors_by_kind) == (5, 0, {"ConnectionRefusedError": 5})


def test_rounds_cover_the_plan_once_in_order():
    plan = list(range(10))
    parts = slices(plan, 4)
    assert len(parts) == 4 and all(parts) and [x for part in parts for x in part] == plan


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert (percentile(values, 50), percentile(values, 95), percentile(values, 99)) == (50.0, 95.0, 99.0)
    assert percentile([], 50) is None


def test_batch_histogram_is_the_difference_of_two_scrapes():
    def scrape(text):
        transport = httpx.MockTransport(lambda request: httpx.Response(200, text=text))
        with httpx.Client(transport=transport, base_url="http://bench") as client:
            return scrape_histogram(client, "loraswap_batch_size_pairs")

    delta = histogram_delta(scrape(METRICS_BEFORE), scrape(METRICS_AFTER))
    assert delta == {"batches": 5, "mean": 5.0, "histogram": {"1": 1, "2": 1, "3-4": 2, ">4": 1}}


def test_no_metrics_endpoint_reads_as_missing():
    transport = httpx.MockTransport(lambda request: httpx.Response(404))
    with httpx.Client(transport=transport, base_url="http://bench") as client:
        assert scrape_histogram(client, "loraswap_batch_size_pairs") is None
    assert histogram_delta(None, None) is None


def test_results_schema_and_report_from_a_tiny_run(tmp_path):
    args = parse_args(["--quick", "--out", str(tmp_path)])
    plan = build_plan(load_pairs(), ["mnli", "snli", "rte"], "zipf", 24, seed=0)
    systems = {name: run_fake(plan).summary() for name in ("loraswap", "naive_peft", "merged")}
    systems["loraswap"]["batch_sizes"] = {"batches": 2, "mean": 12.0, "histogram": {"9-16": 2}}
    systems["loraswap"]["single"] = {"p50_ms": 10.0, "p99_ms": 14.0, "errors": 0}
    results = assemble_results(
        args,
        base="test base",
        adapters=AdapterSet(root=tmp_path, names=["mnli", "snli", "rte"], kind="synthetic"),
        systems=systems,
        limit={
            "pairs_s": 1000.0, "pairs": 24, "cpu_ms_per_pair": 1.0, "rounds_pairs_s": [1000.0],
            "config": {"mode": "packed", "batch": 32, "torch_threads": 1},
            "sweep": [{"mode": "packed", "batch": 32, "torch_threads": 1, "pairs_s": 1000.0}],
            "single": {"mode": "packed", "p50_ms": 8.0, "p99_ms": 9.0, "by_mode": {}},
        },
        description={"cpu": "test cpu", "cores": 2, "load_average_1_5_15": [0.1, 0.1, 0.1]},
        wall_s=1.0,
        argv=["--quick"],
    )
    results = json.loads(json.dumps(results))  # what lands in results.json
    assert {"device", "base", "adapters", "concurrency", "systems", "limit_pairs_s"} <= set(results)
    assert results["adapters"] == 3 and results["concurrency"] == 32
    for name in ("loraswap", "naive_peft", "merged"):
        assert SYSTEM_KEYS <= set(results["systems"][name])
        assert results["systems"][name]["requests"] == 24
    throughput = {name: s["throughput_pairs_s"] for name, s in results["systems"].items()}
    loraswap = throughput["loraswap"]
    assert results["ratio_vs_naive"] == pytest.approx(loraswap / throughput["naive_peft"], rel=1e-2)
    assert results["ratio_vs_merged"] == pytest.approx(loraswap / throughput["merged"], rel=1e-2)
    assert results["ratio_vs_limit"] == pytest.approx(loraswap / 1000.0, rel=1e-2)
    assert results["single_p50_ratio"] == 1.25 and results["single_p99_ratio"] == pytest.approx(14 / 9, rel=1e-3)
    assert results["single_p99_over_inprocess_p50"] == 1.75

    paths = write_report(results, tmp_path)
    table = (tmp_path / "results.md").read_text()
    assert all(name in table for name in ("loraswap", "naive_peft", "merged", "limit"))
    assert "Concurrency 1" in table and "packed forward, batches of 32" in table
    for png in paths[1:]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_shaped_run_end_to_end(tmp_path):
    """Three real servers and the limit, with a handful of requests: every system answers without errors."""
    from benchmarks.serving import main

    results = main([
        "--out", str(tmp_path), "--requests", "12", "--warmup", "4", "--concurrency", "4", "--duration", "60",
        "--limit-batches", "4", "--single", "3",
    ])
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["systems"].keys() == {"loraswap", "naive_peft", "merged"}
    for system in on_disk["systems"].values():
        assert system["errors"] == 0 and system["requests"] == 12
    assert results["limit_pairs_s"] > 0 and results["ratio_vs_limit"] > 0
    assert {(c["mode"], c["batch"]) for c in results["limit_sweep"]} == {("padded", 4), ("packed", 4)}
    for system in on_disk["systems"].values():
        assert system["single"]["errors"] == 0 and system["single"]["requests"] == 3
    assert results["single_p50_ratio"] > 0 and results["limit_single"]["p50_ms"] > 0
    assert isinstance(on_disk["systems"]["loraswap"]["batch_sizes"], dict)  # read from /metrics
    assert (tmp_path / "throughput.png").exists() and (tmp_path / "latency.png").exists()
