"""A discrete-event simulation of a loraswap fleet, fed by measured costs: which routing policy keeps
adapters on the device and latency low for 10,000 adapters (Zipf) over 8, 64 and 512 replicas.

Two steps:

    nice .venv/bin/python -m benchmarks.fleet_sim measure --out benchmarks/results/fleet_costs.json
    nice .venv/bin/python -m benchmarks.fleet_sim simulate --costs benchmarks/results/fleet_costs.json \
        --out benchmarks/results/fleet_sim.json --plots docs/img

`measure` times, on the embedded base with app.inference.engine: one forward against batch size and
the number of distinct adapters in the batch, an adapter read from disk (disk -> host), and its copy to
the device slots (host -> device). `simulate` replays Poisson arrivals over Zipf-popular adapters
through each routing policy; every replica is a batcher (up to `max_batch` requests, FIFO) whose batch
costs the fitted forward time plus the load of every adapter not already on its device.

Policies: `random`; `least-loaded` (shortest queue, global knowledge); `affine` (each adapter has one
home replica by hashing — Ray's multiplexing without spill-over); `p2c-affinity` (the two hashed homes
of the adapter, the shorter queue wins, unless it is `spill_queue` requests longer than the shorter of
two random replicas, which then takes the request — the spill-over the Ray ingress does with
`spread_inflight`).
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import statistics
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

POLICIES = ("random", "least-loaded", "affine", "p2c-affinity")


# -- costs ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Costs:
    """Seconds. forward(b, k) = base_s + per_row_s * b + per_adapter_s * k (least squares on measurements)."""

    base_s: float
    per_row_s: float
    per_adapter_s: float
    disk_to_host_s: float
    host_to_device_s: float
    measured_on: str = ""
    points: list = field(default_factory=list)

    def forward_s(self, rows: int, distinct: int) -> float:
        return max(0.0, self.base_s + self.per_row_s * rows + self.per_adapter_s * distinct)


def fit(points: list[tuple[int, int, float]]) -> tuple[float, float, float]:
    """Least squares of t = a + b*rows + c*distinct, solved by the 3x3 normal equations."""
    xs = [(1.0, float(r), float(k)) for r, k, _ in points]
    ys = [t for _, _, t in points]
    ata = [[sum(x[i] * x[j] for x in xs) for j in range(3)] for i in range(3)]
    aty = [sum(x[i] * y for x, y in zip(xs, ys)) for i in range(3)]
    # Gaussian elimination with partial pivoting.
    m = [row[:] + [v] for row, v in zip(ata, aty)]
    for col in range(3):
        pivot = max(range(col, 3), key=lambda r: abs(m[r][col]))
        m[col], m[pivot] = m[pivot], m[col]
        for r in range(3):
            if r != col:
                f = m[r][col] / m[col][col]
                m[r] = [a - f * b for a, b in zip(m[r], m[col])]
    return tuple(m[i][3] / m[i][i] for i in range(3))  # type: ignore[return-value]


def measure(adapters_dir: Path, repeats: int) -> Costs:  # pragma: no cover - a benchmark
    import tempfile

    import torch

    from app.inference.base_model import resolve_base
    from app.inference.engine import NLIEngine
    from training.synthetic_adapter import write_random_adapter

    torch.set_num_threads(1)
    spec = resolve_base("embedded")
    engine = NLIEngine(spec, device="cpu", max_seq_len=128, max_resident=64, pinned=set())
    with tempfile.TemporaryDirectory() as tmp:
        paths = [adapters_dir / name for name in ("mnli", "snli", "rte")]
        for i in range(5):
            paths.append(write_random_adapter(spec, Path(tmp) / f"syn{i}", name=f"syn{i}", seed=i,
                                              base_fingerprint=engine.fingerprint))
        reads = []
        weights = []
        for i, path in enumerate(paths):
            started = time.perf_counter()
            weights.append(engine.read_adapter(f"a{i}", path))
            reads.append(time.perf_counter() - started)
        copies = []
        for w in weights:  # into a free device slot (fixed buffers): the host -> device copy
            started = time.perf_counter()
            engine.slots.place([w])
            copies.append(time.perf_counter() - started)
        premise = "A man is playing a guitar on a stage in front of a small crowd."
        hypothesis = "A person is making music."
        points = []
        for rows in (1, 4, 8, 16, 32):
            for distinct in (1, 2, 4, 8):
                if distinct > rows:
                    continue
                encoded = engine.encode([premise] * rows, [hypothesis] * rows)
                chosen = [weights[i % distinct] for i in range(rows)]
                engine.run(encoded, chosen)  # warm
                times = []
                for _ in range(repeats):
                    started = time.perf_counter()
                    engine.run(encoded, chosen)
                    times.append(time.perf_counter() - started)
                points.append((rows, distinct, statistics.median(times)))
    a, b, c = fit(points)
    return Costs(a, b, c, statistics.median(reads), statistics.median(copies),
                 measured_on="embedded base (all-MiniLM-L6-v2), CPU, 1 torch thread, 2-core shared machine",
                 points=points)


# -- simulation -------------------------------------------------------------------------------------------
@dataclass
class Replica:
    device_slots: int
    host_slots: int
    queue: list = field(default_factory=list)  # (arrival_s, adapter)
    busy_until: float = 0.0
    busy: bool = False
    device: OrderedDict = field(default_factory=OrderedDict)
    host: OrderedDict = field(default_factory=OrderedDict)

    def holds(self, adapter: int) -> bool:
        return adapter in self.device

    def load_cost(self, adapter: int, costs: Costs) -> tuple[float, bool]:
        """The cost of making `adapter` resident, and whether it already was (LRU updated)."""
        if adapter in self.device:
            self.device.move_to_end(adapter)
            return 0.0, True
        cost = costs.host_to_device_s
        if adapter in self.host:
            self.host.move_to_end(adapter)
        else:
            cost += costs.disk_to_host_s
            self.host[adapter] = True
            if len(self.host) > self.host_slots:
                self.host.popitem(last=False)
        self.device[adapter] = True
        if len(self.device) > self.device_slots:
            self.device.popitem(last=False)
        return cost, False


@dataclass(frozen=True)
class SimConfig:
    replicas: int
    adapters: int = 10_000
    zipf_s: float = 1.1
    load_factor: float = 0.7  # arrival rate / fleet capacity at full single-adapter batches
    requests_per_replica: int = 300
    warmup_share: float = 0.2
    max_batch: int = 32
    device_slots: int = 64
    host_slots: int = 1024
    spill_queue: int = 64
    seed: int = 0


def zipf_sampler(n: int, s: float, rng: random.Random) -> Callable[[], int]:
    weights = [1.0 / (rank**s) for rank in range(1, n + 1)]
    total = sum(weights)
    cumulative, acc = [], 0.0
    for w in weights:
        acc += w / total
        cumulative.append(acc)
    import bisect

    return lambda: min(n - 1, bisect.bisect_left(cumulative, rng.random()))


def _home(adapter: int, salt: int, replicas: int) -> int:
    return hash((adapter, salt)) % replicas


def choose(policy: str, adapter: int, loads: list[int], rng: random.Random, spill_queue: int) -> int:
    """The replica for a request; `loads[r]` is replica r's queued plus in-service requests."""
    n = len(loads)
    if policy == "random":
        return rng.randrange(n)
    if policy == "least-loaded":
        return loads.index(min(loads))
    if policy == "affine":
        return _home(adapter, 0, n)
    if policy == "p2c-affinity":
        a, b = _home(adapter, 0, n), _home(adapter, 1, n)
        home = a if loads[a] <= loads[b] else b
        x, y = rng.randrange(n), rng.randrange(n)
        other = x if loads[x] <= loads[y] else y
        # Stay home unless it is `spill_queue` requests longer than the better of two random replicas:
        # a hot adapter spills, while a fleet that is busy everywhere keeps its affinity.
        return home if loads[home] <= loads[other] + spill_queue else other
    raise ValueError(policy)


