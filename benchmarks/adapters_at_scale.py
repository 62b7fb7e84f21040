"""Adapters at scale: 1,000 adapters on one base through loraswap's disk/host/device tiers, against
the same server with only its 3 shipped adapters and against a PEFT hot-swap LRU server.

Each scenario is one server process serving one adapter pool under one popularity law: `few` (the
shipped mnli/snli/rte, Zipf), `loraswap-r16-zipf`, `loraswap-r16-uniform`, `peft_lru-r16-uniform`,
... All servers are started one after another (so each time to ready is its own), warmed up, then
measured in interleaved rounds as in benchmarks.serving. Per scenario: throughput, latency, errors,
loads and hit rates per tier (loraswap's GET /adapters and /metrics, the baseline's GET /stats),
time to ready and the server's RSS (its peak from warm-up to the end: the kernel's VmHWM, or psutil samples). It writes results.json,
results.md, throughput.png and latency.png and checks the targets of issue 10.

    python -m benchmarks.adapters_at_scale --quick          # < 5 min on 2 cores once the pools are cached
    python -m benchmarks.adapters_at_scale                  # both ranks x both popularities, longer rounds
    python -m benchmarks.adapters_at_scale --ranks 16 --count 200 --out /tmp/scale
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import re
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from app.artifacts import write_json_atomic
from benchmarks import machine
from benchmarks.adapter_pool import adapter_file_bytes, prepare_pool
from benchmarks.adapter_sets import AdapterSet, prepare_adapters
from benchmarks.loadgen import LoadResult, make_client, run_closed_loop, warm_up
from benchmarks.scale_report import write_scale_report
from benchmarks.servers import ServerProcess, free_port, histogram_delta, loraswap_command, scrape_histogram
from benchmarks.serving import DEFAULT_TORCH_THREADS, configure_logging, ratio, server_env, slices
from benchmarks.workload import PlannedRequest, build_plan, load_pairs

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
QUICK = {"requests": 2000, "duration": 16.0, "warmup": 128, "rounds": 2}
FULL = {"requests": 8000, "duration": 60.0, "warmup": 256, "rounds": 3}
TIERS = ("disk", "host", "device")
# Targets of issue 10.
MIN_RATIO_VS_FEW = 0.8  # Zipf, all adapters: throughput at least this share of the 3-adapter server's
MIN_RATIO_VS_PEFT_LRU = 5.0  # uniform, all adapters: at least this many times the PEFT hot-swap server
MAX_READY_S = 15.0  # time to ready with every adapter known
RSS_SLACK = 1.3  # RSS at most the base's plus host tier x adapter file size x this
METRIC_LINE = re.compile(r"^(?P<series>loraswap_adapter\w*(?:\{[^}]*\})?) (?P<value>\S+)$")


@dataclass(frozen=True)
class Scenario:
    """One server: a system, the adapters it serves and the popularity its traffic follows."""

    name: str
    system: str  # "loraswap" or "peft_lru"
    adapters: AdapterSet
    popularity: str
    rank: int | None  # the pool's LoRA rank; None for the shipped adapters

    @property
    def default(self) -> str:
        return self.adapters.names[0]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run: %s; rank 64 uniform only" % QUICK)
    parser.add_argument("--out", type=Path, help="results directory (default: docs/benchmarks/adapters-at-scale[-quick])")
    parser.add_argument("--count", type=int, default=1000, help="adapters in each synthetic pool")
    parser.add_argument("--ranks", default="16,64", help="LoRA ranks of the pools, comma-separated (first: the main one)")
    parser.add_argument("--device-slots", type=int, default=16, help="LORASWAP_MAX_RESIDENT_ADAPTERS")
    parser.add_argument("--host-adapters", type=int, default=64, help="LORASWAP_MAX_HOST_ADAPTERS")
    parser.add_argument("--max-lora-rank", type=int, default=64, help="LORASWAP_MAX_LORA_RANK, every loraswap server")
    parser.add_argument("--peft-max-loaded", type=int, default=25, help="adapters the PEFT LRU server keeps loaded")
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop workers, one request in flight each")
    parser.add_argument("--requests", type=int, help="measured requests per scenario, all rounds (upper bound)")
    parser.add_argument("--duration", type=float, help="measured seconds per scenario, all rounds (upper bound)")
    parser.add_argument("--rounds", type=int, help="interleaved measurement rounds")
    parser.add_argument("--warmup", type=int, help="untimed requests per scenario before measuring")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--base", default="embedded", help="base: embedded, roberta-large, or a directory")
    parser.add_argument("--random-init", action="store_true", help="random base weights")
    parser.add_argument(
        "--torch-threads", type=int, default=DEFAULT_TORCH_THREADS, help="torch CPU threads, every server (%(default)s)"
    )
    parser.add_argument("--max-seq-len", type=int, default=256, help="tokens a pair is truncated to, everywhere")
    parser.add_argument("--systems", default="loraswap,peft_lru", help="loraswap, peft_lru or both")
    parser.add_argument("--pool-root", type=Path, help="where pools are cached (default: a folder in the temp dir)")
    parser.add_argument(
        "--server-env", action="append", default=[], metavar="KEY=VALUE", help="extra setting for every loraswap server"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.out is None:
        args.out = REPO_ROOT / "docs/benchmarks" / ("adapters-at-scale-quick" if args.quick else "adapters-at-scale")
    args.ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if not args.ranks or set(args.systems) - {"loraswap", "peft_lru"} or args.count < 2:
        parser.error("need at least one rank, at least two adapters, and systems among loraswap, peft_lru")
    if args.rounds < 1 or args.requests < args.rounds:
        parser.error("need at least one round and one request per round")
    if max(args.ranks) > args.max_lora_rank:
        parser.error(f"--max-lora-rank {args.max_lora_rank} is below rank {max(args.ranks)}")
    return args


def plan_scenarios(args: argparse.Namespace, few: AdapterSet, pools: dict[int, AdapterSet]) -> list[Scenario]:
    """`few` first (when loraswap runs), then per rank and popularity loraswap and the PEFT LRU
    server; --quick measures the ranks after the first under uniform popularity only."""
    scenarios = [Scenario("few", "loraswap", few, "zipf", None)] if "loraswap" in args.systems else []
    for i, rank in enumerate(args.ranks):
        laws = ("uniform",) if args.quick and i > 0 else ("zipf", "uniform")
        for law in laws:
            for system in ("loraswap", "peft_lru"):
                if system in args.systems:
                    scenarios.append(Scenario(f"{system}-r{rank}-{law}", system, pools[rank], law, rank))
    return scenarios


def loraswap_env(args: argparse.Namespace, scenario: Scenario) -> dict[str, str]:
    """benchmarks.serving's settings (fraud off, admission by wait off, same threads and sequence
    length) plus the tiers; --server-env last, so it can override any of them."""
    tiers = [
        f"LORASWAP_MAX_RESIDENT_ADAPTERS={args.device_slots}",
        f"LORASWAP_MAX_HOST_ADAPTERS={args.host_adapters}",
        f"LORASWAP_MAX_LORA_RANK={args.max_lora_rank}",
    ]
    serving_args = argparse.Namespace(**{
        **vars(args), "adapters": args.device_slots, "server_env": [*tiers, *args.server_env],
    })
    return server_env(serving_args, base=args.base, random_init=args.random_init,
                      adapters_dir=scenario.adapters.root, default=scenario.default)


def start_server(args: argparse.Namespace, scenario: Scenario, log_dir: Path) -> ServerProcess:
    port = free_port()
    log_path = log_dir / f"{scenario.name}.log"
    if scenario.system == "loraswap":
        return ServerProcess(scenario.name, loraswap_command(port), port=port, env=loraswap_env(args, scenario),
                             log_path=log_path)
    command = [
        sys.executable, "-m", "benchmarks.baselines.peft_lru",
        "--adapters-dir", str(scenario.adapters.root), "--default", scenario.default,
        "--max-loaded", str(args.peft_max_loaded), "--base", args.base, "--device", args.device,
        "--torch-threads", str(args.torch_threads), "--max-seq-len", str(args.max_seq_len), "--port", str(port),
    ]
    if args.random_init:
        command.append("--random-init")
    return ServerProcess(scenario.name, command, port=port, log_path=log_path)


# -- what the servers say about their tiers ----------------------------------------------------------


def adapter_tier(adapter: dict) -> str:
    """An adapter's tier from GET /adapters: its `tier` field; a server without tiers holds every
    ready adapter in memory, so `resident` tells device from host there."""
    if adapter.get("tier") in TIERS:
        return adapter["tier"]
    if adapter.get("state") != "ready":
        return "disk"
    return "device" if adapter.get("resident") else "host"


def summarize_listing(listing: list[dict]) -> dict:
    """Counts over GET /adapters: adapters per tier and state, pinned, and the per-adapter counters."""
    tiers = {tier: 0 for tier in TIERS}
    states: dict[str, int] = {}
    for adapter in listing:
        tiers[adapter_tier(adapter)] += 1
        states[adapter.get("state", "?")] = states.get(adapter.get("state", "?"), 0) + 1
    return {
        "known": len(listing),
        "tiers": tiers,
        "states": states,
        "pinned": sum(bool(a.get("pinned")) for a in listing),
        "loads": sum(int(a.get("loads") or 0) for a in listing),
        "host_evictions": sum(int(a.get("host_evictions") or 0) for a in listing),
        "requests": sum(int(a.get("requests") or 0) for a in listing),
    }


def parse_adapter_metrics(text: str) -> dict[str, float]:
    """Every `loraswap_adapter*` sample of a /metrics page, keyed by series (name and labels)."""
    samples = {}
    for line in text.splitlines():
        match = METRIC_LINE.match(line)
        if match:
            samples[match.group("series")] = float(match.group("value"))
    return samples


def metric_total(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of `name` (with or without the `_total` suffix) whose labels include `labels`."""
    total = 0.0
    for series, value in samples.items():
        series_name, _, label_text = series.partition("{")
        if series_name not in (name, f"{name}_total"):
            continue
        if all(f'{key}="{value_}"' in label_text for key, value_ in labels.items()):
            total += value
    return total


