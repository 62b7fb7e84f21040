"""Benchmark: fraud scoring over real HTTP (loraswap-serve in a subprocess on 127.0.0.1), batch throughput and
single-request latency.

    python benchmarks/fraud_latency.py                      # defaults: 30 batches of 1,000, 2,000 singles
    python benchmarks/fraud_latency.py --json-out runs/fraud_latency.json

The client runs on the same machine as the server and shares its cores; bodies are encoded once up front so
the client's JSON work stays out of the timings as far as it can. NLI is disabled so only the fraud path runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from app.inference.fraud_scorer import INPUT_FIELDS  # noqa: E402
from training.fraud_data import load_transactions  # noqa: E402

SLICE = REPO / "data" / "fraud" / "creditcard_slice.csv.gz"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, model_dir: Path, max_batch: int) -> subprocess.Popen:
    env = {
        **os.environ,
        "LORASWAP_NLI_ENABLED": "false",
        "LORASWAP_FRAUD_MODEL_DIR": str(model_dir),
        "LORASWAP_FRAUD_MAX_BATCH": str(max_batch),
    }
    # Log level warning: uvicorn's per-request access log would otherwise be part of every timing.
    command = [sys.executable, "-m", "app.cli", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    return subprocess.Popen(command, cwd=REPO, env=env)


def wait_ready(client: httpx.Client, server: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server exited with status {server.returncode} before it was ready")
        try:
            if client.get("/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)  # polling a subprocess's port; there is no in-process event to wait on
    raise SystemExit(f"server not ready after {timeout_s:.0f}s")


def percentile_ms(samples_ns: list[int], q: float) -> float:
    return float(np.percentile(np.array(samples_ns) / 1e6, q))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=REPO / "models" / "fraud", help="fraud model to serve")
    parser.add_argument("--batch-size", type=int, default=1000, help="transactions per /fraud/batch request")
    parser.add_argument("--batch-requests", type=int, default=30, help="timed /fraud/batch requests")
    parser.add_argument("--single-requests", type=int, default=2000, help="timed /fraud requests")
    parser.add_argument("--warmup", type=int, default=50, help="untimed requests of each kind first")
    parser.add_argument("--json-out", type=Path, help="also write the results here as JSON")
    args = parser.parse_args(argv)

    data = load_transactions(SLICE)
    rows = [dict(zip(INPUT_FIELDS, map(float, x), strict=True)) for x in data.X]
    singles = [json.dumps(row).encode() for row in rows]
    batch = json.dumps({"transactions": [rows[i % len(rows)] for i in range(args.batch_size)]}).encode()
    headers = {"content-type": "application/json"}

    port = free_port()
    server = start_server(port, args.model_dir, max(args.batch_size, 1))
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            wait_ready(client, server, timeout_s=120)

            for i in range(args.warmup):
                client.post("/fraud", content=singles[i % len(singles)], headers=headers).raise_for_status()
                if i < 5:
                    client.post("/fraud/batch", content=batch, headers=headers).raise_for_status()

            single_ns = []
            started = time.perf_counter()
            for i in range(args.single_requests):
                t0 = time.perf_counter_ns()
                response = client.post("/fraud", content=singles[i % len(singles)], headers=headers)
                single_ns.append(time.perf_counter_ns() - t0)
                response.raise_for_status()
            single_wall = time.perf_counter() - started

            batch_ns = []
            started = time.perf_counter()
            for _ in range(args.batch_requests):
                t0 = time.perf_counter_ns()
                response = client.post("/fraud/batch", content=batch, headers=headers)
                batch_ns.append(time.perf_counter_ns() - t0)
                response.raise_for_status()
            batch_wall = time.perf_counter() - started
            assert len(response.json()["results"]) == args.batch_size
    finally:
        server.terminate()
        server.wait(timeout=30)

    results = {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "python": platform.python_version(),
        "single": {
            "requests": args.single_requests,
            "p50_ms": percentile_ms(single_ns, 50),
            "p90_ms": percentile_ms(single_ns, 90),
            "p99_ms": percentile_ms(single_ns, 99),
            "requests_per_s_sequential": args.single_requests / single_wall,
        },
        "batch": {
            "batch_size": args.batch_size,
            "requests": args.batch_requests,
            "p50_ms": percentile_ms(batch_ns, 50),
            "p99_ms": percentile_ms(batch_ns, 99),
            "transactions_per_s": args.batch_size * args.batch_requests / batch_wall,
        },
    }
    single, many = results["single"], results["batch"]
    print(f"machine: {results['machine']}")
    print(
        f"POST /fraud        {single['requests']} sequential requests: p50 {single['p50_ms']:.2f} ms, "
        f"p90 {single['p90_ms']:.2f} ms, p99 {single['p99_ms']:.2f} ms ({single['requests_per_s_sequential']:.0f} req/s)"
    )
    print(
        f"POST /fraud/batch  {many['requests']} sequential requests of {many['batch_size']:,}: "
        f"{many['transactions_per_s']:,.0f} transactions/s (p50 {many['p50_ms']:.1f} ms, p99 {many['p99_ms']:.1f} ms per request)"
    )
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