def simulate(policy: str, config: SimConfig, costs: Costs) -> dict:
    """Run one policy; returns device hit rate, throughput and latency percentiles (after warm-up)."""
    rng = random.Random(config.seed)
    sample = zipf_sampler(config.adapters, config.zipf_s, rng)
    fleet = [Replica(config.device_slots, config.host_slots) for _ in range(config.replicas)]
    loads = [0] * config.replicas
    full_batch_s = costs.forward_s(config.max_batch, 1)
    capacity_rps = config.replicas * config.max_batch / full_batch_s
    rate = config.load_factor * capacity_rps
    total = config.requests_per_replica * config.replicas
    warmup = int(total * config.warmup_share)
    events: list = []  # (time, kind, seq, payload)
    seq = 0
    t = 0.0
    for i in range(total):
        t += rng.expovariate(rate)
        events.append((t, 0, i, sample()))
    heapq.heapify(events)
    seq = total
    latencies: list[float] = []
    hits = misses = 0
    first_measured = last_done = None
    counted = 0

    def start(r: int, now: float) -> None:
        nonlocal seq, hits, misses
        replica = fleet[r]
        batch, replica.queue = replica.queue[: config.max_batch], replica.queue[config.max_batch :]
        load_s = 0.0
        distinct = {}
        for arrival, adapter, index in batch:
            if adapter in distinct:
                continue
            cost, hit = replica.load_cost(adapter, costs)
            distinct[adapter] = hit
            load_s += cost
        for arrival, adapter, index in batch:
            if index >= warmup:
                if distinct[adapter]:
                    hits += 1
                else:
                    misses += 1
        done = now + load_s + costs.forward_s(len(batch), len(distinct))
        replica.busy = True
        heapq.heappush(events, (done, 1, seq, (r, batch)))
        seq += 1

    while events:
        now, kind, index, payload = heapq.heappop(events)
        if kind == 0:  # an arrival: `index` is its place in the arrival order
            r = choose(policy, payload, loads, rng, config.spill_queue)
            loads[r] += 1
            fleet[r].queue.append((now, payload, index))
            if not fleet[r].busy:
                start(r, now)
        else:
            r, batch = payload
            for arrival, adapter, index in batch:
                if index >= warmup:
                    latencies.append(now - arrival)
                    counted += 1
                    first_measured = arrival if first_measured is None else min(first_measured, arrival)
            last_done = now
            loads[r] -= len(batch)
            fleet[r].busy = False
            if fleet[r].queue:
                start(r, now)
    latencies.sort()
    span = (last_done or 0.0) - (first_measured or 0.0)
    return {
        "policy": policy,
        "replicas": config.replicas,
        "device_hit_rate": round(hits / max(1, hits + misses), 4),
        "throughput_rps": round(counted / span, 1) if span > 0 else 0.0,
        "offered_rps": round(rate, 1),
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 2),
        "p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 2),
    }