def probe(client: httpx.Client, scenario: Scenario, url: str) -> dict:
    """One look at a server's adapter state: loraswap's GET /adapters and /metrics, the baseline's /stats."""
    if scenario.system == "peft_lru":
        return {"stats": client.get(f"{url}/stats").json()}
    listing = client.get(f"{url}/adapters").json()["adapters"]
    metrics = client.get(f"{url}/metrics")
    return {
        "listing": summarize_listing(listing),
        "metrics": parse_adapter_metrics(metrics.text) if metrics.status_code == 200 else {},
        "batch_sizes": scrape_histogram(client, "loraswap_batch_size_pairs", base_url=url),
    }


def share(part: float, whole: float) -> float | None:
    return round(part / whole, 4) if whole > 0 else None


def tier_activity(scenario: Scenario, before: dict, after: dict, pairs: int) -> dict:
    """What the measured phase did to the tiers, from two probes.

    loraswap: `disk_loads` (disk to host: the sum of GET /adapters `loads`, or /metrics
    `loraswap_adapter_loads` where the listing has none), `host_evictions` (GET /adapters),
    `device_moves` and `device_evictions` (host to device and out: /metrics `loraswap_adapter_moves`,
    `loraswap_adapter_evictions`). Hit rates per pair:
    device = 1 - device moves / pairs; host = the share of device misses found in host memory,
    1 - disk loads / device moves. A load that serves several pairs of one batch counts once, so
    these are the pairs that did not wait for a load. The baseline has one tier (PeftModel, LRU).
    """
    if scenario.system == "peft_lru":
        loads = after["stats"]["loads"] - before["stats"]["loads"]
        hits = after["stats"]["hits"] - before["stats"]["hits"]
        load_s = after["stats"]["load_s"] - before["stats"]["load_s"]
        return {
            "loads": loads,
            "evictions": after["stats"]["evictions"] - before["stats"]["evictions"],
            "hit_rate": share(hits, hits + loads),
            "load_ms_mean": round(1000.0 * load_s / loads, 2) if loads else None,
            "loaded_at_end": len(after["stats"]["loaded"]),
        }
    m0, m1 = before["metrics"], after["metrics"]

    def counted(name: str, **labels: str) -> int:
        return int(metric_total(m1, name, **labels) - metric_total(m0, name, **labels))

    moves = counted("loraswap_adapter_moves")
    disk_loads = after["listing"]["loads"] - before["listing"]["loads"]
    if not after["listing"]["loads"]:  # a server without per-adapter loads (before the tiers)
        disk_loads = counted("loraswap_adapter_loads", outcome="ok")
    deltas = {k: round(v - m0.get(k, 0.0), 3) for k, v in m1.items() if v - m0.get(k, 0.0) and "_bucket{" not in k}
    load_s = metric_total(m1, "loraswap_adapter_load_seconds_sum") - metric_total(m0, "loraswap_adapter_load_seconds_sum")
    timed_loads = counted("loraswap_adapter_load_seconds_count")
    return {
        "disk_loads": disk_loads,
        "load_ms_mean": round(1000.0 * load_s / timed_loads, 2) if timed_loads else None,
        "host_evictions": after["listing"]["host_evictions"] - before["listing"]["host_evictions"],
        "device_moves": moves,
        "device_evictions": counted("loraswap_adapter_evictions"),
        "device_hit_rate": share(pairs - moves, pairs),
        "host_hit_rate": share(moves - disk_loads, moves),
        "tiers_at_end": after["listing"]["tiers"],
        "states_at_end": after["listing"]["states"],
        "metrics_delta": deltas,
        "batch_sizes": histogram_delta(before["batch_sizes"], after["batch_sizes"]),
    }


