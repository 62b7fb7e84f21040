"""Memory and disk of one base + K adapters against K full fine-tuned copies.

loraswap: a live server's RSS as adapters are loaded through the API. Full copies: RSS measured for
a few copies in one process, computed beyond.

    python -m benchmarks.memory                               # embedded base, K = 1, 3, 16, 100
    python -m benchmarks.memory --base roberta-large --random-init --counts 1,3,16 --full-copies 2
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from queue import Empty

import httpx

from benchmarks import machine
from benchmarks.servers import ServerProcess, free_port, loraswap_command, process_rss_bytes
from benchmarks.serving import DEFAULT_TORCH_THREADS, configure_logging

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
TARGET_PER_ADAPTER = 1.2  # a resident adapter may cost at most this many times its file size
PAIR = {"premise": "A man is playing a guitar on stage.", "hypothesis": "A person is making music."}
MB = 1024 * 1024


def settle_rss(pid: int, wait_s: float = 1.0) -> int:
    # RSS drifts for a moment after a load (freed buffers, lazy pages); read it once it stops moving.
    time.sleep(wait_s)
    return process_rss_bytes(pid)


def measure_adapters(spec, base: str, random_init: bool, counts: list[int], args, work: Path, log_dir: Path) -> dict:
    """Server RSS with K adapters loaded (each answered one request, so each is in a device slot; on
    the CPU a slot is host memory too, beside the host tier's copy)."""
    from app.inference.base_model import build_classifier, fingerprint
    from benchmarks.adapter_sets import prepare_adapters

    base_fingerprint = fingerprint(build_classifier(spec, num_labels=3))
    adapters = prepare_adapters(spec, max(counts), work / "pool", base_fingerprint=base_fingerprint)
    first = adapters.names[0]
    start = work / "start"
    shutil.copytree(adapters.path(first), start / first)
    port = free_port()
    env = {
        "LORASWAP_FRAUD_ENABLED": "false",
        "LORASWAP_BASE_MODEL": base,
        "LORASWAP_BASE_RANDOM_INIT": "true" if random_init else "false",
        "LORASWAP_DEVICE": args.device,
        "LORASWAP_TORCH_THREADS": str(args.torch_threads),
        "LORASWAP_ADAPTERS_DIR": str(start),
        "LORASWAP_ADAPTER_ROOTS": json.dumps([str(adapters.root)]),
        "LORASWAP_DEFAULT_ADAPTER": first,
        # Every adapter stays in both tiers: host memory (its validated weights) and a device slot.
        "LORASWAP_MAX_RESIDENT_ADAPTERS": str(max(counts) + 1),
        "LORASWAP_MAX_HOST_ADAPTERS": str(max(counts) + 1),
    }
    rows = []
    sizes = {n: (adapters.path(n) / "adapter_model.safetensors").stat().st_size for n in adapters.names}
    server = ServerProcess("loraswap", loraswap_command(port), port=port, env=env, log_path=log_dir / "memory.log")
    with server:
        with httpx.Client(base_url=server.url, timeout=120.0) as client:
            # Warm the forward path first so activation buffers are not counted as adapter cost.
            for _ in range(3):
                client.post("/nli", json={**PAIR, "adapter": first}).raise_for_status()
            loaded = 1
            for count in sorted(counts):
                for name in adapters.names[loaded:count]:
                    client.put(f"/adapters/{name}", json={"path": str(adapters.path(name))}).raise_for_status()
                    client.post("/nli", json={**PAIR, "adapter": name}).raise_for_status()
                loaded = count
                resident = sum(a["resident"] for a in client.get("/adapters").json()["adapters"])
                rss = settle_rss(server.pid)
                rows.append({
                    "adapters": count,
                    "resident": resident,
                    "rss_bytes": rss,
                    "adapter_files_bytes": sum(sizes[n] for n in adapters.names[:count]),
                })
                logger.info("K=%d: RSS %.1f MB (%d resident)", count, rss / MB, resident)
    mean_file = sum(sizes.values()) / len(sizes)
    low, high = rows[0], rows[-1]
    per_adapter = (high["rss_bytes"] - low["rss_bytes"]) / max(1, high["adapters"] - low["adapters"])
    return {
        "rows": rows,
        "adapter_kind": adapters.kind,
        "adapter_file_bytes_mean": round(mean_file),
        "per_extra_adapter_bytes": round(per_adapter),
        "per_extra_adapter_vs_file": round(per_adapter / mean_file, 3),
        "target_per_adapter_vs_file": TARGET_PER_ADAPTER,
        "target_met": per_adapter / mean_file <= TARGET_PER_ADAPTER,
    }


def _full_copies_child(base: str, random_init: bool, copies: int, torch_threads: int, queue) -> None:
    """In a fresh process: RSS after the imports, then after each full model (loaded and run once)."""
    import torch

    import fastapi  # noqa: F401  (the server's own imports, so the baseline RSS compares)
    import uvicorn  # noqa: F401

    from app.inference.base_model import build_classifier, load_tokenizer, resolve_base

    torch.set_num_threads(torch_threads)
    spec = resolve_base(base, random_init=random_init)
    tokenizer = load_tokenizer(spec)
    inputs = tokenizer(PAIR["premise"], PAIR["hypothesis"], return_tensors="pt")
    rss = [process_rss_bytes(os.getpid())]
    models = []
    for _ in range(copies):
        model = build_classifier(spec, num_labels=3).eval()
        # Fine-tuned copies hold weights of their own: never pages shared with a mapped checkpoint file.
        for parameter in model.parameters():
            parameter.data = parameter.data.clone()
        with torch.inference_mode():
            model(**inputs)
        models.append(model)
        time.sleep(0.5)
        rss.append(process_rss_bytes(os.getpid()))
    queue.put(rss)


def measure_full_copies(base: str, random_init: bool, copies: int, torch_threads: int, work: Path) -> dict:
    from app.inference.base_model import build_classifier, resolve_base

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_full_copies_child, args=(base, random_init, copies, torch_threads, queue))
    child.start()
    try:
        while True:
            try:
                rss = queue.get(timeout=5)
                break
            except Empty:
                if not child.is_alive():
                    raise RuntimeError(f"the full-copies process died (exit code {child.exitcode})") from None
        child.join(60)
    finally:
        if child.is_alive():
            child.terminate()
    increments = [b - a for a, b in zip(rss, rss[1:])]
    # Disk: what one fine-tuned copy is, saved the way Hugging Face saves it.
    saved = work / "full-copy"
    build_classifier(resolve_base(base, random_init=random_init), num_labels=3).save_pretrained(str(saved))
    disk = sum(p.stat().st_size for p in saved.glob("*.safetensors"))
    shutil.rmtree(saved, ignore_errors=True)
    return {
        "rss_after_imports_bytes": rss[0],
        "rss_bytes_by_copies": rss[1:],
        "per_copy_bytes": round(sum(increments) / len(increments)),
        "disk_bytes_per_copy": disk,
    }


