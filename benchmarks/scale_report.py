"""Write the adapters-at-scale run's results.md (scenarios, ratios, targets) and its plots."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a server
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.report import COLORS, _fmt  # noqa: E402

logger = logging.getLogger(__name__)

SYSTEM_COLORS = {"loraswap": COLORS["loraswap"], "peft_lru": COLORS["naive_peft"]}
FEW_COLOR = COLORS["merged"]
MB = 2**20


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100.0 * value:.1f}%"


def _tier_cells(scenario: dict) -> list[str]:
    """Loads from disk, mean time of one, host-to-device moves, host and device hit rates. The PEFT
    server has one tier (adapters loaded in the PeftModel): its loads (`load_adapter` time) and hit
    rate go in the disk and device columns."""
    activity = scenario["tier_activity"]
    load_ms = _fmt(activity.get("load_ms_mean"))
    if scenario["system"] == "peft_lru":
        return [str(activity["loads"]), load_ms, "", "", _percent(activity["hit_rate"])]
    return [
        str(activity["disk_loads"]), load_ms, str(activity["device_moves"]),
        _percent(activity["host_hit_rate"]), _percent(activity["device_hit_rate"]),
    ]


def markdown(results: dict) -> str:
    sizes = ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in results["adapter_file_bytes"].items())
    lines = [
        f"Device {results['device']}, base {results['base']}, {results['count']} synthetic adapters per pool "
        f"(weights file: {sizes}); loraswap: {results['device_slots']} device slots, host tier "
        f"{results['host_adapters']}, max LoRA rank {results['max_lora_rank']}; PEFT LRU: "
        f"{results['peft_max_loaded']} loaded. Concurrency {results['concurrency']}, torch threads "
        f"{results['torch_threads']}, Zipf alpha {results['zipf_alpha']:g}; `few` is loraswap with the 3 shipped "
        "adapters.",
        "",
        "| scenario | pairs/s | p50 ms | p99 ms | errors | ready s | peak RSS MB | loads from disk | ms per load | "
        "host to device | host hit | device hit | server CPU ms/pair |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in results["scenarios"].items():
        errors = s["errors"] + s["warmup_errors"]
        lines.append(
            f"| {name} | {_fmt(s['throughput_pairs_s'])} | {_fmt(s['p50_ms'])} | {_fmt(s['p99_ms'])} | {errors} | "
            f"{_fmt(s['ready_s'])} | {s['rss_peak_bytes'] / MB:.0f} | " + " | ".join(_tier_cells(s))
            + f" | {_fmt(s['server_cpu_ms_per_pair'])} |"
        )
    ratios = [f"ratio_vs_few {k} = {_fmt(v, 2)}" for k, v in results["ratio_vs_few"].items()]
    ratios += [f"ratio_vs_peft_lru {k} = {_fmt(v, 2)}" for k, v in results["ratio_vs_peft_lru"].items()]
    lines += [
        "",
        "; ".join(ratios) + ".",
        "",
        "| target | measured | bound | met |",
        "|---|---:|---:|---|",
    ]
    for target in results["targets"]:
        lines.append(f"| {target['target']} | {target['value']} | {target['bound']} | "
                     f"{'yes' if target['met'] else '**no**'} |")
    lines += [
        "",
        "Errors count warm-up and measured requests. Hit rates per pair of the measured phase: device = 1 - "
        "host-to-device moves / pairs; host = the share of device misses found in host memory. Ms per load: "
        "loraswap's read and validation of one adapter (its loader threads, /metrics), PEFT's `load_adapter` "
        "(under its model lock). The PEFT server's one tier (adapters loaded in its PeftModel) is in the "
        "device column. RSS budget: the `few` server's peak (the base) + host tier x weights file x "
        f"{results.get('rss_slack', 1.3)}; peak RSS from warm-up to the end: " + _peak_source(results) + ".",
        "",
        f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores; load average "
        f"(1/5/15 min) {results['machine']['load_average_1_5_15']} before and "
        f"{results.get('load_average_after', 'n/a')} after; {results['wall_s']} s wall.",
        "",
        f"Command: `{results['command']}`",
        "",
    ]
    return "\n".join(lines)


def _color(name: str, scenario: dict) -> str:
    return FEW_COLOR if name == "few" else SYSTEM_COLORS[scenario["system"]]


def _title(results: dict, what: str) -> str:
    return (f"{what} on {results['device']}: {results['count']} adapters, {results['device_slots']} slots, "
            f"host {results['host_adapters']},\nconcurrency {results['concurrency']}, "
            f"torch threads {results['torch_threads']}")


def plot_throughput(results: dict, path: Path) -> None:
    names = list(results["scenarios"])
    values = [results["scenarios"][n]["throughput_pairs_s"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    bars = ax.bar(names, values, color=[_color(n, results["scenarios"][n]) for n in names])
    ax.bar_label(bars, fmt="%.0f")
    ax.set_ylabel("pairs / s")
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    _finish(fig, ax, _title(results, "Throughput"), path)


def plot_latency(results: dict, path: Path) -> None:
    names = list(results["scenarios"])
    fig, ax = plt.subplots(figsize=(8, 3.6), dpi=100)
    width = 0.4
    for offset, quantile, hatch in ((-width / 2, "p50_ms", ""), (width / 2, "p99_ms", "//")):
        values = [results["scenarios"][n][quantile] or 0.0 for n in names]
        bars = ax.bar([i + offset for i in range(len(names))], values, width, hatch=hatch, label=quantile[:3],
                      color=[_color(n, results["scenarios"][n]) for n in names], edgecolor="white")
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
    ax.set_ylabel("latency, ms (client side)")
    _finish(fig, ax, _title(results, "p50 (plain) and p99 (hatched)"), path)


def _finish(fig, ax, title: str, path: Path) -> None:
    ax.set_title(title, fontsize=9)
    ax.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


PLOTS = {"throughput.png": plot_throughput, "latency.png": plot_latency}


def write_scale_report(results: dict, out: Path) -> list[Path]:
    """results.md and the plots (PLOTS) next to results.json; their paths, the table first."""
    (out / "results.md").write_text(markdown(results), encoding="utf-8")
    for file_name, plot in PLOTS.items():
        plot(results, out / file_name)
    return [out / "results.md", *(out / f for f in PLOTS)]


def _peak_source(results: dict) -> str:
    sources = {s.get("rss_peak_source", "sampled") for s in results["scenarios"].values()}
    if sources == {"VmHWM"}:
        return "the kernel's high-water mark (VmHWM, reset when the warm-up starts)"
    return "the most psutil saw, sampled every 0.25 s"