# -- memory ------------------------------------------------------------------------------------------


class RssSampler:
    """The RSS of some processes from warm-up to the end: each one's peak and last value.

    The peak is the kernel's own high-water mark where Linux keeps one (`VmHWM` in /proc/<pid>/status,
    reset on entry by writing 5 to /proc/<pid>/clear_refs): every page the process ever had resident at
    once, including a forward's activations between two samples. Elsewhere, the most psutil saw,
    sampled every `interval_s` in a thread (`peak_source` says which). The samples also give `last`.
    """

    def __init__(self, pids: dict[str, int], interval_s: float = 0.25):
        self.processes = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.sampled_peak = {name: 0 for name in pids}
        self.last = {name: 0 for name in pids}
        self.kernel_peak: dict[str, int] = {}
        self._kernel_marks = False
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    @property
    def peak(self) -> dict[str, int]:
        return {name: self.kernel_peak.get(name, sampled) for name, sampled in self.sampled_peak.items()}

    @property
    def peak_source(self) -> str:
        return "VmHWM" if len(self.kernel_peak) == len(self.processes) else "sampled"

    def sample(self) -> None:
        for name, process in self.processes.items():
            try:
                rss = process.memory_info().rss
            except psutil.Error:
                continue
            self.last[name] = rss
            self.sampled_peak[name] = max(self.sampled_peak[name], rss)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> RssSampler:
        self._kernel_marks = all(reset_peak_rss(p.pid) for p in self.processes.values())
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        if self._kernel_marks:
            for name, process in self.processes.items():
                mark = peak_rss(process.pid)
                if mark is not None:
                    self.kernel_peak[name] = max(mark, self.sampled_peak[name])


