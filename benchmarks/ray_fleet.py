"""Measure the Ray Serve app on a local cluster: the two adapter routings side by side in one run —
Ray's model multiplexing (`routing="multiplex"`) and loraswap's adapter-affine request router
(`routing="affinity"`) — and, optionally, a mixed `/nli/batch` sent whole vs split by adapter.

Both routings are deployed at once as two applications on one cluster (each: one ingress, N engine
replicas on the embedded base), serving the same adapters (shipped + synthetic), and get the same Zipf
traffic in interleaved rounds (the order alternates), after a warm-up each. Per routing: throughput,
latency p50/p99, errors, affinity (share of requests answered by a replica that already held the
adapter), how the hottest adapter's requests spread over replicas, and the ratio affinity/multiplex.
Every answer of one routing is checked against the other's for the same request (within 1e-4).

    nice .venv/bin/python -m benchmarks.ray_fleet --replicas 2 --out docs/scaling
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import statistics
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from benchmarks.machine import describe, run_record, write_results

REPO = Path(__file__).resolve().parent.parent
ROUTINGS = ("multiplex", "affinity")
PREMISES = [
    "A man is playing a guitar on stage.",
    "A dog runs through the snow.",
    "The talks between the two sides failed.",
    "Three children are eating lunch at a table.",
]
HYPOTHESES = ["A person is making music.", "The animal is asleep.", "The negotiations succeeded.", "Kids eat."]
TOLERANCE = 1e-4

logger = logging.getLogger(__name__)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _send(client: httpx.Client, prefix: str, body: bytes) -> dict:
    started = time.perf_counter()
    try:
        answer = client.post(f"{prefix}/nli", content=body, headers={"content-type": "application/json"})
    except httpx.HTTPError as exc:
        return {"status": 0, "seconds": time.perf_counter() - started, "error": repr(exc)}
    seconds = time.perf_counter() - started
    scores = answer.json().get("scores") if answer.status_code == 200 else None
    return {
        "status": answer.status_code,
        "seconds": seconds,
        "replica": answer.headers.get("x-loraswap-replica", ""),
        "held": answer.headers.get("x-loraswap-adapter-held") == "1",
        "scores": scores,
    }


def _run(client: httpx.Client, prefix: str, plan: list, concurrency: int) -> tuple[list[dict], float]:
    with ThreadPoolExecutor(concurrency) as pool:
        started = time.perf_counter()
        outcomes = list(pool.map(lambda request: _send(client, prefix, request.body), plan))
        wall = time.perf_counter() - started
    for request, outcome in zip(plan, outcomes):
        outcome["adapter"] = request.adapter
    return outcomes, wall


def summarize(outcomes: list[dict], wall_s: float, hot: str) -> dict:
    ok = [o for o in outcomes if o["status"] == 200]
    seconds = [o["seconds"] for o in ok]
    hot_replicas = Counter(o["replica"] for o in ok if o["adapter"] == hot)
    hot_total = sum(hot_replicas.values())
    return {
        "requests": len(outcomes),
        "errors": len(outcomes) - len(ok),
        "error_statuses": dict(Counter(str(o["status"]) for o in outcomes if o["status"] != 200)),
        "requests_per_s": round(len(outcomes) / wall_s, 2),
        "p50_ms": round(1000 * statistics.median(seconds), 1) if seconds else None,
        "p99_ms": round(1000 * _percentile(seconds, 0.99), 1) if seconds else None,
        "affinity": round(sum(o["held"] for o in ok) / len(ok), 3) if ok else None,
        "hot_adapter": hot,
        "hot_requests": hot_total,
        "hot_share_per_replica": sorted((round(n / hot_total, 3) for n in hot_replicas.values()), reverse=True)
        if hot_total else [],
        "replica_share": sorted(
            (round(n / len(ok), 3) for n in Counter(o["replica"] for o in ok).values()), reverse=True
        ) if ok else [],
    }


def _disagreements(a: list[dict], b: list[dict]) -> int:
    """Requests both routings answered whose scores differ by more than TOLERANCE."""
    bad = 0
    for x, y in zip(a, b):
        if x["scores"] is None or y["scores"] is None:
            continue
        if x["scores"].keys() != y["scores"].keys() or any(
            abs(x["scores"][k] - y["scores"][k]) > TOLERANCE for k in x["scores"]
        ):
            bad += 1
    return bad


def measure_routings(args: argparse.Namespace, url: str, adapters: list[str]) -> dict:
    from benchmarks.workload import build_plan, load_pairs

    pairs = load_pairs()
    warm = build_plan(pairs, adapters, "zipf", args.warmup, seed=args.seed + 100)
    plans = [build_plan(pairs, adapters, "zipf", args.requests, seed=args.seed + r) for r in range(args.rounds)]
    hot = Counter(r.adapter for plan in plans for r in plan).most_common(1)[0][0]
    outcomes: dict[str, list[dict]] = {r: [] for r in ROUTINGS}
    walls: dict[str, float] = {r: 0.0 for r in ROUTINGS}
    per_round: list[dict] = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for routing in ROUTINGS:
            _run(client, f"/{routing}", warm, args.concurrency)
        for index, plan in enumerate(plans):
            order = ROUTINGS if index % 2 == 0 else tuple(reversed(ROUTINGS))
            answers = {}
            for routing in order:
                got, wall = _run(client, f"/{routing}", plan, args.concurrency)
                answers[routing] = got
                outcomes[routing].extend(got)
                walls[routing] += wall
                per_round.append({"round": index, "routing": routing, "requests_per_s": round(len(plan) / wall, 2)})
            per_round[-1]["disagreements"] = _disagreements(answers["multiplex"], answers["affinity"])
    results = {routing: summarize(outcomes[routing], walls[routing], hot) for routing in ROUTINGS}
    base, alt = results["multiplex"], results["affinity"]
    results["ratio_affinity_to_multiplex"] = {
        "requests_per_s": round(alt["requests_per_s"] / base["requests_per_s"], 3),
        "p50_ms": round(alt["p50_ms"] / base["p50_ms"], 3) if base["p50_ms"] and alt["p50_ms"] else None,
        "p99_ms": round(alt["p99_ms"] / base["p99_ms"], 3) if base["p99_ms"] and alt["p99_ms"] else None,
    }
    results["disagreements_over_1e-4"] = sum(r.get("disagreements", 0) for r in per_round)
    results["rounds"] = per_round
    return results


def measure_split(args: argparse.Namespace, url: str) -> dict:
    """A mixed `/nli/batch` sent whole vs split by adapter (multiplex app), interleaved rounds."""
    from ray import serve

    from app.serving.ray_app import INGRESS_DEPLOYMENT

    ingress = serve.get_deployment_handle(INGRESS_DEPLOYMENT, app_name="multiplex")
    adapters = ("mnli", "snli", "rte")
    batch = [
        {"premise": PREMISES[i % 4], "hypothesis": HYPOTHESES[(i // 4) % 4], "adapter": adapters[i % 3]}
        for i in range(args.batch_pairs)
    ]
    timings: dict[str, list[float]] = {"whole": [], "split": []}
    with httpx.Client(base_url=url, timeout=120) as client:
        for round_index in range(3 + args.split_rounds):  # 3 warm-up rounds first
            for mode in ("whole", "split"):
                ingress.options(method_name="set_split_mixed_batches").remote(mode == "split").result()
                started = time.perf_counter()
                answer = client.post("/multiplex/nli/batch", json={"pairs": batch})
                if round_index >= 3:
                    timings[mode].append(time.perf_counter() - started)
                assert answer.status_code == 200, answer.text
        ingress.options(method_name="set_split_mixed_batches").remote(False).result()
    return {
        "batch_pairs": args.batch_pairs,
        "rounds": args.split_rounds,
        **{f"{m}_median_ms": round(1000 * statistics.median(t), 1) for m, t in timings.items()},
        **{f"{m}_p90_ms": round(1000 * _percentile(t, 0.9), 1) for m, t in timings.items()},
    }


def render(results: dict) -> str:
    routing = results["routing"]
    lines = [
        "# Ray fleet: adapter routing, multiplexing vs the affinity router",
        "",
        f"{results['replicas']} engine replicas per routing, {len(results['adapters'])} adapters "
        f"({results['adapters_kind']}), Zipf traffic, {results['concurrency']} client threads, "
        f"{results['rounds_count']} interleaved rounds of {results['requests_per_round']} `/nli` requests "
        f"per routing (after {results['warmup']} warm-up requests each).",
        "",
        "| routing | req/s | p50 ms | p99 ms | errors | affinity | hot adapter over replicas | all requests over replicas |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in ROUTINGS:
        r = routing[name]
        lines.append(
            f"| {name} | {r['requests_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['errors']} | {r['affinity']} "
            f"| {' / '.join(f'{100 * s:.0f}%' for s in r['hot_share_per_replica'])} ({r['hot_adapter']}, "
            f"{r['hot_requests']} req) | {' / '.join(f'{100 * s:.0f}%' for s in r['replica_share'])} |"
        )
    ratio = routing["ratio_affinity_to_multiplex"]
    lines += [
        "",
        f"affinity / multiplex: throughput {ratio['requests_per_s']}x, p50 {ratio['p50_ms']}x, p99 {ratio['p99_ms']}x; "
        f"answers differing by more than 1e-4 between the routings: {routing['disagreements_over_1e-4']}.",
    ]
    if results.get("split"):
        s = results["split"]
        lines += [
            "",
            f"Mixed `/nli/batch` of {s['batch_pairs']} pairs, {s['rounds']} rounds: whole median {s['whole_median_ms']} ms "
            f"(p90 {s['whole_p90_ms']}), split {s['split_median_ms']} ms (p90 {s['split_p90_ms']}).",
        ]
    machine = results["run"]["machine"]
    lines += [
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores, load average before {machine['load_average_1_5_15']}, "
        f"after {results['run']['load_average_after']}; `{results['run']['command']}`, {results['run']['finished_at']}.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, default=2, help="engine replicas per routing")
    parser.add_argument("--synthetic", type=int, default=37, help="synthetic adapters beside the 3 shipped ones")
    parser.add_argument("--requests", type=int, default=400, help="/nli requests per routing per round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=120)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--spread-inflight", type=int, default=8, help="both routings' hot-adapter threshold")
    parser.add_argument("--split-rounds", type=int, default=0, help="also measure a mixed /nli/batch whole vs split")
    parser.add_argument("--batch-pairs", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="folder for ray_routing.json and ray_routing.md")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise

    machine = describe()
    import ray
    from ray import serve

    from app.config import Settings
    from app.inference.base_model import EMBEDDED_BASE, build_classifier, fingerprint, resolve_base
    from app.serving.ray_app import build_app
    from benchmarks.adapter_sets import prepare_adapters

    with tempfile.TemporaryDirectory(prefix="ray-fleet-") as work:
        spec = resolve_base(EMBEDDED_BASE)
        adapter_set = prepare_adapters(
            spec, 3 + args.synthetic, Path(work) / "adapters",
            base_fingerprint=fingerprint(build_classifier(spec, num_labels=3)),
        )
        settings = Settings(torch_threads=1, fraud_enabled=False, adapters_dir=adapter_set.root)
        port = _port()
        ray.init(num_cpus=4, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            for routing in ROUTINGS:
                serve.run(
                    build_app(settings, engine_replicas=args.replicas, engine_num_cpus=0.5, ingress_num_cpus=0.5,
                              spread_inflight=args.spread_inflight, routing=routing),
                    name=routing, route_prefix=f"/{routing}",
                )
            url = f"http://127.0.0.1:{port}"
            results = {
                "replicas": args.replicas,
                "adapters": adapter_set.names,
                "adapters_kind": adapter_set.kind,
                "concurrency": args.concurrency,
                "rounds_count": args.rounds,
                "requests_per_round": args.requests,
                "warmup": args.warmup,
                "spread_inflight": args.spread_inflight,
                "routing": measure_routings(args, url, adapter_set.names),
                "split": measure_split(args, url) if args.split_rounds else None,
            }
        finally:
            serve.shutdown()
            ray.shutdown()
    results["run"] = run_record(machine, "benchmarks.ray_fleet", None)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        write_results(args.out, "ray_routing", results, render)
    else:
        print(json.dumps(results, indent=2))
        print(render(results))


if __name__ == "__main__":
    main()
