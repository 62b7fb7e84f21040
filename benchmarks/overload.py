"""Overload benchmark: a real server is offered a multiple of its measured capacity; it reports how fast
the excess is refused, the latency of what is admitted against the bound the settings imply, and the
goodput kept. `python -m benchmarks.overload --help`; docs/reliability.md quotes its figures.

The measurement (`run_overload`) is also what tests/reliability/test_real_server.py drives to assert
behaviour (nothing lost, every refusal a 503 with Retry-After, every answer correct); the figures are
reported here and asserted nowhere."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from benchmarks.machine import describe
from benchmarks.servers import REPO_ROOT, ServerProcess, free_port
from benchmarks.traffic import (
    PAIRS_PER_REQUEST,
    Outcome,
    References,
    batch_body,
    check_batch,
    closed_loop,
    open_loop,
    percentile,
    warm_up_and_reference,
)

logger = logging.getLogger(__name__)

CAPACITY_CLIENTS = 8
SLACK_S = 1.0  # added to the latency bound for a shared machine


@dataclass
class OverloadRun:
    """One overload run: the capacity measured first, then what an open loop at `factor` times it got."""

    adapters: tuple[str, ...]
    max_queue_wait_ms: int
    max_batch_pairs: int
    full_batch_s: float  # worst of a few full batches, before the capacity phase
    capacity_s: float
    capacity_outcomes: list[Outcome]
    overload_s: float
    offered_rps: float
    outcomes: list[Outcome]
    wrong: list[tuple[int, str]]  # (request index, what is wrong) of accepted answers

    @property
    def capacity_rps(self) -> float:
        return sum(1 for o in self.capacity_outcomes if o.status == 200) / self.capacity_s

    @property
    def accepted(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == 200]

    @property
    def refused(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status is not None and o.status != 200]

    @property
    def unanswered(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.status is None]

    @property
    def latency_bound_s(self) -> float:
        """What an admitted request may take: the queue's wait bound, two full batches, some slack."""
        return self.max_queue_wait_ms / 1000 + 2 * self.full_batch_s + SLACK_S

    def figures(self) -> dict:
        accepted = [o.latency_s for o in self.accepted]
        refused = [o.latency_s for o in self.refused]
        goodput = len(self.accepted) * PAIRS_PER_REQUEST / self.overload_s
        capacity_pairs = self.capacity_rps * PAIRS_PER_REQUEST
        accepted_p99 = percentile(accepted, 99)
        return {
            "adapters": list(self.adapters),
            "max_queue_wait_ms": self.max_queue_wait_ms,
            "max_batch_pairs": self.max_batch_pairs,
            "pairs_per_request": PAIRS_PER_REQUEST,
            "full_batch_s": round(self.full_batch_s, 3),
            "capacity_measured_for_s": self.capacity_s,
            "capacity_phase_refused": sum(1 for o in self.capacity_outcomes if o.status != 200),
            "capacity_requests_per_s": round(self.capacity_rps, 1),
            "capacity_pairs_per_s": round(capacity_pairs, 1),
            "offered_requests_per_s": round(self.offered_rps, 1),
            "offered_over_capacity": round(self.offered_rps / self.capacity_rps, 2) if self.capacity_rps else None,
            "overload_for_s": self.overload_s,
            "overload_requests": len(self.outcomes),
            "accepted": len(self.accepted),
            "refused": len(self.refused),
            "refused_by_status": {str(s): sum(1 for o in self.refused if o.status == s) for s in sorted({o.status for o in self.refused})},
            "unanswered": len(self.unanswered),
            "wrong_answers": len(self.wrong),
            "accepted_p50_s": _round(percentile(accepted, 50), 3),
            "accepted_p99_s": _round(accepted_p99, 3),
            "accepted_max_s": _round(max(accepted, default=None), 3),
            "latency_bound_s": round(self.latency_bound_s, 3),
            "accepted_p99_within_bound": None if accepted_p99 is None else accepted_p99 < self.latency_bound_s,
            "refused_p50_s": _round(percentile(refused, 50), 4),
            "refused_p99_s": _round(percentile(refused, 99), 4),
            "goodput_pairs_per_s": round(goodput, 1),
            "goodput_over_capacity": round(goodput / capacity_pairs, 2) if capacity_pairs else None,
        }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def run_overload(
    base_url: str,
    adapters: Sequence[str],
    references: References,
    *,
    max_queue_wait_ms: int,
    max_batch_pairs: int,
    capacity_s: float,
    overload_s: float,
    factor: float = 2.0,
) -> OverloadRun:
    """Time a few full batches, measure capacity with a closed loop, then offer `factor` times that
    capacity in an open loop of mixed-adapter batches and check every accepted answer."""
    adapters = tuple(adapters)
    make = lambda i: ("POST", "/nli/batch", batch_body(i, adapters))  # noqa: E731
    full_batch = []
    with httpx.Client(base_url=base_url, timeout=60) as http:
        for index in range(3):
            started = time.perf_counter()
            response = http.post("/nli/batch", json=batch_body(index, adapters, max_batch_pairs))
            assert response.status_code == 200, response.text
            full_batch.append(time.perf_counter() - started)

    measured = asyncio.run(closed_loop(base_url, make, clients=CAPACITY_CLIENTS, duration_s=capacity_s))
    capacity_rps = sum(1 for o in measured if o.status == 200) / capacity_s
    if capacity_rps == 0:
        raise RuntimeError(f"nothing was served while measuring capacity: {measured[:3]}")
    outcomes, offered_rps = asyncio.run(open_loop(base_url, make, rate_per_s=factor * capacity_rps, duration_s=overload_s))
    wrong = [
        (o.index, problem)
        for o in outcomes
        if o.status == 200 and (problem := check_batch(batch_body(o.index, adapters), o.body, references))
    ]
    return OverloadRun(
        adapters=adapters,
        max_queue_wait_ms=max_queue_wait_ms,
        max_batch_pairs=max_batch_pairs,
        full_batch_s=max(full_batch),
        capacity_s=capacity_s,
        capacity_outcomes=measured,
        overload_s=overload_s,
        offered_rps=offered_rps,
        outcomes=outcomes,
        wrong=wrong,
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.overload", description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="embedded", help="LORASWAP_BASE_MODEL of the server (default: embedded)")
    parser.add_argument("--adapters-dir", type=Path, default=REPO_ROOT / "adapters", help="adapters served (default: the shipped ones)")
    parser.add_argument("--max-queue-wait-ms", type=int, default=1000)
    parser.add_argument("--max-batch-pairs", type=int, default=16)
    parser.add_argument("--max-resident-adapters", type=int, default=2, help="fewer than the adapters in traffic: residency churns too")
    parser.add_argument("--torch-threads", type=int, default=1)
    parser.add_argument("--capacity-s", type=float, default=5.0, help="closed-loop capacity measurement")
    parser.add_argument("--overload-s", type=float, default=12.0, help="open loop at --factor times capacity")
    parser.add_argument("--factor", type=float, default=2.0)
    parser.add_argument("--out", type=Path, help="write the figures here as JSON")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    names = sorted(p.name for p in args.adapters_dir.iterdir() if (p / "metadata.json").is_file())
    if not names:
        raise SystemExit(f"no adapters under {args.adapters_dir}")
    env = {
        "LORASWAP_BASE_MODEL": args.base,
        "LORASWAP_ADAPTERS_DIR": str(args.adapters_dir),
        "LORASWAP_DEFAULT_ADAPTER": names[0],
        "LORASWAP_FRAUD_ENABLED": "false",
        "LORASWAP_TORCH_THREADS": str(args.torch_threads),
        "LORASWAP_MAX_QUEUE_WAIT_MS": str(args.max_queue_wait_ms),
        "LORASWAP_MAX_BATCH_PAIRS": str(args.max_batch_pairs),
        "LORASWAP_MAX_PAIRS_PER_REQUEST": str(args.max_batch_pairs),
        "LORASWAP_MAX_RESIDENT_ADAPTERS": str(args.max_resident_adapters),
    }
    port = free_port()
    command = [sys.executable, "-m", "app.cli", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    with tempfile.TemporaryDirectory(prefix="overload-") as work:
        with ServerProcess("loraswap", command, port=port, env=env, log_path=Path(work) / "server.log") as server:
            references = warm_up_and_reference(server.url, names, args.max_batch_pairs)
            run = run_overload(
                server.url,
                names,
                references,
                max_queue_wait_ms=args.max_queue_wait_ms,
                max_batch_pairs=args.max_batch_pairs,
                capacity_s=args.capacity_s,
                overload_s=args.overload_s,
                factor=args.factor,
            )
    results = {"machine": describe(), "base": args.base, "settings": {k: v for k, v in vars(args).items() if k != "out"}, **run.figures()}
    text = json.dumps(results, indent=2, sort_keys=True, default=str)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return results


if __name__ == "__main__":
    main()