def reset_peak_rss(pid: int) -> bool:
    """Reset the kernel's RSS high-water mark of `pid` to its RSS now (Linux 4.0+; our own processes)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return peak_rss(pid) is not None


def peak_rss(pid: int) -> int | None:
    """`VmHWM` of /proc/<pid>/status in bytes, None where there is none."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# -- the run -----------------------------------------------------------------------------------------


def start_all(args, scenarios: list[Scenario], stack: ExitStack, log_dir: Path) -> dict[str, dict]:
    """Each server started alone and waited for, so its time to ready is its own; then what it knows
    at that moment (adapters listed per tier) and its RSS."""
    servers, at_ready = {}, {}
    for scenario in scenarios:
        server = start_server(args, scenario, log_dir)
        stack.callback(server.stop)  # registered before launching: stopped whatever happens next
        server.start()
        servers[scenario.name] = server
        with httpx.Client(timeout=60) as client:
            listing = client.get(f"{server.url}/adapters").json()["adapters"] if scenario.system == "loraswap" else []
        at_ready[scenario.name] = {
            "adapter_file_bytes": adapter_file_bytes(scenario.adapters),
            "ready_s": round(server.startup_s, 2),
            "rss_ready_bytes": psutil.Process(server.pid).memory_info().rss,
            **({"at_ready": summarize_listing(listing)} if scenario.system == "loraswap" else {}),
        }
    return {"servers": servers, "at_ready": at_ready}


