"""Serving benchmark: loraswap against naive PEFT, the merged ceiling and the in-process limit.

The same pairs at the same concurrency go to loraswap (K adapters mixed in one forward), a naive
PEFT server (one adapter at a time), the merged ceiling (one adapter folded into the base, served by
loraswap) and the in-process limit; it writes results.json, results.md and plots.

All servers are up at once and measured in interleaved rounds (each round sends the next slice of
the plan to every system in turn, in a rotating order), so a change in the machine's load during
the run falls on every system alike instead of on whichever ran last.

    python -m benchmarks.serving --quick                      # CPU, embedded base, 3 adapters, < 3 min
    python -m benchmarks.serving --adapters 16 --popularity uniform
    python -m benchmarks.serving --device cuda --base roberta-large --random-init --adapters 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from benchmarks import machine
from benchmarks.adapter_sets import AdapterSet, prepare_adapters
from benchmarks.loadgen import LoadResult, OneAtATime, make_client, run_closed_loop, warm_up
from benchmarks.report import write_report
from benchmarks.servers import ServerProcess, free_port, histogram_delta, loraswap_command, scrape_histogram
from benchmarks.workload import POPULARITIES, PlannedRequest, build_plan, load_pairs, retarget

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVED = ("loraswap", "naive_peft", "merged")
DEFAULT_TORCH_THREADS = max(1, (os.cpu_count() or 2) - 1)
SYSTEMS = (*SERVED, "limit")
CALIBRATION_PAIRS = 256  # pairs of the plan each configuration of the limit is timed on
QUICK = {"requests": 1200, "duration": 30.0, "warmup": 64, "concurrency": 32, "adapters": 3, "rounds": 3, "single": 150}
FULL = {"requests": 4000, "duration": 120.0, "warmup": 128, "concurrency": 32, "adapters": 3, "rounds": 4, "single": 400}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run: %s" % QUICK)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs/benchmarks/serving", help="output directory")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--base", default="embedded", help="base: embedded, roberta-large, or a directory")
    parser.add_argument(
        "--random-init", action="store_true", help="random base weights (speed does not depend on them)"
    )
    parser.add_argument("--adapters", type=int, help="K adapters (shipped mnli/snli/rte first, then synthetic)")
    parser.add_argument("--popularity", default="zipf", choices=POPULARITIES, help="adapter popularity (zipf: alpha=1)")
    parser.add_argument("--concurrency", type=int, help="closed-loop workers, each with one request in flight")
    parser.add_argument("--requests", type=int, help="measured requests per system, all rounds (upper bound)")
    parser.add_argument("--duration", type=float, help="measured seconds per system, all rounds (upper bound)")
    parser.add_argument("--rounds", type=int, help="interleaved measurement rounds")
    parser.add_argument("--warmup", type=int, help="untimed requests per system before measuring")
    parser.add_argument(
        "--single", type=int,
        help="requests per system sent one at a time after the rounds (the concurrency-1 row), and pairs timed "
        "alone in-process as its reference",
    )
    parser.add_argument(
        "--torch-threads", type=int, default=DEFAULT_TORCH_THREADS,
        help="torch CPU threads, the same for every system (default: cores - 1, leaving one core to the load "
        "generator and the servers' event loops, which share the machine; here %(default)s)",
    )
    parser.add_argument(
        "--limit-batches", default="16,32",
        help="batch sizes the in-process limit is calibrated over (with both forwards; the fastest is kept)",
    )
    parser.add_argument("--max-seq-len", type=int, default=256, help="tokens a pair is truncated to, everywhere")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="comma-separated subset of %s" % (SYSTEMS,))
    parser.add_argument(
        "--server-env", action="append", default=[], metavar="KEY=VALUE",
        help="extra setting for the loraswap and merged servers, e.g. LORASWAP_MAX_BATCH_PAIRS=16",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, help="keep adapters and the merged base here (default: a temp dir)")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    args.limit_batches = [int(b) for b in args.limit_batches.split(",") if b.strip()]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems: {', '.join(sorted(unknown))}")
    if args.rounds < 1 or args.requests < args.rounds:
        parser.error("need at least one round and one request per round")
    return args


def server_env(args: argparse.Namespace, *, base: str, random_init: bool, adapters_dir: Path, default: str) -> dict:
    env = {
        "LORASWAP_FRAUD_ENABLED": "false",
        "LORASWAP_LOG_LEVEL": "warning",
        "LORASWAP_BASE_MODEL": base,
        "LORASWAP_BASE_RANDOM_INIT": "true" if random_init else "false",
        "LORASWAP_DEVICE": args.device,
        "LORASWAP_ADAPTERS_DIR": str(adapters_dir),
        "LORASWAP_DEFAULT_ADAPTER": default,
        "LORASWAP_TORCH_THREADS": str(args.torch_threads),
        "LORASWAP_MAX_SEQ_LEN_TOKENS": str(args.max_seq_len),
        "LORASWAP_MAX_RESIDENT_ADAPTERS": str(max(16, args.adapters)),
        "LORASWAP_MAX_QUEUE_PAIRS": str(max(2048, 4 * args.concurrency)),
        # Admission by estimated wait sheds load on a slow (e.g. shared) machine; the baseline sheds
        # nothing, and a closed loop queues at most `concurrency` pairs, so the comparison measures
        # capacity with shedding off. --server-env LORASWAP_MAX_QUEUE_WAIT_MS=2000 turns it back on.
        "LORASWAP_MAX_QUEUE_WAIT_MS": "600000",
    }
    for item in args.server_env:
        key, _, value = item.partition("=")
        env[key] = value
    return env


def naive_server(args, adapters: AdapterSet, log_dir: Path) -> ServerProcess:
    port = free_port()
    command = [
        sys.executable, "-m", "benchmarks.baselines.naive_peft",
        "--base", args.base, "--device", args.device, "--torch-threads", str(args.torch_threads),
        "--max-seq-len", str(args.max_seq_len), "--port", str(port),
    ]
    if args.random_init:
        command.append("--random-init")
    for name in adapters.names:
        command += ["--adapter", f"{name}={adapters.path(name)}"]
    return ServerProcess("naive_peft", command, port=port, log_path=log_dir / "naive_peft.log")


def check_adapters_ready(url: str, names: list[str]) -> None:
    """Every adapter the run uses can serve: known on disk (loaded on first use), loading, or loaded."""
    listing = httpx.get(f"{url}/adapters", timeout=10).json()["adapters"]
    state = {a["name"]: a["state"] for a in listing}
    missing = [n for n in names if state.get(n) not in ("known", "loading", "ready")]
    if missing:
        raise RuntimeError(f"adapters cannot serve on {url}: {missing} (states: {state})")


def slices(plan: list, rounds: int) -> list[list]:
    """`plan` cut into `rounds` consecutive parts of (nearly) equal size."""
    return [plan[r * len(plan) // rounds : (r + 1) * len(plan) // rounds] for r in range(rounds)]


def scrape_histogram_at(client: httpx.Client, url: str) -> dict | None:
    return scrape_histogram(client, "loraswap_batch_size_pairs", base_url=url)


async def measure(servers: dict[str, ServerProcess], plans: dict[str, tuple[list, list]], limit, args) -> dict:
    """Warm every system up, then run the rounds. Per served system: the pooled LoadResult, its batch
    histogram (difference of two /metrics scrapes), and the CPU seconds of the server and of this
    client over its phases, which show where the shared cores went when wall-clock numbers cannot."""
    names = [n for n in SYSTEMS if n in servers or (n == "limit" and limit is not None)]
    clients = {n: make_client(servers[n].url, args.concurrency) for n in servers}
    phases: dict[str, list] = {n: [] for n in names}
    client_cpu = {n: 0.0 for n in servers}
    try:
        for name, server in servers.items():
            warm = await warm_up(clients[name], plans[name][0], concurrency=args.concurrency)
            if warm.errors:
                logger.warning("%s warm-up errors: %s", name, warm.errors_by_kind)
        if limit is not None:
            limit.warm_up([r.pair for r in plans["limit"][0]])
        with httpx.Client(timeout=10) as scraper:
            before = {n: scrape_histogram_at(scraper, s.url) for n, s in servers.items()}
            server_cpu = {n: s.cpu_s() for n, s in servers.items()}
            for round_index in range(args.rounds):
                order = names[round_index % len(names):] + names[: round_index % len(names)]
                for name in order:
                    part = slices(plans[name][1], args.rounds)[round_index]
                    budget = args.duration / args.rounds
                    if name == "limit":
                        phases[name].append(limit.run([r.pair for r in part], max_duration_s=budget, seed=round_index))
                        continue
                    started = time.process_time()
                    result = await run_closed_loop(
                        clients[name], part, concurrency=args.concurrency, max_duration_s=budget
                    )
                    client_cpu[name] += time.process_time() - started
                    phases[name].append(result)
                    logger.info("round %d %s: %.1f pairs/s, %d errors", round_index, name,
                                result.throughput_pairs_s, result.errors)
            server_cpu = {n: s.cpu_s() - server_cpu[n] for n, s in servers.items()}
            after = {n: scrape_histogram_at(scraper, s.url) for n, s in servers.items()}
        # The concurrency-1 row, after the rounds (its traffic stays out of their batch and CPU figures).
        single = await asyncio.to_thread(measure_single, servers, plans, limit, args.single) if args.single else {}
    finally:
        for client in clients.values():
            await client.aclose()
    out: dict = {}
    for name in servers:
        result = LoadResult.combined(phases[name])
        summary = result.summary()
        summary["batch_sizes"] = histogram_delta(before[name], after[name]) or (
            "1 (one request per forward)" if name == "naive_peft" else "n/a"
        )
        summary["server_cpu_ms_per_pair"] = round(1000.0 * server_cpu[name] / max(1, result.ok), 2)
        summary["client_cpu_ms_per_request"] = round(1000.0 * client_cpu[name] / max(1, result.requests), 2)
        summary["rounds_pairs_s"] = [round(p.throughput_pairs_s, 1) for p in phases[name]]
        summary["startup_s"] = round(servers[name].startup_s or 0.0, 2)
        summary["single"] = single.get(name)
        out[name] = summary
    if limit is not None:
        total = phases["limit"][0]
        for part in phases["limit"][1:]:
            total = total + part
        out["limit"] = {
            "config": limit.config,
            "sweep": limit.sweep,
            "single": single.get("limit"),
            "pairs_s": total.pairs_s,
            "pairs": total.pairs,
            "cpu_ms_per_pair": total.cpu_ms_per_pair,
            "rounds_pairs_s": [round(p.pairs_s, 1) for p in phases["limit"]],
        }
    return out


def measure_single(servers: dict[str, ServerProcess], plans: dict, limit, count: int) -> dict[str, dict]:
    """Every system answers the same `count` requests one at a time, interleaved request by request
    (in a rotating order), and the limit times the same pairs alone in-process in each forward between
    them: a slow stretch of the shared machine falls on every system alike, where back-to-back phases
    of 150 requests each met different moments (the in-process p50 ranged 17.7-23.0 ms over runs of one day)."""
    from benchmarks.limit import MODES, single_pair_summary, time_single_pair

    names = [*servers, *(["limit"] if limit is not None else [])]
    senders = {name: OneAtATime(server.url) for name, server in servers.items()}
    limit_times: dict[str, list[float]] = {mode: [] for mode in MODES}
    if limit is not None:
        for mode in MODES:
            time_single_pair(limit, plans["limit"][1][0].pair, mode)  # untimed: first-call costs
    for i in range(count):
        for name in names[i % len(names):] + names[: i % len(names)]:
            if name == "limit":
                for mode in MODES:
                    limit_times[mode].append(time_single_pair(limit, plans["limit"][1][i].pair, mode))
            else:
                senders[name].send(plans[name][1][i])
    single = {name: sender.result().summary() for name, sender in senders.items()}
    if limit is not None:
        single["limit"] = single_pair_summary(limit_times)
    return single


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    if not numerator or not denominator:
        return None
    return round(numerator / denominator, 3)


def _single_ratio(systems: dict, limit: dict | None, served_key: str, reference_key: str) -> float | None:
    """loraswap's concurrency-1 latency percentile over one of the in-process single-pair percentiles."""
    served = (systems.get("loraswap") or {}).get("single") or {}
    reference = (limit or {}).get("single") or {}
    return ratio(served.get(served_key), reference.get(reference_key))


