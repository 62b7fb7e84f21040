"""Where a served pair's time goes: loraswap under the serving benchmark's quick load, sampled by py-spy.

Starts loraswap exactly as `benchmarks.serving` does (embedded base, the shipped adapters, Zipf,
concurrency 32), warms it up, then samples every thread of the server with py-spy while the closed
loop runs, and reads each thread's CPU time from /proc. Each sample is charged to the innermost frame
that belongs to a known part of the request path (the GEMMs, attention, LoRA deltas, tokenization,
HTTP parsing, validation, JSON, metrics, ...), so the table says what each part costs per pair.

    python -m benchmarks.profile_serving              # 30 s of sampling, writes profile.json and profile.md
    python -m benchmarks.profile_serving --seconds 60 --server-env LORASWAP_MAX_BATCH_PAIRS=16

py-spy needs ptrace rights over the server (root, or kernel.yama.ptrace_scope=0).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

from benchmarks import machine, serving
from benchmarks.adapter_sets import prepare_adapters
from benchmarks.loadgen import make_client, run_closed_loop, warm_up
from benchmarks.servers import ServerProcess, free_port, loraswap_command
from benchmarks.workload import build_plan, load_pairs

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_RATE_HZ = 200

# (part, pattern over one py-spy frame "function (file:line)"); a sample goes to the innermost frame
# that matches any pattern, so a GEMM inside a LoRA wrapper counts as a GEMM, not as LoRA.
PARTS: list[tuple[str, re.Pattern]] = [
    (part, re.compile(pattern))
    for part, pattern in [
        ("GEMMs (nn.Linear)", r"^Linear\.forward \(.*linear\.py"),
        ("attention", r"^(PackedEncoder\._attend|sdpa_attention_forward|scaled_dot_product_attention)"),
        ("GELU and LayerNorm", r"^(GELUActivation\.forward|LayerNorm\.forward|layer_norm|gelu)"),
        ("LoRA deltas", r"^MultiLoRALinear\.forward"),
        ("embeddings", r"^(BertEmbeddings|RobertaEmbeddings|XLMRobertaEmbeddings)\.forward"),
        ("tokenization", r"^NLIEngine\.encode"),
        ("packing and padding", r"^(pack |pack\.<|_attention_blocks|NLIEngine\._pad)"),
        ("layer glue (module calls, residuals, views)", r"^(Module\._(wrapped_)?call_impl|PackedEncoder\.|BertLayer|RobertaLayer)"),
        ("heads, softmax, results", r"^NLIEngine\.(_run_packed|run) "),
        ("metrics", r"prometheus_client|app/services/metrics\.py"),
        ("request validation (pydantic)", r"pydantic|request_body_to_args|_validate_value|validate_python"),
        ("JSON response", r"serialize_response|jsonable_encoder|JSONResponse|json/"),
        ("NLI service", r"NLIService\.|app/services/nli\.py|adapter_registry\.py"),
        ("batch queue (admission, collect, split)", r"^Batcher\.|batcher\.py"),
        ("access log and request id", r"app/api/middleware\.py|logging/__init__\.py|app/logs\.py|uuid"),
        ("HTTP (uvicorn, httptools)", r"httptools_impl\.py|uvicorn/"),
        ("routing and middleware (FastAPI, Starlette)", r"fastapi/|starlette/|anyio/"),
        ("asyncio event loop", r"asyncio/"),
    ]
]


def py_spy() -> str | None:
    """py-spy next to this interpreter (a venv's bin) or on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "runs/benchmarks/profile", help="output directory")
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds of sampling under load")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=64, help="untimed requests first")
    parser.add_argument(
        "--server-env", action="append", default=[], metavar="KEY=VALUE", help="extra setting for the server"
    )
    return parser.parse_args(argv)


def part_of(frames: list[str]) -> str:
    for frame in reversed(frames):  # innermost first
        for part, pattern in PARTS:
            if pattern.search(frame):
                return part
    return "other"


def summarize(raw: Path) -> dict[str, Counter]:
    """py-spy's raw (collapsed) output: samples per part, per thread name."""
    by_thread: dict[str, Counter] = defaultdict(Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        thread = re.sub(r"^thread \(\S+\): ", "", frames[0]) or frames[0]
        by_thread[thread][part_of(frames[1:])] += int(count)
    return by_thread


def thread_cpu_s(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of `pid`, by thread id (the main thread's id is the pid)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[tid] = (int(fields[11]) + int(fields[12])) / ticks
    return out


async def profile(server: ServerProcess, plan, warmup, args, raw: Path) -> dict:
    client = make_client(server.url, args.concurrency)
    try:
        await warm_up(client, warmup, concurrency=args.concurrency)
        pid = server.process.pid
        cpu_before = thread_cpu_s(pid)
        spy = subprocess.Popen(
            [py_spy(), "record", "--pid", str(pid), "--duration", str(int(args.seconds)),
             "--rate", str(SAMPLE_RATE_HZ), "--format", "raw", "--output", str(raw), "--threads", "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        result = await run_closed_loop(client, plan, concurrency=args.concurrency, max_duration_s=args.seconds)
        cpu_after = thread_cpu_s(pid)
        _, stderr = await asyncio.to_thread(spy.communicate)
        if spy.returncode != 0:
            raise RuntimeError(f"py-spy failed: {stderr.decode(errors='replace')[-500:]}")
    finally:
        await client.aclose()
    threads = {tid: cpu_after[tid] - cpu_before.get(tid, 0.0) for tid in cpu_after}
    main_cpu = threads.pop(str(pid), 0.0)
    busiest = max(threads.values(), default=0.0)  # the batcher's thread does the forwards
    return {"load": result.summary(), "cpu_s": {"main": main_cpu, "engine": busiest,
                                                "other": sum(threads.values()) - busiest}}


def main(argv: list[str] | None = None) -> dict:
    serving.configure_logging()
    args = parse_args(argv)
    if py_spy() is None:
        raise SystemExit("py-spy is not installed: pip install py-spy (it is in the dev extra)")
    args.out.mkdir(parents=True, exist_ok=True)
    description = machine.describe("cpu")
    bench_args = serving.parse_args(["--quick", *[f"--server-env={e}" for e in args.server_env]])

    from app.inference.base_model import build_classifier, fingerprint, resolve_base

    with tempfile.TemporaryDirectory(prefix="loraswap-profile-") as work:
        spec = resolve_base("embedded")
        adapters = prepare_adapters(spec, bench_args.adapters, Path(work) / "adapters",
                                    base_fingerprint=fingerprint(build_classifier(spec, num_labels=3)))
        pairs = load_pairs()
        plan = build_plan(pairs, adapters.names, "zipf", 100_000, seed=0)
        warmup = build_plan(pairs, adapters.names, "zipf", args.warmup, seed=1000)
        port = free_port()
        env = serving.server_env(bench_args, base="embedded", random_init=False, adapters_dir=adapters.root,
                                 default=adapters.names[0])
        with ServerProcess("loraswap", loraswap_command(port), port=port, env=env,
                           log_path=args.out / "loraswap.log") as server:
            raw = args.out / "pyspy.raw"
            measured = asyncio.run(profile(server, plan, warmup, args, raw))
    pairs_done = measured["load"]["ok"]
    samples = summarize(raw)
    results = {
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "server_env": args.server_env,
        "load": measured["load"],
        "cpu_ms_per_pair": {k: round(1000.0 * v / max(1, pairs_done), 3) for k, v in measured["cpu_s"].items()},
        # Active (on-CPU or runnable) milliseconds of each thread per pair, by part of the request path.
        "active_ms_per_pair": {
            thread: {part: round(1000.0 * n / SAMPLE_RATE_HZ / max(1, pairs_done), 3) for part, n in parts.most_common()}
            for thread, parts in samples.items()
        },
        **machine.run_record(description, "benchmarks.profile_serving", sys.argv[1:] if argv is None else argv),
    }
    machine.write_results(args.out, "profile", results, markdown)
    return results


def markdown(results: dict) -> str:
    load = results["load"]
    cpu = results["cpu_ms_per_pair"]
    lines = [
        f"loraswap at concurrency {results['concurrency']}, {results['seconds']:.0f} s sampled: "
        f"{load['throughput_pairs_s']} pairs/s, p50 {load['p50_ms']} ms, {load['errors']} errors.",
        "",
        f"Server CPU per pair: engine thread {cpu['engine']} ms, event loop {cpu['main']} ms, "
        f"other threads {cpu['other']} ms.",
        "",
        "| thread | part | active ms per pair |",
        "|---|---|---:|",
    ]
    for thread, parts in results["active_ms_per_pair"].items():
        total = sum(parts.values())
        if total < 0.05:
            continue
        for part, ms in parts.items():
            if ms >= 0.01:
                lines.append(f"| {thread} | {part} | {ms:.2f} |")
        lines.append(f"| {thread} | **total** | **{total:.2f}** |")
    lines += ["", f"Machine: {results['machine']['cpu']}, {results['machine']['cores']} cores.", *machine.footer(results)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