async def measure(args, scenarios: list[Scenario], servers: dict[str, ServerProcess],
                  plans: dict[str, tuple[list[PlannedRequest], list[PlannedRequest]]]) -> dict[str, dict]:
    """Warm every server up, then the interleaved rounds; RSS followed throughout (peak and samples)."""
    names = [s.name for s in scenarios]
    by_name = {s.name: s for s in scenarios}
    clients = {n: make_client(servers[n].url, args.concurrency) for n in names}
    phases: dict[str, list[LoadResult]] = {n: [] for n in names}
    warm_errors: dict[str, dict] = {}
    try:
        with RssSampler({n: servers[n].pid for n in names}) as rss, httpx.Client(timeout=120) as scraper:
            for name in names:
                warm = await warm_up(clients[name], plans[name][0], concurrency=args.concurrency)
                warm_errors[name] = warm.errors_by_kind
                logger.info("%s warmed up: %.1f pairs/s, %d errors", name, warm.throughput_pairs_s, warm.errors)
            before = {n: probe(scraper, by_name[n], servers[n].url) for n in names}
            cpu_before = {n: servers[n].cpu_s() for n in names}
            for round_index in range(args.rounds):
                order = names[round_index % len(names):] + names[: round_index % len(names)]
                for name in order:
                    part = slices(plans[name][1], args.rounds)[round_index]
                    result = await run_closed_loop(clients[name], part, concurrency=args.concurrency,
                                                   max_duration_s=args.duration / args.rounds)
                    phases[name].append(result)
                    logger.info("round %d %s: %.1f pairs/s, p99 %s ms, %d errors", round_index, name,
                                result.throughput_pairs_s, result.percentile_ms(99), result.errors)
            cpu = {n: servers[n].cpu_s() - cpu_before[n] for n in names}
            after = {n: probe(scraper, by_name[n], servers[n].url) for n in names}
    finally:
        for client in clients.values():
            await client.aclose()
    out = {}
    for name in names:
        result = LoadResult.combined(phases[name])
        out[name] = {
            **result.summary(),
            "warmup_errors": sum(warm_errors[name].values()),
            "warmup_errors_by_kind": warm_errors[name],
            "rounds_pairs_s": [round(p.throughput_pairs_s, 1) for p in phases[name]],
            "server_cpu_ms_per_pair": round(1000.0 * cpu[name] / max(1, result.ok), 2),
            "rss_peak_bytes": rss.peak[name],
            "rss_peak_source": rss.peak_source,
            "rss_peak_sampled_bytes": rss.sampled_peak[name],
            "rss_end_bytes": rss.last[name],
            "tier_activity": tier_activity(by_name[name], before[name], after[name], result.ok),
        }
    return out


