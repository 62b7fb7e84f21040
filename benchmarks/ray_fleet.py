"""Measure the Ray Serve app on a local cluster: a mixed `/nli/batch` sent whole vs split by adapter
(interleaved rounds), and how a hot adapter's traffic spreads over engine replicas.

    nice .venv/bin/python -m benchmarks.ray_fleet --replicas 2 --rounds 20 --out runs/ray_fleet.json
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
ADAPTERS = ("mnli", "snli", "rte")
PREMISES = [
    "A man is playing a guitar on stage.",
    "A dog runs through the snow.",
    "The talks between the two sides failed.",
    "Three children are eating lunch at a table.",
]
HYPOTHESES = ["A person is making music.", "The animal is asleep.", "The negotiations succeeded.", "Kids eat."]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch-pairs", type=int, default=24)
    parser.add_argument("--hot-requests", type=int, default=128)
    parser.add_argument("--hot-concurrency", type=int, default=16)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import ray
    from ray import serve

    from app.config import Settings
    from app.serving.ray_app import INGRESS_DEPLOYMENT, build_app

    port = _port()
    ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(
        build_app(Settings(torch_threads=1, fraud_enabled=False), engine_replicas=args.replicas,
                  engine_num_cpus=0.5, ingress_num_cpus=0.5),
        name="bench",
        route_prefix="/",
    )
    ingress = serve.get_deployment_handle(INGRESS_DEPLOYMENT, app_name="bench")
    url = f"http://127.0.0.1:{port}"
    batch = [
        {"premise": PREMISES[i % 4], "hypothesis": HYPOTHESES[(i // 4) % 4], "adapter": ADAPTERS[i % 3]}
        for i in range(args.batch_pairs)
    ]
    timings: dict[str, list[float]] = {"whole": [], "split": []}
    with httpx.Client(base_url=url, timeout=120) as client:
        for _ in range(3):  # warm both paths
            for mode in ("whole", "split"):
                ingress.options(method_name="set_split_mixed_batches").remote(mode == "split").result()
                assert client.post("/nli/batch", json={"pairs": batch}).status_code == 200
        for _ in range(args.rounds):
            for mode in ("whole", "split"):
                ingress.options(method_name="set_split_mixed_batches").remote(mode == "split").result()
                started = time.perf_counter()
                answer = client.post("/nli/batch", json={"pairs": batch})
                timings[mode].append(time.perf_counter() - started)
                assert answer.status_code == 200, answer.text
        ingress.options(method_name="set_split_mixed_batches").remote(False).result()

        def hot(i: int) -> str:
            answer = client.post("/nli", json={"premise": PREMISES[i % 4], "hypothesis": HYPOTHESES[0], "adapter": "mnli"})
            assert answer.status_code == 200
            return answer.headers["x-loraswap-replica"]

        with ThreadPoolExecutor(args.hot_concurrency) as pool:
            started = time.perf_counter()
            replicas = list(pool.map(hot, range(args.hot_requests)))
            hot_s = time.perf_counter() - started
    serve.shutdown()
    ray.shutdown()
    report = {
        "replicas": args.replicas,
        "batch_pairs": args.batch_pairs,
        "rounds": args.rounds,
        "whole_median_ms": round(1000 * statistics.median(timings["whole"]), 1),
        "split_median_ms": round(1000 * statistics.median(timings["split"]), 1),
        "whole_p90_ms": round(1000 * sorted(timings["whole"])[int(0.9 * len(timings["whole"]))], 1),
        "split_p90_ms": round(1000 * sorted(timings["split"])[int(0.9 * len(timings["split"]))], 1),
        "hot_requests": args.hot_requests,
        "hot_concurrency": args.hot_concurrency,
        "hot_requests_per_s": round(args.hot_requests / hot_s, 1),
        "hot_share_per_replica": sorted(
            (round(replicas.count(r) / len(replicas), 3) for r in set(replicas)), reverse=True
        ),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