def plot(results: list[dict], out_dir: Path, name: str = "fleet_sim.png") -> list[Path]:  # pragma: no cover - a figure
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    sizes = sorted({r["replicas"] for r in results})
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for ax, metric, label in zip(
        axes, ("device_hit_rate", "throughput_rps", "p99_ms"), ("device hit rate", "throughput (req/s)", "p99 (ms)")
    ):
        width = 0.8 / len(POLICIES)
        for j, policy in enumerate(POLICIES):
            values = [next(r[metric] for r in results if r["policy"] == policy and r["replicas"] == n) for n in sizes]
            ax.bar([i + j * width for i in range(len(sizes))], values, width, label=policy)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sizes))], [f"{n} replicas" for n in sizes])
        ax.set_title(label)
        if metric == "p99_ms":
            ax.set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.suptitle("fleet_sim: 10,000 adapters (Zipf), routing policies")
    fig.tight_layout()
    path = out_dir / name
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def main(argv: list[str] | None = None) -> None:  # pragma: no cover - a CLI
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--adapters-dir", type=Path, default=Path(__file__).resolve().parent.parent / "adapters")
    m.add_argument("--repeats", type=int, default=5)
    m.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("simulate")
    s.add_argument("--costs", type=Path, required=True)
    s.add_argument("--replicas", type=int, nargs="+", default=[8, 64, 512])
    s.add_argument("--requests-per-replica", type=int, default=300)
    s.add_argument("--load-factor", type=float, default=0.7)
    s.add_argument("--device-slots", type=int, default=64)
    s.add_argument("--spill-queue", type=int, default=64, help="p2c-affinity spills past this many queued")
    s.add_argument("--disk-to-host-s", type=float, default=None,
                   help="replace the measured disk -> host load time (a what-if, e.g. a larger adapter)")
    s.add_argument("--plot-name", default="fleet_sim.png")
    s.add_argument("--out", type=Path, default=None)
    s.add_argument("--plots", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.command == "measure":
        costs = measure(args.adapters_dir, args.repeats)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(asdict(costs), indent=2) + "\n")
        print(json.dumps(asdict(costs), indent=2))
        return
    raw = json.loads(args.costs.read_text())
    if args.disk_to_host_s is not None:
        raw["disk_to_host_s"] = args.disk_to_host_s
    costs = Costs(**raw)
    results = []
    for n in args.replicas:
        config = SimConfig(replicas=n, requests_per_replica=args.requests_per_replica,
                           load_factor=args.load_factor, device_slots=args.device_slots,
                           spill_queue=args.spill_queue)
        for policy in POLICIES:
            result = simulate(policy, config, costs)
            results.append(result)
            print(json.dumps(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        config = {"spill_queue": args.spill_queue, "device_slots": args.device_slots,
                  "load_factor": args.load_factor, "requests_per_replica": args.requests_per_replica}
        args.out.write_text(json.dumps({"costs": raw, "config": config, "results": results}, indent=2) + "\n")
    if args.plots:
        plot(results, args.plots, args.plot_name)


if __name__ == "__main__":
    main()