def throughput_of(scenarios: dict, name: str) -> float | None:
    return scenarios.get(name, {}).get("throughput_pairs_s")


def check_targets(results: dict) -> list[dict]:
    """Issue 10's targets, each with the measured value, the bound and whether it was met."""
    scenarios, targets = results["scenarios"], []
    for rank in results["ranks"]:
        value = results["ratio_vs_few"].get(f"r{rank}")
        if value is not None:
            targets.append({"target": f"r{rank} Zipf: {results['count']} adapters / 3 adapters", "value": value,
                            "bound": f">= {MIN_RATIO_VS_FEW}", "met": value >= MIN_RATIO_VS_FEW})
        value = results["ratio_vs_peft_lru"].get(f"r{rank}-uniform")
        if value is not None:
            targets.append({"target": f"r{rank} uniform: loraswap / PEFT hot-swap LRU", "value": value,
                            "bound": f">= {MIN_RATIO_VS_PEFT_LRU}", "met": value >= MIN_RATIO_VS_PEFT_LRU})
    loraswap = {n: s for n, s in scenarios.items() if s["system"] == "loraswap"}
    errors = sum(s["errors"] + s["warmup_errors"] for s in loraswap.values())
    targets.append({"target": "loraswap errors (all scenarios, warm-up included)", "value": errors,
                    "bound": "0", "met": errors == 0})
    for name, s in loraswap.items():
        if name == "few":
            continue
        targets.append({"target": f"{name}: ready with {s['known_at_ready']} adapters known (s)",
                        "value": s["ready_s"], "bound": f"< {MAX_READY_S}",
                        "met": s["ready_s"] < MAX_READY_S and s["known_at_ready"] >= results["count"]})
        budget = s.get("rss_budget_bytes")
        if budget:
            targets.append({"target": f"{name}: peak RSS (MB)", "value": round(s["rss_peak_bytes"] / 2**20, 1),
                            "bound": f"<= {budget / 2**20:.1f}", "met": s["rss_peak_bytes"] <= budget})
    return targets