def combine(adapter_part: dict, full_part: dict, base_disk: int) -> list[dict]:
    """One row per K: loraswap measured; full copies measured up to the copies loaded, computed beyond."""
    measured = full_part["rss_bytes_by_copies"]
    rows = []
    for row in adapter_part["rows"]:
        k = row["adapters"]
        if k <= len(measured):
            full_rss, how = measured[k - 1], "measured"
        else:
            full_rss, how = full_part["rss_after_imports_bytes"] + k * full_part["per_copy_bytes"], "computed"
        rows.append({
            "adapters": k,
            "loraswap_rss_mb": round(row["rss_bytes"] / MB, 1),
            "full_copies_rss_mb": round(full_rss / MB, 1),
            "full_copies_rss": how,
            "loraswap_disk_mb": round((base_disk + row["adapter_files_bytes"]) / MB, 1),
            "full_copies_disk_mb": round(k * full_part["disk_bytes_per_copy"] / MB, 1),
        })
    return rows


def markdown(results: dict) -> str:
    a = results["adapters_part"]
    lines = [
        f"Base {results['base']}; adapters {a['adapter_kind']}, "
        f"{a['adapter_file_bytes_mean'] / 1e6:.2f} MB each on disk.",
        "",
        "| K tasks | loraswap RSS (base + K adapters) | K full fine-tuned copies, RSS | loraswap disk "
        "| K full copies, disk |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in results["table"]:
        lines.append(
            f"| {r['adapters']} | {r['loraswap_rss_mb']:.0f} MB | "
            f"{r['full_copies_rss_mb']:.0f} MB ({r['full_copies_rss']}) "
            f"| {r['loraswap_disk_mb']:.1f} MB | {r['full_copies_disk_mb']:.0f} MB |"
        )
    f = results["full_part"]
    lines += [
        "",
        f"Each extra resident adapter: {a['per_extra_adapter_bytes'] / 1e6:.2f} MB of RSS = "
        f"{a['per_extra_adapter_vs_file']:.2f}x its file (target <= {a['target_per_adapter_vs_file']}x: "
        f"{'met' if a['target_met'] else 'missed'}). Each full copy: {f['per_copy_bytes'] / 1e6:.0f} MB of RSS, "
        f"{f['disk_bytes_per_copy'] / 1e6:.0f} MB on disk.",
        *machine.footer(results),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    configure_logging()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="embedded")
    parser.add_argument("--random-init", action="store_true")
    parser.add_argument("--counts", default="1,3,16,100", help="K values (comma-separated; the first is the reference)")
    parser.add_argument("--full-copies", type=int, default=3, help="full models actually loaded for the comparison")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--torch-threads", type=int, default=DEFAULT_TORCH_THREADS, help="torch CPU threads (default %(default)s)"
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs/benchmarks/memory")
    args = parser.parse_args(argv)
    counts = sorted({int(c) for c in args.counts.split(",")})
    args.out.mkdir(parents=True, exist_ok=True)
    description = machine.describe(args.device)

    from app.inference.base_model import resolve_base

    spec = resolve_base(args.base, random_init=args.random_init)
    with ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="loraswap-mem-")))
        adapter_part = measure_adapters(spec, args.base, args.random_init, counts, args, work, args.out / "logs")
        full_part = measure_full_copies(args.base, args.random_init, args.full_copies, args.torch_threads, work)
    results = {
        "base": spec.display_id,
        "device": args.device,
        "adapters_part": adapter_part,
        "full_part": full_part,
        "table": combine(adapter_part, full_part, full_part["disk_bytes_per_copy"]),
        **machine.run_record(description, "benchmarks.memory", argv),
    }
    machine.write_results(args.out, "memory", results, markdown)
    return results


if __name__ == "__main__":
    main()
