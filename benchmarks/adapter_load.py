"""Switch cost: loading an adapter through PUT /adapters/{name}, and the first request after eviction.

Measured for an adapter of the embedded base and one of roberta-large's size (random-init base),
on a server that keeps one adapter resident, so alternating between two adapters always misses.

    python -m benchmarks.adapter_load                       # both bases, on the CPU
    python -m benchmarks.adapter_load --bases embedded --reps 15
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from benchmarks import machine
from benchmarks.servers import ServerProcess, free_port, loraswap_command, scrape_histogram
from benchmarks.serving import DEFAULT_TORCH_THREADS, configure_logging

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
PAIR = {
    "premise": "The new rights are nice enough, but nobody is going to use them unless they are told about them.",
    "hypothesis": "Everyone will use the new rights without being told.",
}
TARGET_PUT_MS = 100.0  # roberta-large-sized adapter through the API


def prepare(spec, work: Path, reps: int) -> tuple[Path, Path, dict]:
    """Two adapters to start with (`cold-a`, `cold-b`) and `reps` more to PUT (`put-00`...), all
    cloned from one template of r=16 on query and value with the family's head."""
    from app.inference.base_model import build_classifier, fingerprint
    from benchmarks.adapter_sets import SHIPPED_DIR, clone_with_random_weights, shipped_adapters_fit, write_synthetic

    base_fingerprint = fingerprint(build_classifier(spec, num_labels=3))
    pool, start = work / "pool", work / "start"
    if spec.name == "embedded" and shipped_adapters_fit(base_fingerprint, ("mnli",)):
        template = pool / "template"
        shutil.copytree(SHIPPED_DIR / "mnli", template)
        kind = "shipped mnli and clones of it"
    else:
        write_synthetic(spec, pool, ["template"], base_fingerprint=base_fingerprint)
        template = pool / "template"
        kind = "synthetic (r=16, query+value, random weights)"
    for i, name in enumerate(["cold-a", "cold-b"]):
        clone_with_random_weights(template, start / name, name=name, seed=1000 + i)
    for i in range(reps):
        clone_with_random_weights(template, pool / f"put-{i:02d}", name=f"put-{i:02d}", seed=i)
    size = (template / "adapter_model.safetensors").stat().st_size
    return pool, start, {"adapter_file_bytes": size, "adapter_kind": kind}


def time_puts(client: httpx.Client, pool: Path, reps: int) -> list[float]:
    rtts = []
    for i in range(reps):
        name = f"put-{i:02d}"
        sent = time.perf_counter()
        response = client.put(f"/adapters/{name}", json={"path": str(pool / name)})
        rtts.append((time.perf_counter() - sent) * 1000.0)
        if response.status_code != 200:
            raise RuntimeError(f"PUT {name}: {response.status_code} {response.text[:300]}")
    return rtts


def time_requests(client: httpx.Client, adapters: list[str]) -> list[float]:
    latencies = []
    for name in adapters:
        sent = time.perf_counter()
        response = client.post("/nli", json={**PAIR, "adapter": name})
        latencies.append((time.perf_counter() - sent) * 1000.0)
        if response.status_code != 200:
            raise RuntimeError(f"POST /nli ({name}): {response.status_code} {response.text[:300]}")
    return latencies


def counter(client: httpx.Client, name: str) -> float | None:
    text = client.get("/metrics").text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "_total "):
            return float(line.split()[1])
    return None


def stats(values: list[float]) -> dict:
    return {
        "median_ms": round(statistics.median(values), 2),
        "min_ms": round(min(values), 2),
        "max_ms": round(max(values), 2),
        "n": len(values),
    }