def assemble_results(args, scenarios: list[Scenario], started: dict, measured: dict, *, pool_bytes: dict,
                     description: dict, wall_s: float, argv: list[str]) -> dict:
    """results.json: settings, per-scenario numbers, the ratios, the RSS budgets and the targets."""
    few = measured.get("few")
    out_scenarios = {}
    for scenario in scenarios:
        entry = {
            "system": scenario.system,
            "rank": scenario.rank,
            "popularity": scenario.popularity,
            "adapters": len(scenario.adapters.names),
            **started[scenario.name],
            **measured[scenario.name],
        }
        if scenario.system == "loraswap":
            entry["known_at_ready"] = started[scenario.name]["at_ready"]["known"]
            if few is not None and scenario.name != "few":
                # The base: the 3-adapter server's peak under the same traffic shape (its 3 adapters
                # are negligible); the host tier may add host_adapters x file size x RSS_SLACK.
                entry["rss_budget_bytes"] = round(
                    few["rss_peak_bytes"] + args.host_adapters * entry["adapter_file_bytes"] * RSS_SLACK
                )
        out_scenarios[scenario.name] = entry
    throughput = {n: s["throughput_pairs_s"] for n, s in out_scenarios.items()}
    results = {
        "device": args.device,
        "base": args.base,
        "count": args.count,
        "ranks": args.ranks,
        "adapter_file_bytes": pool_bytes,
        "device_slots": args.device_slots,
        "host_adapters": args.host_adapters,
        "max_lora_rank": args.max_lora_rank,
        "rss_slack": RSS_SLACK,
        "peft_max_loaded": args.peft_max_loaded,
        "concurrency": args.concurrency,
        "torch_threads": args.torch_threads,
        "max_seq_len": args.max_seq_len,
        "zipf_alpha": 1.0,
        "requests_planned": args.requests,
        "max_duration_s": args.duration,
        "rounds": args.rounds,
        "warmup_requests": args.warmup,
        "server_env": args.server_env,
        "scenarios": out_scenarios,
        "ratio_vs_few": {
            f"r{rank}": ratio(throughput.get(f"loraswap-r{rank}-zipf"), throughput.get("few")) for rank in args.ranks
            if f"loraswap-r{rank}-zipf" in throughput
        },
        "ratio_vs_peft_lru": {
            f"r{rank}-{law}": ratio(throughput.get(f"loraswap-r{rank}-{law}"), throughput.get(f"peft_lru-r{rank}-{law}"))
            for rank in args.ranks for law in ("zipf", "uniform")
            if f"loraswap-r{rank}-{law}" in throughput and f"peft_lru-r{rank}-{law}" in throughput
        },
        "wall_s": round(wall_s, 1),
        **machine.run_record(description, "benchmarks.adapters_at_scale", argv),
    }
    results["targets"] = check_targets(results)
    return results


def main(argv: list[str] | None = None) -> dict:
    configure_logging()
    args = parse_args(argv)
    started_at = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    log_dir = REPO_ROOT / "runs/benchmarks/adapters_at_scale/logs"
    description = machine.describe(args.device)
    logger.info("machine: %s, %d cores, load %s", description["cpu"], description["cores"],
                description["load_average_1_5_15"])

    # Imported here: torch loads only once the arguments are known to be good.
    from app.inference.base_model import build_classifier, fingerprint, resolve_base

    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loraswap-scale-")))
        spec = resolve_base(args.base, random_init=args.random_init)
        base_fingerprint = fingerprint(build_classifier(spec, num_labels=3))
        pool_options = {"root": args.pool_root} if args.pool_root else {}
        pools = {rank: prepare_pool(spec, args.count, rank=rank, base_fingerprint=base_fingerprint, **pool_options)
                 for rank in args.ranks}
        few = prepare_adapters(spec, 3, work / "few", base_fingerprint=base_fingerprint)
        scenarios = plan_scenarios(args, few, pools)
        pairs = load_pairs()
        plans = {
            s.name: (build_plan(pairs, s.adapters.names, s.popularity, args.warmup, seed=args.seed + 1000),
                     build_plan(pairs, s.adapters.names, s.popularity, args.requests, seed=args.seed))
            for s in scenarios
        }
        logger.info("setup done in %.1f s; scenarios: %s", time.perf_counter() - started_at,
                    ", ".join(s.name for s in scenarios))
        started = start_all(args, scenarios, stack, log_dir)
        measured = asyncio.run(measure(args, scenarios, started["servers"], plans))

    results = assemble_results(
        args, scenarios, started["at_ready"], measured,
        pool_bytes={f"r{rank}": adapter_file_bytes(pool) for rank, pool in pools.items()},
        description=description, wall_s=time.perf_counter() - started_at,
        argv=sys.argv[1:] if argv is None else argv,
    )
    write_json_atomic(args.out / "results.json", results)
    table, *plots = write_scale_report(results, args.out)
    print(table.read_text())
    met = sum(t["met"] for t in results["targets"])
    print(f"{met} of {len(results['targets'])} targets met; results.json, {table.name} and "
          f"{', '.join(p.name for p in plots)} in {args.out} ({results['wall_s']} s)")
    return results


if __name__ == "__main__":
    main()
