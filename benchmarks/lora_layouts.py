"""The two LoRA delta layouts of one batch, timed in-process: per-adapter segments at each adapter's own
rank against the gathered (BGMV) layout padded to the slots' maximum rank, for k adapters in a batch.

The engine picks segments when a batch mixes at most `NLIEngine.segmented_max_adapters` adapters; here
both layouts are forced (0: always gathered, 99: always segmented) on the same batch of real pairs.

    python -m benchmarks.lora_layouts                       # embedded base, 32 pairs, k = 1..16, r_max 16 and 64
    python -m benchmarks.lora_layouts --reps 21 --ks 1,2,3,4,6,8,12,16
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time
from pathlib import Path

from benchmarks import machine
from benchmarks.serving import DEFAULT_TORCH_THREADS, configure_logging
from benchmarks.workload import REPO_ROOT, load_pairs

logger = logging.getLogger(__name__)

TEXT_FILE = REPO_ROOT / "data/nli/mnli_sample.jsonl"
LAYOUTS = {"gathered": 0, "segmented": 99}  # layout -> engine.segmented_max_adapters that forces it


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="pairs per batch")
    parser.add_argument("--ks", default="1,2,4,8,16", help="distinct adapters per batch (comma-separated)")
    parser.add_argument("--rank", type=int, default=16, help="rank of every adapter")
    parser.add_argument("--max-ranks", default="16,64", help="slots' maximum rank (comma-separated)")
    parser.add_argument("--reps", type=int, default=15, help="timed batches per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed batches per configuration")
    parser.add_argument("--torch-threads", type=int, default=DEFAULT_TORCH_THREADS)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs/benchmarks/lora_layouts")
    return parser.parse_args(argv)


def batch_texts(count: int) -> list[tuple[str, str]]:
    """`count` consecutive pairs from the middle of the sample sorted by length: a batch as the batcher
    cuts it (sorted, little padding), at a typical length."""
    pairs = sorted(load_pairs((TEXT_FILE,)), key=lambda p: len(p.premise) + len(p.hypothesis))
    middle = max(0, len(pairs) // 2 - count // 2)
    chosen = pairs[middle : middle + count]
    if len(chosen) < count:
        raise ValueError(f"{TEXT_FILE} has fewer than {count} pairs")
    return [(p.premise, p.hypothesis) for p in chosen]


def main(argv: list[str] | None = None) -> dict:
    configure_logging()
    args = parse_args(argv)
    ks = sorted({int(k) for k in args.ks.split(",")})
    max_ranks = sorted({int(r) for r in args.max_ranks.split(",")})
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    from app.inference.base_model import resolve_base
    from app.inference.engine import SEGMENTED_MAX_ADAPTERS, NLIEngine
    from benchmarks.adapter_sets import write_synthetic

    torch.set_num_threads(args.torch_threads)
    description = machine.describe("cpu")
    spec = resolve_base("embedded")
    engines = {r: NLIEngine(spec, device="cpu", max_resident=max(ks), max_rank=r) for r in max_ranks}
    texts = batch_texts(args.batch)
    first = engines[max_ranks[0]]
    pairs = first.encode([t[0] for t in texts], [t[1] for t in texts])
    lengths = [len(p) for p in pairs]

    with tempfile.TemporaryDirectory(prefix="loraswap-layouts-") as tmp:
        names = [f"synth-{i:02d}" for i in range(max(ks))]
        write_synthetic(spec, Path(tmp), names, rank=args.rank, base_fingerprint=first.fingerprint)
        weights = {r: [engine.read_adapter(n, Path(tmp) / n) for n in names] for r, engine in engines.items()}

    # Row i uses adapter i mod k: every adapter gets batch/k rows, spread through the batch.
    configs = [(r, k, layout) for r in max_ranks for k in ks for layout in LAYOUTS]

    def run(config):
        r, k, layout = config
        engine = engines[r]
        engine.segmented_max_adapters = LAYOUTS[layout]
        row_adapters = [weights[r][i % k] for i in range(len(pairs))]
        started, cpu_started = time.perf_counter(), time.thread_time()
        probabilities = engine.run(pairs, row_adapters)
        # With one torch thread the forward runs on this thread: its CPU time is the batch's work,
        # which other processes on a shared machine disturb far less than the wall time.
        return (time.perf_counter() - started) * 1000.0, (time.thread_time() - cpu_started) * 1000.0, probabilities

    outputs = {}
    for config in configs:
        for _ in range(args.warmup):
            _, _, outputs[config] = run(config)
    times: dict[tuple, list[float]] = {config: [] for config in configs}
    cpu_times: dict[tuple, list[float]] = {config: [] for config in configs}
    for rep in range(args.reps):
        # Interleaved, in a rotating order, so a change in the machine's load falls on every configuration.
        shift = rep % len(configs)
        for config in configs[shift:] + configs[:shift]:
            elapsed, cpu, _ = run(config)
            times[config].append(elapsed)
            cpu_times[config].append(cpu)
        logger.info("repetition %d of %d done", rep + 1, args.reps)

    rows = []
    for r in max_ranks:
        for k in ks:
            gathered, segmented = (statistics.median(times[(r, k, layout)]) for layout in ("gathered", "segmented"))
            gathered_cpu, segmented_cpu = (
                statistics.median(cpu_times[(r, k, layout)]) for layout in ("gathered", "segmented")
            )
            difference = max(
                abs(x - y)
                for row_g, row_s in zip(outputs[(r, k, "gathered")], outputs[(r, k, "segmented")])
                for x, y in zip(row_g, row_s)
            )
            rows.append({
                "max_rank": r,
                "adapters": k,
                "gathered_ms": round(gathered, 2),
                "segmented_ms": round(segmented, 2),
                "gathered_over_segmented": round(gathered / segmented, 3),
                "gathered_cpu_ms": round(gathered_cpu, 2),
                "segmented_cpu_ms": round(segmented_cpu, 2),
                "gathered_over_segmented_cpu": round(gathered_cpu / segmented_cpu, 3),
                "engine_picks": "segmented" if k <= SEGMENTED_MAX_ADAPTERS else "gathered",
                "faster": "segmented" if segmented_cpu <= gathered_cpu else "gathered",
                "max_abs_probability_difference": difference,
                "gathered_ms_all": [round(t, 2) for t in times[(r, k, "gathered")]],
                "segmented_ms_all": [round(t, 2) for t in times[(r, k, "segmented")]],
                "gathered_cpu_ms_all": [round(t, 2) for t in cpu_times[(r, k, "gathered")]],
                "segmented_cpu_ms_all": [round(t, 2) for t in cpu_times[(r, k, "segmented")]],
            })
    results = {
        "base": spec.display_id,
        "batch_pairs": len(pairs),
        "tokens": {"longest": max(lengths), "mean": round(sum(lengths) / len(lengths), 1)},
        "adapter_rank": args.rank,
        "reps": args.reps,
        "warmup": args.warmup,
        "torch_threads": args.torch_threads,
        "engine_threshold": SEGMENTED_MAX_ADAPTERS,
        "threshold_by_max_rank": {r: best_threshold([row for row in rows if row["max_rank"] == r]) for r in max_ranks},
        "rows": rows,
        **machine.run_record(description, "benchmarks.lora_layouts", argv),
    }
    machine.write_results(args.out, "results", results, markdown)
    return results


def best_threshold(rows: list[dict]) -> int:
    """The threshold that costs least over the measured k: segmented for k <= T, gathered beyond (T = 0:
    always gathered), summed over the k values as measured (CPU time of the batch)."""
    candidates = [0] + [row["adapters"] for row in rows]

    def total(threshold: int) -> float:
        return sum(
            row["segmented_cpu_ms"] if row["adapters"] <= threshold else row["gathered_cpu_ms"] for row in rows
        )

    return min(candidates, key=total)


def markdown(results: dict) -> str:
    lines = [
        f"Base {results['base']}, one batch of {results['batch_pairs']} MNLI pairs (longest "
        f"{results['tokens']['longest']} tokens, mean {results['tokens']['mean']}), adapters r = "
        f"{results['adapter_rank']} on query and value, row i on adapter i mod k; median of "
        f"{results['reps']} timed `engine.run` calls (after {results['warmup']} warm-up), interleaved; "
        f"torch threads {results['torch_threads']}. CPU: the batch's CPU time on the calling thread.",
        "",
        "| slots' max rank | adapters in the batch | gathered (BGMV) ms | segmented ms | gathered CPU ms "
        "| segmented CPU ms | gathered / segmented (CPU) | faster (CPU) | engine picks (threshold "
        + str(results["engine_threshold"]) + ") |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['max_rank']} | {row['adapters']} | {row['gathered_ms']:.1f} | {row['segmented_ms']:.1f} "
            f"| {row['gathered_cpu_ms']:.1f} | {row['segmented_cpu_ms']:.1f} "
            f"| {row['gathered_over_segmented_cpu']:.2f} | {row['faster']} | {row['engine_picks']} |"
        )
    worst = max(row["max_abs_probability_difference"] for row in results["rows"])
    best = ", ".join(f"max rank {r}: {t}" for r, t in results["threshold_by_max_rank"].items())
    lines += [
        "",
        f"Threshold with the least total CPU time over these k (segmented for k <= T): {best}. "
        f"Largest probability difference between the layouts: {worst:.2e}.",
        *machine.footer(results),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
