"""Write a serving run's results.md table and its plots (throughput bars, latency percentiles)."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server
import matplotlib.pyplot as plt  # noqa: E402

logger = logging.getLogger(__name__)

SERVED = ("loraswap", "naive_peft", "merged")
COLORS = {"loraswap": "#1f77b4", "naive_peft": "#d62728", "merged": "#2ca02c", "limit": "#7f7f7f"}


def _fmt(value, digits: int = 1) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _batches(system: dict) -> str:
    sizes = system.get("batch_sizes")
    if not isinstance(sizes, dict):
        return str(sizes or "n/a")
    spread = ", ".join(f"{k}: {v}" for k, v in sizes["histogram"].items())
    return f"mean {_fmt(sizes['mean'])} over {sizes['batches']} ({spread})"


def _client_cpu(results: dict) -> str:
    values = [s.get("client_cpu_ms_per_request") for s in results["systems"].values()]
    values = [v for v in values if v is not None]
    return f"{min(values):.1f}-{max(values):.1f}" if values else "n/a"


def markdown(results: dict) -> str:
    systems = results["systems"]
    lines = [
        f"Device {results['device']}, base {results['base']}, {results['adapters']} adapters "
        f"({results['adapter_kind']}: {', '.join(results['adapter_names'][:6])}"
        f"{', ...' if len(results['adapter_names']) > 6 else ''}), popularity {results['popularity']}, "
        f"concurrency {results['concurrency']}, torch threads {results['torch_threads']}.",
        "",
        "| system | pairs/s | p50 ms | p95 ms | p99 ms | errors | requests | server CPU ms/pair | "
        "batch sizes (pairs per forward) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name in SERVED:
        if name not in systems:
            continue
        s = systems[name]
        lines.append(
            f"| {name} | {_fmt(s['throughput_pairs_s'])} | {_fmt(s['p50_ms'])} | {_fmt(s['p95_ms'])} | "
            f"{_fmt(s['p99_ms'])} | {s['errors']} | {s['requests']} | {_fmt(s.get('server_cpu_ms_per_pair'))} | "
            f"{_batches(s)} |"
        )
    if results.get("limit_pairs_s") is not None:
        lines.append(
            f"| limit (in-process, {_limit_config(results.get('limit_config'))}) | {_fmt(results['limit_pairs_s'])} "
            f"| | | | | {results.get('limit_pairs') or ''} | {_fmt(results.get('limit_cpu_ms_per_pair'))} | |"
        )
    lines += _single_rows(results)
    lines += [
        "",
        f"loraswap / naive_peft = {_fmt(results.get('ratio_vs_naive'), 2)}, "
        f"loraswap / merged = {_fmt(results.get('ratio_vs_merged'), 2)}, "
        f"loraswap / limit = {_fmt(results.get('ratio_vs_limit'), 2)}.",
        "",
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores; load average "
        f"(1/5/15 min) {results['machine']['load_average_1_5_15']} before and "
        f"{results.get('load_average_after', 'n/a')} after the run.",
        "",
        "Server CPU is the server process's CPU time (all threads) per answered pair; the load generator "
        f"used {_client_cpu(results)} ms of CPU per request on the same cores.",
        "",
        f"Command: `{results['command']}`",
        "",
    ]
    return "\n".join(lines)


def _single_rows(results: dict) -> list[str]:
    """The concurrency-1 table: one request at a time, against one pair alone in-process."""
    rows = [(name, results["systems"][name].get("single")) for name in SERVED if name in results["systems"]]
    rows = [(name, single) for name, single in rows if single]
    limit = results.get("limit_single")
    if not rows and not limit:
        return []
    lines = [
        "",
        f"Concurrency 1 ({results.get('single_requests')} requests, one at a time, one keep-alive connection; "
        "the systems and the in-process pair interleaved request by request):",
        "",
        "| system | p50 ms | p99 ms | errors |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {name} | {_fmt(s['p50_ms'])} | {_fmt(s['p99_ms'])} | {s['errors']} |" for name, s in rows]
    if limit:
        lines.append(f"| one pair alone in-process ({limit['mode']} forward) | {_fmt(limit['p50_ms'])} | "
                     f"{_fmt(limit['p99_ms'])} | |")
    lines += [
        "",
        f"loraswap p50 / in-process p50 = {_fmt(results.get('single_p50_ratio'), 2)}, "
        f"loraswap p99 / in-process p99 = {_fmt(results.get('single_p99_ratio'), 2)} "
        f"(/ in-process p50 = {_fmt(results.get('single_p99_over_inprocess_p50'), 2)}).",
    ]
    return lines


def _setting(results: dict) -> str:
    return (
        f"{results['base'].split('/')[-1]}, {results['adapters']} adapters, {results['popularity']},\n"
        f"concurrency {results['concurrency']}, torch threads {results['torch_threads']}"
    )


def plot_throughput(results: dict, path: Path) -> None:
    names = [n for n in SERVED if n in results["systems"]]
    values = [results["systems"][n]["throughput_pairs_s"] for n in names]
    if results.get("limit_pairs_s") is not None:
        names.append("limit")
        values.append(results["limit_pairs_s"])
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    bars = ax.bar(names, values, color=[COLORS[n] for n in names])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylabel("pairs / s")
    ax.set_title(f"Throughput on {results['device']}: {_setting(results)}", fontsize=9)
    ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_latency(results: dict, path: Path) -> None:
    names = [n for n in SERVED if n in results["systems"]]
    quantiles = ("p50_ms", "p95_ms", "p99_ms")
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [results["systems"][name][q] or 0.0 for q in quantiles]
        positions = [q + (i - (len(names) - 1) / 2) * width for q in range(len(quantiles))]
        bars = ax.bar(positions, values, width, label=name, color=COLORS[name])
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(quantiles)), ["p50", "p95", "p99"])
    ax.set_ylabel("latency, ms (client side)")
    ax.set_title(f"Latency on {results['device']}: {_setting(results)}", fontsize=9)
    ax.legend(fontsize=8)
    ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(results: dict, out: Path) -> list[Path]:
    """results.md, throughput.png and latency.png next to results.json."""
    paths = [out / "results.md", out / "throughput.png", out / "latency.png"]
    paths[0].write_text(markdown(results), encoding="utf-8")
    plot_throughput(results, paths[1])
    plot_latency(results, paths[2])
    return paths


def _limit_config(config: dict | None) -> str:
    if not config:
        return "n/a"
    return f"{config['mode']} forward, batches of {config['batch']}, {config['torch_threads']} threads"