def measure_base(base: str, random_init: bool, args, work: Path, log_dir: Path) -> dict:
    from app.inference.base_model import resolve_base

    spec = resolve_base(base, random_init=random_init)
    pool, start, info = prepare(spec, work, args.reps)
    port = free_port()
    env = {
        "LORASWAP_FRAUD_ENABLED": "false",
        "LORASWAP_BASE_MODEL": base,
        "LORASWAP_BASE_RANDOM_INIT": "true" if random_init else "false",
        "LORASWAP_DEVICE": args.device,
        "LORASWAP_TORCH_THREADS": str(args.torch_threads),
        "LORASWAP_ADAPTERS_DIR": str(start),
        "LORASWAP_ADAPTER_ROOTS": json.dumps([str(pool)]),
        "LORASWAP_DEFAULT_ADAPTER": "cold-a",
        # One resident adapter: every request that alternates between two adapters is a miss.
        "LORASWAP_MAX_RESIDENT_ADAPTERS": "1",
    }
    label = f"{base}{' (random init)' if random_init else ''}"
    with ServerProcess(f"loraswap[{label}]", loraswap_command(port), port=port, env=env,
                       log_path=log_dir / f"adapter_load-{Path(base).name}.log") as server:
        with httpx.Client(base_url=server.url, timeout=120.0) as client:
            time_requests(client, ["cold-a", "cold-b"] * 2)  # warm-up: first forwards, allocator
            before = scrape_histogram(client, "loraswap_adapter_load_seconds")
            put_ms = time_puts(client, pool, args.reps)
            after = scrape_histogram(client, "loraswap_adapter_load_seconds")
            server_side_ms = None
            if before and after and after.get("_count", 0) > before.get("_count", 0):
                loads = after["_count"] - before.get("_count", 0.0)
                server_side_ms = round(1000.0 * (after["_sum"] - before.get("_sum", 0.0)) / loads, 2)
            hits = time_requests(client, ["cold-a"] * args.reps)
            evictions_before = counter(client, "loraswap_adapter_evictions")
            misses = time_requests(client, ["cold-b", "cold-a"] * ((args.reps + 1) // 2))
            evictions_after = counter(client, "loraswap_adapter_evictions")
    evictions = None if evictions_before is None or evictions_after is None else int(evictions_after - evictions_before)
    result = {
        "base": spec.display_id,
        **info,
        "put_round_trip": stats(put_ms),
        "put_server_side_mean_ms": server_side_ms,
        "request_resident": stats(hits),
        "request_after_eviction": stats(misses),
        "evictions_during_misses": evictions,
    }
    logger.info(
        "%s: PUT median %.1f ms; request resident %.1f ms, after eviction %.1f ms (%s evictions)",
        label, result["put_round_trip"]["median_ms"], result["request_resident"]["median_ms"],
        result["request_after_eviction"]["median_ms"], evictions,
    )
    return result


def markdown(results: dict) -> str:
    lines = [
        "| base | adapter file | PUT round trip, median (min-max) | server-side load, mean | request, resident | "
        "first request after eviction | evictions seen |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["bases"]:
        put, hit, miss = r["put_round_trip"], r["request_resident"], r["request_after_eviction"]
        lines.append(
            f"| {r['base']} | {r['adapter_file_bytes'] / 1e6:.2f} MB | {put['median_ms']:.1f} ms "
            f"({put['min_ms']:.1f}-{put['max_ms']:.1f}) | {r['put_server_side_mean_ms'] or 'n/a'} ms | "
            f"{hit['median_ms']:.1f} ms | {miss['median_ms']:.1f} ms | {r['evictions_during_misses']} |"
        )
    lines += [
        "",
        f"{results['reps']} repetitions each, device {results['device']}, torch threads {results['torch_threads']}; "
        f"load average {results['machine']['load_average_1_5_15']} before, {results['load_average_after']} after.",
        "",
        f"Command: `{results['command']}`",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--bases", default="embedded,roberta-large", help="comma-separated; roberta-large is random-init"
    )
    parser.add_argument("--reps", type=int, default=9, help="repetitions of each measurement")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--torch-threads", type=int, default=DEFAULT_TORCH_THREADS, help="torch CPU threads (default %(default)s)"
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs/benchmarks/adapter_load")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    description = machine.describe(args.device)
    results = {"device": args.device, "torch_threads": args.torch_threads, "reps": args.reps, "bases": []}
    with ExitStack() as stack:
        for base in [b.strip() for b in args.bases.split(",") if b.strip()]:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loraswap-load-")))
            random_init = base != "embedded" and not Path(base).is_dir()
            results["bases"].append(measure_base(base, random_init, args, work, args.out / "logs"))
    big = [r for r in results["bases"] if "roberta-large" in r["base"]]
    results["target_put_ms"] = TARGET_PUT_MS
    results["target_put_met"] = big[0]["put_round_trip"]["median_ms"] < TARGET_PUT_MS if big else None
    results.update(machine.run_record(description, "benchmarks.adapter_load", argv))
    machine.write_results(args.out, "adapter_load", results, markdown)
    return results


if __name__ == "__main__":
    main()