def assemble_results(
    args: argparse.Namespace,
    *,
    base: str,
    adapters: AdapterSet,
    systems: dict[str, dict],
    limit: dict | None,
    description: dict,
    wall_s: float,
    argv: list[str],
) -> dict:
    """results.json: the run's configuration, each system's summary, the limit and the ratios of
    loraswap's throughput to the others'."""
    loraswap = systems.get("loraswap", {}).get("throughput_pairs_s")
    limit_pairs_s = limit["pairs_s"] if limit else None
    return {
        "device": args.device,
        "base": base,
        "adapters": args.adapters,
        "adapter_names": adapters.names,
        "adapter_kind": adapters.kind,
        "popularity": args.popularity + (" (alpha=1)" if args.popularity == "zipf" else ""),
        "concurrency": args.concurrency,
        "torch_threads": args.torch_threads,
        "max_seq_len": args.max_seq_len,
        "requests_planned": args.requests,
        "max_duration_s": args.duration,
        "rounds": args.rounds,
        "warmup_requests": args.warmup,
        "server_env": args.server_env,
        "text_source": "data/nli/mnli_sample.jsonl + data/nli/snli_sample.jsonl",
        "systems": systems,
        "limit_pairs_s": round(limit_pairs_s, 2) if limit_pairs_s else None,
        "limit_pairs": limit["pairs"] if limit else None,
        "limit_cpu_ms_per_pair": round(limit["cpu_ms_per_pair"], 2) if limit else None,
        "limit_rounds_pairs_s": limit["rounds_pairs_s"] if limit else None,
        "limit_config": limit["config"] if limit else None,
        "limit_sweep": limit["sweep"] if limit else None,
        "ratio_vs_naive": ratio(loraswap, systems.get("naive_peft", {}).get("throughput_pairs_s")),
        "ratio_vs_merged": ratio(loraswap, systems.get("merged", {}).get("throughput_pairs_s")),
        "ratio_vs_limit": ratio(loraswap, limit_pairs_s),
        # Concurrency 1: loraswap's round trip against one pair alone in-process (tokenize, forward, softmax).
        "single_requests": args.single,
        "limit_single": limit.get("single") if limit else None,
        "single_p50_ratio": _single_ratio(systems, limit, "p50_ms", "p50_ms"),
        # Like for like: the pairs' own lengths spread the in-process times (its p99 is about twice its
        # p50 on the NLI samples), so a tail is compared with the tail of the same pairs alone in-process.
        "single_p99_ratio": _single_ratio(systems, limit, "p99_ms", "p99_ms"),
        "single_p99_over_inprocess_p50": _single_ratio(systems, limit, "p99_ms", "p50_ms"),
        "wall_s": round(wall_s, 1),
        **machine.run_record(description, "benchmarks.serving", argv),
    }


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    # One line per request from httpx, a load report per model from transformers: noise here.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> dict:
    configure_logging()
    args = parse_args(argv)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: torch sees no CUDA device here")
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = args.out / "logs"
    description = machine.describe(args.device)
    logger.info(
        "machine: %s, %d cores, load %s", description["cpu"], description["cores"], description["load_average_1_5_15"]
    )

    # Imported here: torch loads only once the arguments are known to be good.
    from app.inference.base_model import build_classifier, fingerprint, resolve_base
    from benchmarks.limit import LimitRunner
    from benchmarks.merged_base import build_merged_base

    with ExitStack() as stack:
        work = args.work or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loraswap-bench-")))
        spec = resolve_base(args.base, random_init=args.random_init)
        base_fingerprint = fingerprint(build_classifier(spec, num_labels=3))
        adapters = prepare_adapters(spec, args.adapters, work / "adapters", base_fingerprint=base_fingerprint)
        pairs = load_pairs()
        plan = build_plan(pairs, adapters.names, args.popularity, args.requests, seed=args.seed)
        warmup = build_plan(pairs, adapters.names, args.popularity, args.warmup, seed=args.seed + 1000)
        merged = None
        if {"merged", "limit"} & set(args.systems):
            first = adapters.names[0]
            merged = build_merged_base(spec, adapters.path(first), work / "merged", adapter_name=first)
        logger.info(
            "setup done in %.1f s (%s adapters: %s)", time.perf_counter() - started, adapters.kind, adapters.names
        )

        servers: dict[str, ServerProcess] = {}
        plans: dict[str, tuple[list[PlannedRequest], list[PlannedRequest]]] = {}
        if "loraswap" in args.systems:
            port = free_port()
            env = server_env(args, base=args.base, random_init=args.random_init, adapters_dir=adapters.root,
                             default=adapters.names[0])
            servers["loraswap"] = ServerProcess("loraswap", loraswap_command(port), port=port, env=env,
                                                log_path=log_dir / "loraswap.log")
            plans["loraswap"] = (warmup, plan)
        if "naive_peft" in args.systems:
            servers["naive_peft"] = naive_server(args, adapters, log_dir)
            plans["naive_peft"] = (warmup, plan)
        if "merged" in args.systems:
            port = free_port()
            env = server_env(args, base=str(merged.base_dir), random_init=False, adapters_dir=merged.adapters_dir,
                             default=merged.adapter_name)
            servers["merged"] = ServerProcess("merged", loraswap_command(port), port=port, env=env,
                                              log_path=log_dir / "merged.log")
            plans["merged"] = (retarget(warmup, merged.adapter_name), retarget(plan, merged.adapter_name))
        # Registered before launching, so every started server is stopped, whatever happens next.
        for server in servers.values():
            stack.callback(server.stop)
        for server in servers.values():
            server.launch()
        for server in servers.values():
            server.wait_ready()
        for name in ("loraswap", "merged"):
            if name in servers:
                check_adapters_ready(servers[name].url, adapters.names if name == "loraswap" else [merged.adapter_name])
        limit = None
        if "limit" in args.systems:
            limit = LimitRunner(merged.base_dir, device=args.device, batch_size=args.limit_batches[0],
                                max_seq_len=args.max_seq_len, torch_threads=args.torch_threads)
            # The best this machine does in-process: both forwards and every batch size, at the servers'
            # thread count (the sweep also records all cores, for the record).
            limit.calibrate([r.pair for r in plan[:CALIBRATION_PAIRS]], batch_sizes=args.limit_batches,
                            thread_counts=(os.cpu_count() or 1,))
            plans["limit"] = (warmup, plan)
        logger.info("%d rounds of up to %d requests per system at concurrency %d", args.rounds,
                    -(-args.requests // args.rounds), args.concurrency)
        measured = asyncio.run(measure(servers, plans, limit, args))

    results = assemble_results(
        args, base=spec.display_id, adapters=adapters,
        systems={n: s for n, s in measured.items() if n != "limit"}, limit=measured.get("limit"),
        description=description, wall_s=time.perf_counter() - started,
        argv=sys.argv[1:] if argv is None else argv,
    )
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    write_report(results, args.out)
    print((args.out / "results.md").read_text())
    print(f"wrote {args.out / 'results.json'}, results.md, throughput.png, latency.png in {results['wall_s']} s")
    return results


if __name__ == "__main__":
    main()
